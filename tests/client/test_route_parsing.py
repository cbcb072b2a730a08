"""`--route` accepts hops with or without their layer ranges."""

from __future__ import annotations

import pytest

from swarm_client.routed import parse_route


def test_hops_with_ranges() -> None:
    hops = parse_route("127.0.0.1:5000=0:10, 127.0.0.1:5001=10:30")
    assert [(h.address, h.start, h.end) for h in hops] == [("127.0.0.1:5000", 0, 10), ("127.0.0.1:5001", 10, 30)]


def test_plain_hops_are_resolved_later() -> None:
    hops = parse_route("127.0.0.1:5000,[::1]:5001")
    assert [(h.address, h.start, h.end) for h in hops] == [("127.0.0.1:5000", -1, -1), ("[::1]:5001", -1, -1)]


@pytest.mark.parametrize("bad", ["", " , ", "nohost", "127.0.0.1:5000=10", "=0:10"])
def test_bad_routes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_route(bad)
