"""Routing is a pure function of the swarm state: plain unit tests, no network."""

from __future__ import annotations

import pytest

from swarm_coordinator.errors import NoRouteError
from swarm_coordinator.routing import (
    RecentRoutes,
    RoutingPolicy,
    Span,
    find_route,
    route_latency,
    seconds_per_layer,
)
from swarm_coordinator.state import LayerRange, NodeLoad, NodeState, NodeStatus, NodeView, SwarmState

L = 12


def node(
    node_id: str,
    start: int,
    end: int,
    speed: float = 100.0,
    *,
    load: NodeLoad | None = None,
    state: NodeState = NodeState.READY,
) -> NodeView:
    status = NodeStatus(node_id, f"{node_id}.lan:7000", "m", LayerRange(start, end), "cpu", 10**9, speed, state)
    return NodeView(status, load)


def swarm(*views: NodeView) -> SwarmState:
    return SwarmState.of("m", L, 1000, views)


def chain(route: tuple[Span, ...]) -> list[tuple[str, int, int]]:
    return [(s.node_id, s.start, s.end) for s in route]


def check_route(route: tuple[Span, ...]) -> None:
    assert route[0].start == 0 and route[-1].end == L
    for a, b in zip(route, route[1:]):
        assert a.end == b.start
    assert all(s.start < s.end for s in route)


def test_simple_chain_with_addresses() -> None:
    route = find_route(swarm(node("a", 0, 4), node("b", 4, 8), node("c", 8, 12)))
    assert route == (
        Span("a", "a.lan:7000", 0, 4),
        Span("b", "b.lan:7000", 4, 8),
        Span("c", "c.lan:7000", 8, 12),
    )


def test_prefers_fewer_hops_when_compute_is_equal() -> None:
    s = swarm(node("a", 0, 6), node("b", 6, 12), node("whole", 0, 12))
    assert chain(find_route(s)) == [("whole", 0, 12)]


def test_prefers_faster_nodes() -> None:
    s = swarm(node("slow", 0, 12, speed=10), node("a", 0, 6, speed=1000), node("b", 6, 12, speed=1000))
    assert chain(find_route(s)) == [("a", 0, 6), ("b", 6, 12)]


def test_hop_latency_can_outweigh_compute() -> None:
    s = swarm(node("slow", 0, 12, speed=1000), node("a", 0, 6, speed=1100), node("b", 6, 12, speed=1100))
    assert chain(find_route(s, policy=RoutingPolicy(hop_latency_s=0.05))) == [("slow", 0, 12)]


def test_uses_part_of_a_range_when_switching_pays() -> None:
    # slow hosts [0, 8), fast hosts [4, 12): run slow only for [0, 4).
    s = swarm(node("slow", 0, 8, speed=10), node("fast", 4, 12, speed=1000))
    route = find_route(s)
    check_route(route)
    assert chain(route) == [("slow", 0, 4), ("fast", 4, 12)]


def test_load_steers_away_from_a_busy_replica() -> None:
    busy = NodeLoad(active_sessions=4, queued_steps=5, free_kv_tokens=10**6)
    idle = NodeLoad(free_kv_tokens=10**6)
    s = swarm(node("a", 0, 12, load=busy), node("b", 0, 12, load=idle))
    assert chain(find_route(s)) == [("b", 0, 12)]
    assert seconds_per_layer(s.nodes["a"]) > seconds_per_layer(s.nodes["b"])


def test_prefers_nodes_with_kv_room() -> None:
    full = NodeLoad(free_kv_tokens=100)
    s = swarm(node("a", 0, 12, speed=1000, load=full), node("b", 0, 12, speed=10))
    assert chain(find_route(s, max_length=100)) == [("a", 0, 12)]
    assert chain(find_route(s, max_length=2048)) == [("b", 0, 12)]
    # out of sessions (a node that reports its count) is full too, whatever its KV
    no_sessions = NodeLoad(free_kv_tokens=10**6, kv_tokens=10**6, free_sessions=0)
    s = swarm(node("a", 0, 12, speed=1000, load=no_sessions), node("b", 0, 12, speed=10))
    assert chain(find_route(s, max_length=100)) == [("b", 0, 12)]


