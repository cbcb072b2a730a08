"""Routes: the chain of nodes a session's activations flow through, chosen from state.

A route is a tuple of :class:`Span` covering layers ``[0, L)`` in order. :func:`find_route`
picks the chain with the lowest estimated latency per token: every span costs one hop
plus ``layers * seconds_per_layer`` on its node, where a node's seconds per layer is
``1 / speed`` stretched by its load (queued steps, active sessions) and by the sessions
this coordinator routed through it recently (load reports lag by a couple of seconds,
so the recent count is what spreads a burst of sessions over replicas).

Only nodes that are ready, serve the state's model and are not in ``exclude`` are used;
among them, nodes whose last load report shows KV room for ``max_length`` tokens and a
free session are preferred: full nodes are used only when no route exists without them
(their reports lag by a couple of seconds; the node's own admission decides, and a
full one answers "busy", which clients wait on). A span may use part of a node's range.

The search is a shortest path over layer boundaries. Switching nodes only pays off at
the start or end of some node's range (cost is linear in the switch point between
two such boundaries), so those are the only positions searched.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from swarm_coordinator.errors import NoRouteError, format_ranges
from swarm_coordinator.state import NodeView, SwarmState, runs

__all__ = ["RecentRoutes", "RouteIndex", "RoutingPolicy", "Span", "find_route", "has_room", "route_latency", "seconds_per_layer"]


@dataclass(frozen=True)
class Span:
    """One hop of a route: ``node_id`` at ``address`` runs layers ``[start, end)``."""

    node_id: str
    address: str
    start: int
    end: int


@dataclass(frozen=True)
class RoutingPolicy:
    hop_latency_s: float = 0.002  # one network traversal between processes
    queue_weight: float = 1.0  # each queued step delays ours by about one step
    session_weight: float = 0.1  # batching: each active session slows a step a little
    recent_weight: float = 0.5  # sessions routed here lately, not yet seen in load reports


def seconds_per_layer(view: NodeView, recent: int = 0, policy: RoutingPolicy = RoutingPolicy()) -> float:
    """Estimated time for one token through one of ``view``'s layers, under its load."""
    base = 1.0 / view.speed if view.speed > 0 else 1.0
    load = view.load
    busy = policy.recent_weight * recent
    if load is not None:
        busy += policy.queue_weight * load.queued_steps + policy.session_weight * load.active_sessions
    return base * (1.0 + busy)


def has_room(view: NodeView, max_length: int) -> bool:
    """Whether ``view``'s last load report shows room for a session of ``max_length``."""
    load = view.load
    if load is None:
        return True
    if load.kv_tokens > 0 and load.free_sessions <= 0:  # reports of nodes that count sessions
        return False
    return load.free_kv_tokens >= max_length


def _usable(
    state: SwarmState, exclude: Collection[str], max_length: int, need_room: bool = True
) -> tuple[list[NodeView], dict[str, list[str]]]:
    usable: list[NodeView] = []
    skipped: dict[str, list[str]] = {"excluded": [], "no KV room": [], "not ready": []}
    for view in state.nodes.values():
        if view.node_id in exclude:
            skipped["excluded"].append(view.node_id)
        elif view.serving is None or not state.serves_model(view) or view.serving.end > state.num_layers:
            skipped["not ready"].append(view.node_id)
        elif need_room and not has_room(view, max_length):
            skipped["no KV room"].append(view.node_id)
        else:
            usable.append(view)
    return usable, skipped


