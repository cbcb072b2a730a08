"""The one backoff the client (addresses) and the coordinator (node ids) avoid failed nodes with."""

from __future__ import annotations

import pytest

from swarm_proto.backoff import Backoff


def test_backoff_doubles_on_repeated_failures_caps_and_is_forgotten() -> None:
    book = Backoff(initial=2.0, maximum=5.0, forget_after=100.0)
    assert book.count("x") == 0 and book.avoided(0.0) == set()
    assert book.record("x", now=0.0) == 2.0
    assert book.avoided(now=1.0) == {"x"} and book.avoided(now=2.5) == set()
    assert book.record("x", now=3.0) == 4.0
    assert book.record("x", now=4.0) == 5.0  # capped
    assert book.count("x") == 3
    assert book.record("x", now=500.0) == 2.0  # forgotten after a quiet spell
    book.avoided(now=700.0)
    assert book.count("x") == 0 and len(book) == 0


def test_backoff_is_bounded_and_drops_the_stalest() -> None:
    book = Backoff(capacity=3)
    for i, key in enumerate("abcd"):
        book.record(key, now=float(i))
    assert len(book) == 3 and book.count("a") == 0 and book.avoided(now=2.5) == {"b", "c", "d"}
    book.record("b", now=4.0)  # a repeat makes b the freshest
    book.record("e", now=4.5)
    assert book.count("c") == 0 and book.count("b") == 2


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(initial=0)
    with pytest.raises(ValueError):
        Backoff(initial=5, maximum=1)