def test_full_nodes_are_used_when_nothing_has_room() -> None:
    # reports lag: the node's own admission decides (and answers "busy" if still full)
    full = NodeLoad(free_kv_tokens=0, kv_tokens=4096, free_sessions=0)
    s = swarm(node("a", 0, 6, load=full), node("b", 6, 12), node("c", 6, 12, load=full))
    assert chain(find_route(s, max_length=100)) == [("a", 0, 6), ("b", 6, 12)]


def test_exclude_avoids_failed_nodes() -> None:
    s = swarm(node("a", 0, 12, speed=1000), node("b", 0, 6), node("c", 6, 12))
    assert chain(find_route(s)) == [("a", 0, 12)]
    assert chain(find_route(s, exclude={"a"})) == [("b", 0, 6), ("c", 6, 12)]


def test_only_ready_nodes_serve() -> None:
    s = swarm(
        node("loading", 0, 12, speed=1e6, state=NodeState.LOADING),
        node("draining", 0, 12, speed=1e6, state=NodeState.DRAINING),
        node("gone", 0, 12, speed=1e6, state=NodeState.OFFLINE),
        node("ok", 0, 12),
    )
    assert chain(find_route(s)) == [("ok", 0, 12)]


def test_spreads_sessions_over_replicas() -> None:
    s = swarm(node("a", 0, 6), node("a2", 0, 6), node("b", 6, 12), node("b2", 6, 12))
    recent = RecentRoutes(window_s=10)
    used: dict[str, int] = {}
    for i in range(8):
        route = find_route(s, recent=recent.counts(now=float(i)))
        check_route(route)
        recent.record(route, now=float(i))
        for span in route:
            used[span.node_id] = used.get(span.node_id, 0) + 1
    assert used == {"a": 4, "a2": 4, "b": 4, "b2": 4}


def test_recent_routes_forget_after_the_window() -> None:
    recent = RecentRoutes(window_s=5)
    recent.record([Span("a", "x", 0, 12)], now=0.0)
    recent.record([Span("a", "x", 0, 6), Span("b", "y", 6, 12)], now=3.0)
    assert recent.counts(now=4.0) == {"a": 2, "b": 1}
    assert recent.counts(now=7.0) == {"a": 1, "b": 1}
    assert recent.counts(now=9.0) == {}


def test_no_route_names_uncovered_layers_and_why() -> None:
    s = swarm(node("a", 0, 4), node("b", 4, 8), node("c", 8, 12, load=NodeLoad(free_kv_tokens=10)))
    with pytest.raises(NoRouteError) as info:
        find_route(s, max_length=512, exclude={"b"})
    err = info.value
    assert err.uncovered == (LayerRange(4, 12),)
    msg = str(err)
    assert "[4, 12)" in msg and "excluded: b" in msg and "no KV room: c" in msg


def test_no_route_in_an_empty_swarm() -> None:
    with pytest.raises(NoRouteError) as info:
        find_route(swarm())
    assert info.value.uncovered == (LayerRange(0, L),)


def test_gap_between_ranges_is_reported() -> None:
    with pytest.raises(NoRouteError) as info:
        find_route(swarm(node("a", 0, 5), node("b", 7, 12)))
    assert info.value.uncovered == (LayerRange(5, 7),)


def test_route_latency_counts_k_plus_one_hops() -> None:
    s = swarm(node("a", 0, 6, speed=600), node("b", 6, 12, speed=600))
    route = find_route(s)
    policy = RoutingPolicy(hop_latency_s=0.001)
    assert route_latency(s, route, policy=policy) == pytest.approx(3 * 0.001 + 12 / 600)


def test_many_overlapping_nodes_give_a_valid_chain() -> None:
    views = [node(f"n{i}", i % 9, min(L, i % 9 + 3 + i % 4), speed=50 + 7 * i) for i in range(30)]
    route = find_route(swarm(*views))
    check_route(route)
    for span in route:
        hosted = next(v for v in views if v.node_id == span.node_id).status.hosted
        assert hosted is not None and hosted.start <= span.start and span.end <= hosted.end