def find_route(
    state: SwarmState,
    *,
    max_length: int = 1,
    exclude: Collection[str] = frozenset(),
    recent: Mapping[str, int] | None = None,
    policy: RoutingPolicy = RoutingPolicy(),
) -> tuple[Span, ...]:
    """The lowest-latency chain covering ``[0, L)``; raises :class:`NoRouteError`.

    ``max_length`` is the session's KV length in tokens; ``exclude`` holds nodes the
    caller saw fail (backoff is the caller's business); ``recent`` counts sessions
    routed through each node lately (see :class:`RecentRoutes`).
    """
    try:
        return _find_route(state, max_length, exclude, recent or {}, policy, need_room=True)
    except NoRouteError as roomy:
        # Nothing with room (as last reported): the nodes themselves decide, "busy" or not.
        try:
            return _find_route(state, max_length, exclude, recent or {}, policy, need_room=False)
        except NoRouteError:
            raise roomy from None  # it names the full nodes too


def _find_route(
    state: SwarmState,
    max_length: int,
    exclude: Collection[str],
    recent: Mapping[str, int],
    policy: RoutingPolicy,
    *,
    need_room: bool,
) -> tuple[Span, ...]:
    L = state.num_layers
    usable, skipped = _usable(state, exclude, max_length, need_room)
    # Of the nodes serving the same range only the cheapest can be on the best route,
    # so the search runs over distinct ranges (tens, even with thousands of nodes).
    cheapest: dict[tuple[int, int], tuple[float, str, NodeView]] = {}
    for v in usable:
        r = v.serving
        assert r is not None
        entry = (seconds_per_layer(v, recent.get(v.node_id, 0), policy), v.node_id, v)
        key = (r.start, r.end)
        if key not in cheapest or entry[:2] < cheapest[key][:2]:
            cheapest[key] = entry
    spans = _search(L, cheapest, policy)
    if spans is None:
        hosted = [False] * L
        for v in usable:
            r = v.serving
            assert r is not None
            for layer in range(r.start, r.end):
                hosted[layer] = True
        uncovered = runs(not h for h in hosted)
        reasons = "; ".join(f"{why}: {', '.join(ids)}" for why, ids in skipped.items() if ids)
        raise NoRouteError(
            f"no route for model {state.model!r}: no usable node hosts layers "
            f"{format_ranges(uncovered)}" + (f" (skipped {reasons})" if reasons else ""),
            uncovered,
        )
    return spans


def _search(
    L: int, cheapest: Mapping[tuple[int, int], tuple[float, str, NodeView]], policy: RoutingPolicy
) -> tuple[Span, ...] | None:
    """Dijkstra over boundary positions, one candidate per distinct range; ties go to
    fewer hops, then smaller node ids. ``None`` when ``[0, L)`` cannot be chained."""
    points = sorted({0, L} | {p for key in cheapest for p in key})
    by_start = sorted(cheapest.items())
    Key = tuple[float, int, tuple[str, ...]]
    best: dict[int, Key] = {0: (0.0, 0, ())}
    back: dict[int, tuple[int, NodeView]] = {}
    heap: list[tuple[Key, int]] = [((0.0, 0, ()), 0)]
    done: set[int] = set()
    while heap:
        key, pos = heapq.heappop(heap)
        if pos in done or key != best.get(pos):
            continue
        done.add(pos)
        if pos == L:
            break
        cost, hops, ids = key
        for (start, end), (per_layer, node_id, view) in by_start:
            if start > pos:
                break
            if pos >= end:
                continue
            for q in points:
                if pos < q <= end:
                    new: Key = (cost + policy.hop_latency_s + (q - pos) * per_layer, hops + 1, ids + (node_id,))
                    if q not in best or new < best[q]:
                        best[q] = new
                        back[q] = (pos, view)
                        heapq.heappush(heap, (new, q))
    if L not in done:
        return None
    spans: list[Span] = []
    pos = L
    while pos != 0:
        prev, view = back[pos]
        spans.append(Span(view.node_id, view.address, prev, pos))
        pos = prev
    return tuple(reversed(spans))


