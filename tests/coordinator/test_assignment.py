"""Assignment is a pure function of the swarm state: plain unit tests, no network."""

from __future__ import annotations

import random

import pytest

from swarm_coordinator.assignment import (
    AssignmentPolicy,
    eligible,
    estimate_throughput,
    plan,
    propose,
)
from swarm_coordinator.errors import CoverageError
from swarm_coordinator.state import (
    Assignment,
    LayerRange,
    NodeState,
    NodeStatus,
    NodeView,
    SwarmState,
)
from swarm_proto.presence import Assign

L = 30
BPL = 1000  # bytes per layer


def node(
    node_id: str,
    speed: float,
    max_layers: int = L,
    *,
    state: NodeState = NodeState.READY,
    hosted: LayerRange | None = None,
    model: str = "m",
) -> NodeView:
    status = NodeStatus(node_id, f"10.0.0.1:{abs(hash(node_id)) % 60000}", model, hosted, "cpu", max_layers * BPL, speed, state)
    return NodeView(status)


def swarm(*views: NodeView, num_layers: int = L) -> SwarmState:
    return SwarmState.of("m", num_layers, BPL, views)


def hosting(state: SwarmState, assignment: Assignment) -> SwarmState:
    """The state after every node loaded what ``assignment`` told it."""
    out = state
    for node_id, r in assignment.items():
        v = state.nodes[node_id]
        out = out.with_node(
            NodeView(
                NodeStatus(
                    v.node_id, v.address, "m", r, "cpu", v.status.memory_budget, v.speed, NodeState.READY
                ),
                assign=Assign(node_id, "m", r, 1),
            )
        )
    return out


def sizes(a: Assignment) -> dict[str, int]:
    return {n: len(r) for n, r in a.items()}


def check_valid(state: SwarmState, a: Assignment) -> None:
    assert a.covers(state.num_layers), a
    for node_id, r in a.items():
        assert 0 <= r.start < r.end <= state.num_layers
        assert len(r) <= state.nodes[node_id].capacity(state.bytes_per_layer), (node_id, r)


# ---------------------------------------------------------------------------
# propose: shares and layout
# ---------------------------------------------------------------------------


def test_three_nodes_get_layers_in_proportion_to_speed() -> None:
    s = swarm(node("a", 10), node("b", 20), node("c", 30))
    a = propose(s)
    check_valid(s, a)
    assert sizes(a) == {"a": 5, "b": 10, "c": 15}
    assert a.coverage(L) == (1,) * L  # one copy, no overlap


def test_memory_budget_caps_a_share_and_the_rest_is_spread_by_speed() -> None:
    # c would get 15 layers by speed but holds only 6; a and b share the other 24 as 1:2.
    s = swarm(node("a", 10), node("b", 20), node("c", 30, max_layers=6))
    a = propose(s)
    check_valid(s, a)
    assert sizes(a) == {"a": 8, "b": 16, "c": 6}


def test_budgets_respected_even_when_fast_nodes_are_small() -> None:
    s = swarm(node("a", 100, 4), node("b", 100, 4), node("c", 1, 30))
    a = propose(s)
    check_valid(s, a)
    assert sizes(a) == {"a": 4, "b": 4, "c": 22}


def test_shares_round_to_exactly_the_layer_count() -> None:
    s = swarm(node("a", 1), node("b", 1), node("c", 1), num_layers=31)
    a = propose(s)
    check_valid(s, a)
    assert sorted(sizes(a).values()) == [10, 10, 11]


def test_replicas_where_capacity_allows() -> None:
    s = swarm(node("a", 10), node("b", 10), node("c", 10), node("d", 10))
    a = propose(s, AssignmentPolicy(replicas=2))
    check_valid(s, a)
    assert a.coverage(L) == (2,) * L
    assert sizes(a) == {"a": 15, "b": 15, "c": 15, "d": 15}


def test_replicas_form_chains_split_by_speed() -> None:
    # Three equal nodes cannot each hold 20 layers and still give every layer two
    # copies; two chains can: one node alone, and two nodes sharing the other copy.
    s = swarm(node("a", 10), node("b", 10), node("c", 10))
    a = propose(s, AssignmentPolicy(replicas=2))
    check_valid(s, a)
    assert a.coverage(L) == (2,) * L
    assert sorted(sizes(a).values()) == [15, 15, 30]


def test_replicas_limited_by_capacity() -> None:
    # 45 layer slots: every layer once, 15 of them twice.
    s = swarm(node("a", 10, 15), node("b", 10, 15), node("c", 10, 15))
    a = propose(s, AssignmentPolicy(replicas=2))
    check_valid(s, a)
    assert sum(sizes(a).values()) == 45
    assert a.replicas(L) == 1
    assert sum(1 for c in a.coverage(L) if c >= 2) == 15