def test_route_index_answers_as_find_route_on_random_swarms() -> None:
    """RouteIndex (per-snapshot groups, early-exit scans) gives find_route's routes."""
    import random

    from swarm_coordinator.routing import RouteIndex

    rng = random.Random(5)
    for trial in range(60):
        L = rng.choice((8, 30, 80))
        views = []
        for i in range(rng.randrange(1, 40)):
            start = rng.randrange(0, L)
            end = rng.randrange(start + 1, L + 1) if rng.random() < 0.8 else L
            load = NodeLoad(
                active_sessions=rng.randrange(4), queued_steps=rng.randrange(3),
                free_kv_tokens=rng.choice((0, 100, 5000)), kv_tokens=5000, free_sessions=rng.randrange(3),
            )
            status = NodeStatus(f"n{i:02d}", f"h:{i}", "m", LayerRange(start, end), speed=rng.choice((50.0, 100.0, 300.0)),
                                state=NodeState.READY if rng.random() < 0.9 else NodeState.LOADING)
            views.append(NodeView(status, load if rng.random() < 0.8 else None))
        state = SwarmState.of("m", L, 1, views)
        ids = [v.node_id for v in views]
        # the counts the index is built with; the requests' counts differ in some nodes
        built = {n: rng.randrange(1, 4) for n in rng.sample(ids, k=rng.randrange(0, len(ids) + 1))}
        index = RouteIndex(state, recent=built)
        for _ in range(5):
            exclude = set(rng.sample(ids, k=rng.randrange(0, min(3, len(ids)) + 1)))
            if rng.random() < 0.5:
                recent = {n: rng.randrange(1, 4) for n in rng.sample(ids, k=rng.randrange(0, len(ids) + 1))}
            else:  # a few routes recorded or expired since the index was built
                recent = dict(built)
                for n in rng.sample(ids, k=min(len(ids), rng.randrange(0, 4))):
                    recent[n] = recent.get(n, 0) + rng.choice((-1, 1))
                recent = {n: c for n, c in recent.items() if c > 0}
            max_length = rng.choice((1, 200, 4000))
            try:
                want = find_route(state, max_length=max_length, exclude=exclude, recent=recent)
            except NoRouteError as exc:
                with pytest.raises(NoRouteError) as got:
                    index.route(max_length=max_length, exclude=exclude, recent=recent)
                assert str(got.value) == str(exc)
                continue
            assert index.route(max_length=max_length, exclude=exclude, recent=recent) == want, trial


def test_a_route_index_updated_from_the_previous_one_equals_a_fresh_one() -> None:
    """RouteIndex(previous=...) regroups only the nodes whose view or recent count
    changed; its groups and routes must be those of an index built from scratch."""
    import random
    from dataclasses import replace

    from swarm_coordinator.routing import RouteIndex

    rng = random.Random(8)
    L = 30

    def fresh_view(i: int) -> NodeView:
        start = rng.randrange(0, L)
        end = rng.randrange(start + 1, L + 1)
        state = NodeState.READY if rng.random() < 0.9 else NodeState.LOADING
        load = NodeLoad(active_sessions=rng.randrange(3), free_kv_tokens=5000, kv_tokens=5000, free_sessions=2)
        status = NodeStatus(f"n{i:03d}", f"h:{i}", "m", LayerRange(start, end), speed=rng.choice((50.0, 100.0)), state=state)
        return NodeView(status, load)

    views = {f"n{i:03d}": fresh_view(i) for i in range(80)}
    recent: dict[str, int] = {}
    index = RouteIndex(SwarmState.of("m", L, 1, views.values()))
    serial = 80
    for _ in range(60):  # few changes per step: the update path (many: a fresh build)
        for _ in range(rng.randrange(0, 5)):  # loads, moves, leaves, joins
            what = rng.random()
            node_id = rng.choice(sorted(views))
            if what < 0.4:
                load = NodeLoad(active_sessions=rng.randrange(4), free_kv_tokens=5000, kv_tokens=5000, free_sessions=2)
                views[node_id] = replace(views[node_id], load=load)
            elif what < 0.6:
                views[node_id] = fresh_view(int(node_id[1:]))  # another range, speed or state
            elif what < 0.8 and len(views) > 5:
                del views[node_id]
            else:
                views[f"n{serial:03d}"] = fresh_view(serial)
                serial += 1
        for node_id in rng.sample(sorted(views), k=rng.randrange(0, 3)):
            recent[node_id] = max(0, recent.get(node_id, 0) + rng.choice((-1, 1, 2)))
        recent = {k: v for k, v in recent.items() if v > 0 and k in views}
        state = SwarmState.of("m", L, 1, views.values())
        index = RouteIndex(state, recent=recent, previous=index)
        scratch = RouteIndex(state, recent=recent)
        assert index._groups == scratch._groups and index._group_of == scratch._group_of
        try:
            want = scratch.route(max_length=100, recent=recent)
        except NoRouteError:
            with pytest.raises(NoRouteError):
                index.route(max_length=100, recent=recent)
            continue
        assert index.route(max_length=100, recent=recent) == want