class RouteIndex:
    """Routing over one snapshot, with the per-node work done once per snapshot.

    The ready nodes of the state's model are grouped by served range and sorted by their
    cost with no recent sessions; a request then scans each group only until no later
    node can be cheaper (recent sessions only add cost), skipping excluded and full
    nodes, so a route costs about one look per distinct range instead of one per node.
    Same answers as :func:`find_route` (which it falls back on to explain a failure).
    """

    def __init__(self, state: SwarmState, policy: RoutingPolicy = RoutingPolicy()) -> None:
        self.state = state
        self.policy = policy
        groups: dict[tuple[int, int], list[tuple[float, str, NodeView]]] = {}
        for view in state.nodes.values():
            r = view.serving
            if r is None or not state.serves_model(view) or r.end > state.num_layers:
                continue
            groups.setdefault((r.start, r.end), []).append((seconds_per_layer(view, 0, policy), view.node_id, view))
        for members in groups.values():
            members.sort(key=lambda m: (m[0], m[1]))
        self._groups = groups

    def route(
        self, *, max_length: int = 1, exclude: Collection[str] = frozenset(), recent: Mapping[str, int] | None = None
    ) -> tuple[Span, ...]:
        recent = recent or {}
        for need_room in (True, False):
            cheapest: dict[tuple[int, int], tuple[float, str, NodeView]] = {}
            for key, members in self._groups.items():
                pick: tuple[float, str, NodeView] | None = None
                for base, node_id, view in members:
                    if pick is not None and (base, node_id) >= pick[:2]:
                        break  # sorted by cost with no recent sessions: nothing later is cheaper
                    if node_id in exclude or (need_room and not has_room(view, max_length)):
                        continue
                    cost = seconds_per_layer(view, recent.get(node_id, 0), self.policy) if node_id in recent else base
                    if pick is None or (cost, node_id) < pick[:2]:
                        pick = (cost, node_id, view)
                if pick is not None:
                    cheapest[key] = pick
            spans = _search(self.state.num_layers, cheapest, self.policy)
            if spans is not None:
                return spans
        # no route: the full search says why, naming the skipped nodes
        return find_route(self.state, max_length=max_length, exclude=exclude, recent=recent, policy=self.policy)


def route_latency(
    state: SwarmState,
    spans: Iterable[Span],
    *,
    recent: Mapping[str, int] | None = None,
    policy: RoutingPolicy = RoutingPolicy(),
) -> float:
    """Estimated seconds per decode step along ``spans`` (K spans cost K+1 hops)."""
    recent = recent or {}
    total = policy.hop_latency_s
    for span in spans:
        view = state.nodes[span.node_id]
        total += policy.hop_latency_s + (span.end - span.start) * seconds_per_layer(
            view, recent.get(span.node_id, 0), policy
        )
    return total


class RecentRoutes:
    """Sessions routed through each node within the last ``window_s`` seconds.

    The counts are kept up to date as routes are recorded and expire, so reading them
    costs nothing per route given. The caller owns the clock (``now``), so this stays
    deterministic in tests; the log holds at most ``max_routes`` routes (the oldest go
    first), so a flood of requests cannot grow it without bound.
    """

    def __init__(self, window_s: float = 10.0, max_routes: int = 100_000) -> None:
        self.window_s = window_s
        self.max_routes = max_routes
        self._log: deque[tuple[float, tuple[str, ...]]] = deque()
        self._counts: dict[str, int] = {}

    def record(self, spans: Iterable[Span], now: float) -> None:
        ids = tuple(s.node_id for s in spans)
        self._log.append((now, ids))
        for node_id in ids:
            self._counts[node_id] = self._counts.get(node_id, 0) + 1
        while len(self._log) > self.max_routes:
            self._drop()

    def _drop(self) -> None:
        _, ids = self._log.popleft()
        for node_id in ids:
            left = self._counts[node_id] - 1
            if left:
                self._counts[node_id] = left
            else:
                del self._counts[node_id]

    def counts(self, now: float) -> Mapping[str, int]:
        while self._log and self._log[0][0] < now - self.window_s:
            self._drop()
        return self._counts
