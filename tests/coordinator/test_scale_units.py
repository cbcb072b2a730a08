"""The pieces that keep the control plane small at scale, without a network: the reload
budget, incremental plans, bounded tables (recent routes, forgotten nodes), the lease
payload, and the routing snapshot."""

from __future__ import annotations

import pytest

from swarm_coordinator.assignment import AssignmentPolicy, plan
from swarm_coordinator.planner import ReloadBudget, decide
from swarm_coordinator.registry import Registry, RegistryConfig
from swarm_coordinator.routing import RecentRoutes, Span
from swarm_coordinator.state import Assignment, LayerRange, NodeView, SwarmState
from swarm_proto.presence import (
    Assign,
    Lease,
    NodeLoad,
    NodeState,
    NodeStatus,
    PayloadError,
    TopicKind,
    Topics,
    decode,
    encode,
)

L = 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view(node_id: str, hosted: LayerRange | None, *, layers: int = 10, speed: float = 100.0) -> NodeView:
    status = NodeStatus(node_id, f"{node_id}:1", "m", hosted, "cpu", layers * 10, speed,
                        NodeState.READY if hosted else NodeState.STARTING)
    return NodeView(status, assign=Assign(node_id, "m", hosted, 1) if hosted else None)


def test_reload_budget_counts_moves_in_a_sliding_window() -> None:
    clock = Clock()
    budget = ReloadBudget(2, 3600.0, clock=clock)
    assert not budget.exhausted("a")
    budget.record("a")
    clock.now += 10
    budget.record("a")
    assert budget.exhausted("a") and not budget.exhausted("b")
    clock.now += 3595  # the first move leaves the window
    assert not budget.exhausted("a")
    budget.prune({"b"})
    assert not budget.exhausted("a") and budget._moves == {}


def test_a_node_out_of_budget_keeps_its_range_unless_coverage_needs_it() -> None:
    # Two chains; "c" joins and a full plan would reshuffle; a and b are out of budget.
    state = SwarmState.of("m", L, 10, [view("a", LayerRange(0, 10)), view("b", LayerRange(10, 20)),
                                      view("c", None, layers=20, speed=1000.0)])
    clock = Clock()
    budget = ReloadBudget(1, 3600.0, clock=clock)
    budget.record("a")
    budget.record("b")
    free = decide(state, AssignmentPolicy(1, 0.0), full=True)
    held = decide(state, AssignmentPolicy(1, 0.0), full=True, budget=budget)
    assert free is not None and held is not None
    assert held["a"] == LayerRange(0, 10) and held["b"] == LayerRange(10, 20)
    assert held.covers(L)
    # when keeping a range would leave a hole, coverage wins over the budget
    lonely = SwarmState.of("m", L, 10, [view("a", LayerRange(0, 10)), view("c", None, layers=20)])
    repaired = decide(lonely, AssignmentPolicy(1), budget=budget)
    assert repaired is not None and repaired.covers(L)


def test_incremental_plan_keeps_survivors_and_repairs_the_hole() -> None:
    views = [view(f"n{i}", LayerRange(5 * (i % 4), 5 * (i % 4) + 5), layers=10) for i in range(8)]
    state = SwarmState.of("m", L, 10, views)
    current = state.current_assignment()
    gone = state.without_node("n0").without_node("n4")  # both hosts of [0, 5)
    after = plan(gone, current.without(["n0", "n4"]), AssignmentPolicy(2), full=False)
    assert after.covers(L)
    assert after.replicas(L) == 2  # both copies are back
    before = current.without(["n0", "n4"])
    moved = before.changes(after)
    assert len(moved) == 2  # two survivors grew over the hole; nobody else moved
    for node_id, grown in moved.items():
        assert grown is not None and grown.start <= before[node_id].start and before[node_id].end <= grown.end


def test_recent_routes_stay_bounded_and_counts_expire() -> None:
    recent = RecentRoutes(window_s=10.0, max_routes=3)
    spans = (Span("a", "a:1", 0, 5), Span("b", "b:1", 5, 10))
    for t in range(5):
        recent.record(spans, float(t))
    assert dict(recent.counts(4.0)) == {"a": 3, "b": 3}
    assert dict(recent.counts(100.0)) == {}


def test_registry_forgets_long_offline_nodes_and_ignores_other_swarms() -> None:
    clock = Clock()
    topics = Topics("lab")
    reg = Registry(RegistryConfig("mqtt://127.0.0.1:1", "lab", "m", L, 10, forget_after_s=60.0), clock=clock)
    reg.handle(topics.status("a"), encode(NodeStatus("a", "a:1", "m", state=NodeState.READY)))
    reg.handle(topics.status("b"), encode(NodeStatus("b", "b:1", "m", state=NodeState.OFFLINE)))
    clock.now += 30
    assert reg.forgettable() == []
    clock.now += 31
    assert reg.forgettable() == ["b"]  # "a" is online (its silence is the sweep's business)


def test_routing_snapshot_is_reused_for_max_age() -> None:
    clock = Clock()
    topics = Topics("lab")
    reg = Registry(RegistryConfig("mqtt://127.0.0.1:1", "lab", "m", L, 10), clock=clock)
    reg.handle(topics.status("a"), encode(NodeStatus("a", "a:1", "m", LayerRange(0, L), state=NodeState.READY)))
    first = reg.snapshot(0.1)
    reg.handle(topics.load("a"), encode(NodeLoad(active_sessions=3)))
    assert reg.snapshot(0.1) is first  # a tenth of a second behind at most
    assert reg.state.nodes["a"].load == NodeLoad(active_sessions=3)
    clock.now += 0.2
    assert reg.snapshot(0.1).nodes["a"].load == NodeLoad(active_sessions=3)


def test_lease_payload_round_trips_and_is_checked() -> None:
    topics = Topics("lab")
    lease = Lease("coord-a", "10.0.0.1:7600", 7)
    assert decode(topics, topics.lease, encode(lease)) == (TopicKind.LEASE, None, lease)
    assert decode(topics, topics.lease, b"") == (TopicKind.LEASE, None, None)  # deleted by the Will
    with pytest.raises(PayloadError):
        Lease("bad id/with slash")
    with pytest.raises(PayloadError):
        decode(topics, topics.lease, encode(Lease("x", "", 1))[:-3])


def test_assignment_changes_ignore_unchanged_nodes() -> None:
    a = Assignment({"x": LayerRange(0, 5)})
    assert a.changes(a) == {}