def test_the_unlinked_search_finds_routes_as_cheap_as_the_general_search() -> None:
    """With no link measured, _search takes a one-pass search over boundaries; the
    general (boundary, node) search must find no cheaper route (ties may split
    elsewhere between equally fast nodes)."""
    import random

    from swarm_coordinator.routing import LinkDelays, _search

    rng = random.Random(11)
    for trial in range(300):
        L = rng.choice((4, 16, 80))
        candidates: dict[tuple[int, int], list[tuple[float, str, NodeView]]] = {}
        for i in range(rng.randrange(1, 40)):
            start = rng.randrange(0, L)
            end = rng.randrange(start + 1, L + 1)
            view = NodeView(NodeStatus(f"n{i:02d}", f"h:{i}", "m", LayerRange(start, end), state=NodeState.READY))
            candidates.setdefault((start, end), []).append((rng.choice((0.001, 0.002, 0.005)), f"n{i:02d}", view))
        unlinked = LinkDelays({}, {}, 0.002)
        general = LinkDelays({("x", "y"): 0.004}, {}, 0.002)  # measured, but between nodes that are not here
        fast, slow = _search(L, candidates, unlinked), _search(L, candidates, general)
        assert (fast is None) == (slow is None), trial
        if fast is None or slow is None:
            continue
        per_layer = {m[1]: m[0] for members in candidates.values() for m in members}

        def cost(spans: tuple[Span, ...], per_layer: dict[str, float] = per_layer) -> float:
            return sum(0.002 + (s.end - s.start) * per_layer[s.node_id] for s in spans) + 0.002

        check_route_over(fast, L, candidates)
        assert cost(fast) == pytest.approx(cost(slow), abs=1e-12), trial  # (rounding can split a tie either way)


def check_route_over(spans: tuple[Span, ...], L: int, candidates: dict[tuple[int, int], list[tuple[float, str, NodeView]]]) -> None:
    import itertools

    ranges = {m[1]: key for key, members in candidates.items() for m in members}
    assert spans[0].start == 0 and spans[-1].end == L
    for a, b in itertools.pairwise(spans):
        assert a.end == b.start and a.node_id != b.node_id
    for span in spans:
        start, end = ranges[span.node_id]
        assert start <= span.start < span.end <= end


# --- link-aware routing (docs/wan.md) ---------------------------------------------------


def with_rtts(view: NodeView, **rtts: float) -> NodeView:
    from swarm_proto.presence import PeerRtt

    return NodeView(view.status, NodeLoad(free_kv_tokens=10**6, peer_rtts=tuple(PeerRtt(k, v) for k, v in rtts.items())))


