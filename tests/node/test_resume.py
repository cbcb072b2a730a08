"""Resumable sessions on a node (swarm_node.resume): parking, adoption, replay skips."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from swarm_node.convert import StepIn
from swarm_node.engine.kv_cache import KVCache
from swarm_node.resume import ParkingLot, can_skip, confirm


def session(sid: str = "s1", *, tail: bool = False, resumable: bool = True, length: int = 0) -> Any:
    cache = KVCache(2, 1, 4, 16)
    cache.length = length
    return SimpleNamespace(
        sid=sid,
        spec=SimpleNamespace(resumable=resumable, start=2, end=4, capability=""),
        cache=cache,
        model=SimpleNamespace(is_tail=tail),
        history=[],
        outputs=None if tail else torch.zeros(16, 3),
        valid=0,
        verified=0,
        kept=0,
    )


def step(start: int, tokens: list[int], *, replay: bool = True, sample: bool = False) -> StepIn:
    return StepIn(1, start, torch.tensor(tokens), None, sample, False, replay)


def computed(s: Any, st: StepIn) -> None:
    """What the service does around a computed step."""
    del s.history[st.start_pos :]
    s.history.extend(st.tokens.tolist())
    s.cache.length = st.start_pos + st.length
    confirm(s, st, torch.full((st.length, 3), float(st.start_pos)))


def test_a_replay_of_what_is_cached_is_skipped_only_in_order_and_with_the_same_tokens() -> None:
    s = session()
    computed(s, step(0, [5, 6, 7], replay=False))
    computed(s, step(3, [8], replay=False))
    assert (s.valid, s.verified) == (4, 4) and torch.equal(s.outputs[3], torch.zeros(3) + 3)
    held = _park_and_take(s)
    assert held.verified == 0 and held.kept == 4
    assert not can_skip(held, step(1, [6, 7]))  # must continue what the new upstream confirmed
    assert not can_skip(held, step(0, [5, 9, 7]))  # another history
    assert not can_skip(held, step(0, [5, 6, 7], replay=False))  # an ordinary step is computed
    assert not can_skip(held, step(0, [5, 6, 7], sample=True))  # the tail must sample from fresh logits
    assert not can_skip(held, step(0, [5, 6, 7, 8, 9]))  # past what is cached
    assert can_skip(held, step(0, [5, 6, 7]))


def test_parking_keeps_failed_resumable_sessions_for_the_same_layers_until_they_expire() -> None:
    lot = ParkingLot(timeout=10.0, capacity=2)
    s = session("a")
    computed(s, step(0, [1, 2], replay=False))
    assert not lot.park(session("empty"))  # nothing computed: nothing to keep
    assert not lot.park(session("plain", resumable=False))
    assert lot.park(s, now=0.0) and len(lot) == 1
    assert lot.take("a", 0, 2, 16) is None and len(lot) == 0  # other layers: dropped
    lot.park(s, now=0.0)
    assert lot.take("a", 2, 4, 32) is None  # a longer session than the cache holds
    lot.park(s, now=0.0)
    assert lot.expire(now=5.0) == 0 and lot.expire(now=10.0) == 1
    for sid in "xyz":
        t = session(sid)
        computed(t, step(0, [1], replay=False))
        lot.park(t, now=0.0)
    assert len(lot) == 2 and lot.take("x", 2, 4, 16) is None  # the oldest went first


def _park_and_take(s: Any) -> Any:
    lot = ParkingLot(timeout=10.0, capacity=4)
    assert lot.park(s)
    held = lot.take(s.sid, 2, 4, 16)
    assert held is not None and held.cache is s.cache
    adopted = session(s.sid, length=s.cache.length)
    adopted.cache = held.cache
    held.adopt_into(adopted)
    return adopted