def test_impossible_coverage_names_the_uncovered_layers() -> None:
    s = swarm(node("a", 10, 8), node("b", 10, 12))
    with pytest.raises(CoverageError) as info:
        propose(s)
    err = info.value
    assert sum(len(r) for r in err.uncovered) == 10
    assert "[20, 30)" in str(err) and "can hold 20" in str(err)
    assert sum(sizes(err.partial).values()) == 20  # the best it could do, for the caller
    with pytest.raises(CoverageError):
        plan(s)


def test_empty_swarm_is_a_coverage_error() -> None:
    with pytest.raises(CoverageError) as info:
        plan(swarm())
    assert info.value.uncovered == (LayerRange(0, L),)


def test_ineligible_nodes_get_nothing() -> None:
    s = swarm(
        node("a", 10),
        node("off", 99, state=NodeState.OFFLINE),
        node("drain", 99, state=NodeState.DRAINING),
        node("other", 99, model="another-model"),
        node("tiny", 99, max_layers=0),
    )
    assert [v.node_id for v in eligible(s)] == ["a"]
    assert propose(s) == Assignment({"a": LayerRange(0, L)})


def test_unmeasured_node_counts_as_a_typical_one() -> None:
    s = swarm(node("a", 10), node("b", 30), node("new", 0))
    assert sizes(propose(s)) == {"a": 5, "b": 15, "new": 10}  # median speed = 20


def test_random_swarms_are_always_valid() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 7)
        layers = rng.randint(1, 40)
        views = [node(f"n{i}", rng.choice([0, 1, 3, 10, 50]) + rng.random(), rng.randint(1, layers)) for i in range(n)]
        s = swarm(*views, num_layers=layers)
        policy = AssignmentPolicy(replicas=rng.randint(1, 3))
        room = sum(min(layers, v.capacity(BPL)) for v in views)
        if room < layers:
            with pytest.raises(CoverageError):
                propose(s, policy)
            continue
        a = propose(s, policy)
        check_valid(s, a)
        if room >= policy.replicas * layers and all(v.capacity(BPL) >= layers for v in views):
            assert a.replicas(layers) >= min(policy.replicas, len(views))
        # ...and a node leaving is repaired whenever the survivors can hold the model.
        gone = rng.choice(views).node_id
        rest = hosting(s, a).without_node(gone)
        if sum(min(layers, v.capacity(BPL)) for v in eligible(rest)) >= layers:
            check_valid(rest, plan(rest, policy=policy))


# ---------------------------------------------------------------------------
# plan: repair and hysteresis
# ---------------------------------------------------------------------------


def test_plan_from_scratch_is_the_proposal() -> None:
    s = swarm(node("a", 10), node("b", 20), node("c", 30))
    assert plan(s) == propose(s)


def test_working_swarm_is_left_alone() -> None:
    s = swarm(node("a", 10), node("b", 20), node("c", 30))
    s = hosting(s, plan(s))
    assert plan(s) == s.current_assignment()


def test_small_speed_drift_does_not_reshuffle() -> None:
    s = hosting(swarm(node("a", 10), node("b", 20), node("c", 30)), propose(swarm(node("a", 10), node("b", 20), node("c", 30))))
    drifted = s.with_node(NodeView(NodeStatus("a", "x", "m", s.nodes["a"].status.hosted, "cpu", L * BPL, 12, NodeState.READY)))
    assert plan(drifted, s.current_assignment()) == s.current_assignment()


def test_leave_reassigns_only_the_uncovered_layers() -> None:
    s = swarm(node("a", 10), node("b", 20), node("c", 30))
    before = plan(s)
    s = hosting(s, before)
    after = plan(s.without_node("b"))
    check_valid(s, after)
    assert set(after) == {"a", "c"}
    # survivors keep what they had and grow to cover b's layers
    for node_id in ("a", "c"):
        assert before[node_id].start >= after[node_id].start and before[node_id].end <= after[node_id].end


def test_offline_node_counts_as_gone() -> None:
    s = hosting(swarm(node("a", 10), node("b", 10)), propose(swarm(node("a", 10), node("b", 10))))
    b = s.nodes["b"]
    s = s.with_node(NodeView(b.status.offline(), assign=b.assign))
    assert plan(s) == Assignment({"a": LayerRange(0, L)})


def test_leave_that_survivors_cannot_cover_uses_an_idle_node() -> None:
    s = swarm(node("a", 10, 15), node("b", 10, 15))
    s = hosting(s, plan(s))
    s = s.with_node(node("spare", 1, 15))  # joined later, got a replica range
    s = hosting(s, plan(s))
    gone = "a"
    hole = s.current_assignment()[gone]
    after = plan(s.without_node(gone))
    check_valid(s, after)
    assert after["b"] == s.current_assignment()["b"]
    assert hole.start >= after["spare"].start and hole.end <= after["spare"].end