def test_picks_the_replica_behind_the_shorter_link() -> None:
    # b1 and b2 differ only in their link delay from the head (a) and to the tail (c)
    far, near = 0.100, 0.020
    for slow in ("b1", "b2"):
        fast = "b2" if slow == "b1" else "b1"
        a = with_rtts(node("a", 0, 4), **{slow: far, fast: near})
        b1 = with_rtts(node("b1", 4, 8), c=far if slow == "b1" else near)
        b2 = with_rtts(node("b2", 4, 8), c=far if slow == "b2" else near)
        route = find_route(swarm(a, b1, b2, node("c", 8, 12)))
        assert chain(route) == [("a", 0, 4), (fast, 4, 8), ("c", 8, 12)]


def test_a_link_reported_by_one_end_counts_both_ways() -> None:
    # only the successors report: b1 measured a slow link to a
    a = node("a", 0, 4)
    b1 = with_rtts(node("b1", 4, 12), a=0.2)
    b2 = with_rtts(node("b2", 4, 12), a=0.01)
    assert chain(find_route(swarm(a, b1, b2))) == [("a", 0, 4), ("b2", 4, 12)]


def test_link_delays_trade_against_compute_and_cut_points() -> None:
    # one slow node hosting everything vs. two fast ones behind a long link
    whole = with_rtts(node("whole", 0, 12, speed=100.0), b=0.4)  # 12 layers x 10 ms = 120 ms
    a = with_rtts(node("a", 0, 6, speed=1000.0), b=0.4, whole=0.4)  # 6 + 6 ms, but 200 ms to the next
    b = node("b", 6, 12, speed=1000.0)
    assert chain(find_route(swarm(whole, a, b))) == [("whole", 0, 12)]
    a_near = with_rtts(node("a", 0, 6, speed=1000.0), b=0.01, whole=0.4)
    assert chain(find_route(swarm(whole, a_near, b))) == [("a", 0, 6), ("b", 6, 12)]


def test_a_far_client_gets_a_head_and_tail_near_it() -> None:
    near = (node("n1", 0, 6), node("n2", 6, 12))
    far = (node("f1", 0, 6), node("f2", 6, 12))
    s = swarm(*near, *far)
    rtts = {"n1": 0.01, "n2": 0.01, "f1": 0.2, "f2": 0.2}
    assert chain(find_route(s, client_rtts=rtts)) == [("n1", 0, 6), ("n2", 6, 12)]
    flipped = {k: 0.21 - v for k, v in rtts.items()}
    assert chain(find_route(s, client_rtts=flipped)) == [("f1", 0, 6), ("f2", 6, 12)]


def test_route_latency_counts_measured_links() -> None:
    policy = RoutingPolicy()
    a = with_rtts(node("a", 0, 6), b=0.05)
    b = node("b", 6, 12)
    s = swarm(a, b)
    route = find_route(s)
    compute = 12 * seconds_per_layer(s.nodes["a"])
    got = route_latency(s, route, client_rtts={"a": 0.02, "b": 0.04}, policy=policy)
    assert got == pytest.approx(compute + 0.01 + 0.025 + 0.02)
    # unmeasured links cost a local hop each: K + 1 of them
    assert route_latency(s, route) == pytest.approx(compute + 0.025 + 2 * policy.hop_latency_s)


def test_the_route_index_weighs_links_like_find_route() -> None:
    from swarm_coordinator.routing import RouteIndex

    # ten replicas of the middle range; the compute-cheapest is far from its neighbours
    a = with_rtts(node("a", 0, 4), **{f"m{i}": (0.2 if i == 0 else 0.02) for i in range(10)})
    middles = [with_rtts(node(f"m{i}", 4, 8, speed=200.0 if i == 0 else 100.0 - i), c=0.2 if i == 0 else 0.02)
               for i in range(10)]
    s = swarm(a, *middles, node("c", 8, 12))
    index = RouteIndex(s)
    for rtts in ({}, {"a": 0.01, "c": 0.01}, {"a": 0.3, "c": 0.3}):
        assert index.route(client_rtts=rtts) == find_route(s, client_rtts=rtts)
    assert chain(index.route())[1] == ("m1", 4, 8)  # near, and the fastest of the near ones
