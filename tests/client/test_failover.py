"""The pure pieces of client failover (swarm_client.failover): no network."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from swarm_client.failover import FailoverPolicy, FailoverRecord, StepClock, blame, patch_route
from swarm_client.remote import Hop, RouteError
from swarm_client.routed import NodeSummary


def node(node_id: str, start: int, end: int, sessions: int = 0) -> NodeSummary:
    return NodeSummary(node_id, f"127.0.0.1:{100 + ord(node_id[0])}", start, end, "cpu", sessions)


A, B, C = Hop("127.0.0.1:197", 0, 2, "a"), Hop("127.0.0.1:198", 2, 4, "b"), Hop("127.0.0.1:199", 4, 6, "c")


def test_the_step_timeout_follows_measured_latency_within_bounds() -> None:
    clock = StepClock(FailoverPolicy(step_timeout_floor=1.0, step_timeout_factor=10.0, step_timeout_max=60.0))
    assert clock.timeout(1) == 60.0  # nothing measured yet
    clock.observe(1, 0.02)
    assert clock.timeout(1) == 1.0  # 10 x 20 ms is under the floor
    assert clock.timeout(100) == 60.0  # no prefill measured yet
    clock.observe(101, 2.02)  # 20 ms per further position
    assert clock.timeout(101) == pytest.approx(20.2)
    for _ in range(50):
        clock.observe(1, 0.5)
    assert clock.timeout(1) == pytest.approx(5.0, rel=0.01)


def test_the_coordinators_estimate_times_the_first_steps() -> None:
    clock = StepClock(FailoverPolicy(step_timeout_floor=1.0, step_timeout_factor=10.0, step_timeout_max=60.0))
    clock.prior(0.3)
    assert clock.timeout(1) == pytest.approx(3.0)  # before any measurement
    assert clock.timeout(50) == 60.0  # prefills: only measurements
    clock.observe(1, 0.01)
    assert clock.timeout(1) == 1.0  # measured beats estimated
    clock.slower()  # a timeout on a route that was only slow
    assert clock.timeout(1) == 2.0


def test_the_probe_timeout_scales_with_slow_links() -> None:
    clock = StepClock(FailoverPolicy(probe_timeout=0.5))
    assert clock.probe_timeout() == 0.5  # nothing known
    clock.observe(1, 0.03)  # a fast route: the policy's figure
    assert clock.probe_timeout() == 0.5
    for _ in range(60):
        clock.observe(1, 0.4)  # 50 ms one way x 4 links + compute
    assert clock.probe_timeout() == pytest.approx(0.8, rel=0.01)


def test_patch_route_replaces_only_the_failed_hop() -> None:
    nodes = [node("a", 0, 2), node("b", 2, 4), node("c", 4, 6), node("d", 0, 4, 3), node("e", 2, 4, 1)]
    patched = patch_route((A, B, C), [B], nodes, avoid={B.address})
    assert patched is not None
    assert [(h.node_id, h.start, h.end) for h in patched] == [("a", 0, 2), ("e", 2, 4), ("c", 4, 6)]  # e: less busy


def test_patch_route_chains_over_a_gap_and_never_repeats_a_node() -> None:
    nodes = [node("a", 0, 2), node("c", 4, 6), node("d", 0, 3), node("f", 3, 6)]
    patched = patch_route((A, B, C), [B], nodes, avoid=set())
    assert patched is not None
    assert [(h.node_id, h.start, h.end) for h in patched] == [("a", 0, 2), ("d", 2, 3), ("f", 3, 4), ("c", 4, 6)]
    # only a node already on the route covers the gap: no patch (ask the coordinator)
    assert patch_route((A, B, C), [B], [node("a", 0, 6), node("c", 4, 6)], avoid=set()) is None


def test_blame_trusts_the_named_hop_of_an_in_band_error() -> None:
    error = RouteError(grpc.StatusCode.UNAVAILABLE, "successor died", address=B.address, node_id="b")
    assert asyncio.run(blame(error, (A, B, C), 0.1)) == [B]


def test_blame_probes_a_silent_route() -> None:
    # Nothing listens at these addresses: every hop is silent.
    error = RouteError(grpc.StatusCode.DEADLINE_EXCEEDED, "no result within 1 s")
    hops = (Hop("127.0.0.1:1", 0, 3, "x"), Hop("127.0.0.1:2", 3, 6, "y"))
    assert asyncio.run(blame(error, hops, 0.2)) == list(hops)


def test_a_record_sums_its_stall() -> None:
    r = FailoverRecord("s" * 32, "b", B.address, "UNAVAILABLE", "gone", 40, "span", 0.01, 0.02, 0.03, 40)
    assert r.stall_s == pytest.approx(0.06)
    assert "stall 0.060 s" in r.summary() and "span replay of 40/40 tokens" in r.summary()
    with pytest.raises(ValueError):
        FailoverPolicy(replay="partial")