def test_leave_with_too_little_memory_left_is_a_coverage_error() -> None:
    s = hosting(swarm(node("a", 10, 15), node("b", 10, 15)), propose(swarm(node("a", 10, 15), node("b", 10, 15))))
    with pytest.raises(CoverageError) as info:
        plan(s.without_node("b"))
    assert sum(len(r) for r in info.value.uncovered) == 15


def test_joiner_that_adds_little_does_not_reshuffle() -> None:
    # Six nodes hold five layers each. A slightly faster node that can hold ten layers
    # joins: re-splitting would gain 71/60 - 1 = 18% < 20%, so it only becomes a
    # replica where it helps, and nobody else moves.
    base = swarm(*(node(f"n{i}", 10, 10) for i in range(6)))
    s = hosting(base, plan(base))
    current = s.current_assignment()
    assert set(sizes(current).values()) == {5}
    after = plan(s.with_node(node("new", 11, 10)))
    assert after.without(["new"]) == current
    assert len(after["new"]) <= 10


def test_joiner_with_memory_for_everything_becomes_a_full_replica() -> None:
    base = swarm(node("a", 10), node("b", 10))
    s = hosting(base, plan(base))
    after = plan(s.with_node(node("c", 12)))
    assert after.without(["c"]) == s.current_assignment()
    assert after["c"] == LayerRange(0, L)


def test_much_faster_joiner_triggers_a_reshuffle() -> None:
    # The new node is 10x faster but holds only 15 layers: as a mere replica it leaves
    # the other half of the model at the old speed, so re-splitting pays far more than 20%.
    base = swarm(*(node(f"n{i}", 10, 10) for i in range(6)))
    s = hosting(base, plan(base))
    joined = s.with_node(node("fast", 100, 15))
    incremental = s.current_assignment().with_range("fast", LayerRange(0, 15))
    after = plan(joined)
    check_valid(joined, after)
    assert after.without(["fast"]) != s.current_assignment()
    assert len(after["fast"]) == 15
    assert estimate_throughput(joined, after) > 1.2 * estimate_throughput(joined, incremental)


def test_hysteresis_threshold_is_a_policy() -> None:
    # A node twice as fast joins: re-splitting gains 25%, which is worth it at a 20%
    # threshold and not at 30%.
    base = swarm(*(node(f"n{i}", 10, 10) for i in range(6)))
    s = hosting(base, plan(base))
    joined = s.with_node(node("new", 20, 10))
    incremental = plan(joined, policy=AssignmentPolicy(min_gain=0.3))
    assert incremental.without(["new"]) == s.current_assignment()
    resplit = plan(joined, policy=AssignmentPolicy(min_gain=0.2))
    assert resplit.without(["new"]) != s.current_assignment()
    gain = estimate_throughput(joined, resplit) / estimate_throughput(joined, incremental)
    assert 1.2 < gain < 1.3


def test_replicas_restored_after_a_leave() -> None:
    policy = AssignmentPolicy(replicas=2)
    base = swarm(node("a", 10), node("b", 10), node("c", 10))
    s = hosting(base, plan(base, policy=policy))
    assert s.current_assignment().replicas(L) == 2
    s = s.without_node("a").with_node(node("d", 10))
    after = plan(s, policy=policy)
    assert after.replicas(L) == 2


def test_current_range_over_budget_is_dropped() -> None:
    s = swarm(node("a", 10, 30), node("b", 10, 30))
    s = hosting(s, plan(s))
    shrunk = s.nodes["a"].status
    s = s.with_node(NodeView(NodeStatus("a", "x", "m", shrunk.hosted, "cpu", 5 * BPL, 10, NodeState.READY)))
    after = plan(s)
    check_valid(s, after)


def test_nodes_holding_quantized_weights_get_layers_in_proportion_to_what_they_hold() -> None:
    # Equal budgets and speeds: the int4 node (a quarter of the float16 bytes per layer)
    # fits four times the layers; a node that reports no per-layer bytes gets the swarm's.
    def sized(node_id: str, budget: int, layer_bytes: int, fmt: str) -> NodeView:
        return NodeView(NodeStatus(node_id, f"10.0.0.9:{len(node_id)}", "m", None, "cpu", budget, 10.0,
                                   NodeState.READY, layer_bytes=layer_bytes, weight_format=fmt))

    s = swarm(sized("f16", 6 * BPL, BPL, "float16"), sized("q4", 6 * BPL, BPL // 4, "int4"))
    a = propose(s)
    check_valid(s, a)
    assert sizes(a) == {"f16": 6, "q4": 24}
    assert [v.capacity(s.bytes_per_layer) for v in s.nodes.values()] == [6, 24]

    s = swarm(sized("old", 20 * BPL, 0, ""), sized("q8", 5 * BPL, BPL // 2, "Q8_0"))
    a = propose(s)
    check_valid(s, a)
    assert sizes(a) == {"old": 20, "q8": 10}
