"""Routes: the chain of nodes a session's activations flow through, chosen from state.

A route is a tuple of :class:`Span` covering layers ``[0, L)`` in order. :func:`find_route`
picks the chain with the lowest estimated latency per token: every span costs the
one-way delay of the link into it (client -> head, node -> successor) plus ``layers *
seconds_per_layer`` on its node, and the tail's link back to the client is added
(:class:`LinkDelays`: measured round trips / 2, nodes' from their load reports, the
client's from the route request; ``hop_latency_s`` where unmeasured), where a node's seconds per layer is
``1 / speed`` stretched by its load (queued steps, active sessions) and by the sessions
this coordinator routed through it recently (load reports lag by a couple of seconds,
so the recent count is what spreads a burst of sessions over replicas).

Only nodes that are ready, serve the state's model and are not in ``exclude`` are used;
among them, nodes whose last load report shows KV room for ``max_length`` tokens and a
free session are preferred: full nodes are used only when no route exists without them
(their reports lag by a couple of seconds; the node's own admission decides, and a
full one answers "busy", which clients wait on). A span may use part of a node's range.

The search is a shortest path over (layer boundary, node that ends there): a link's
delay depends on both its ends. Switching nodes only pays off at the start or end of
some node's range (cost is linear in the switch point between two such boundaries), so
those are the only positions searched. Of the nodes serving the same range only the
cheapest can be on the best route when no link is measured; when links are, the few
cheapest of each range are searched (``MAX_LINK_CANDIDATES``, fewer when there are many
ranges: a near replica may beat a faster far one).
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from swarm_coordinator.errors import NoRouteError, format_ranges
from swarm_coordinator.state import NodeView, SwarmState, runs

__all__ = ["LinkDelays", "RecentRoutes", "RouteIndex", "RoutingPolicy", "Span", "find_route", "has_room", "route_latency", "seconds_per_layer"]


MAX_LINK_CANDIDATES = 8  # nodes per distinct range searched when link delays are known ...
MAX_LINK_CANDIDATES_TOTAL = 64  # ... and over all ranges (a swarm of many ranges gets fewer per range)

Candidate = tuple[float, str, NodeView]  # (seconds per layer, node id, view)


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
    client_rtts: Mapping[str, float] | None = None,
) -> tuple[Span, ...]:
    """The lowest-latency chain covering ``[0, L)``; raises :class:`NoRouteError`.

    ``max_length`` is the session's KV length in tokens; ``exclude`` holds nodes the
    caller saw fail (backoff is the caller's business); ``recent`` counts sessions
    routed through each node lately (see :class:`RecentRoutes`); ``client_rtts`` holds
    the round trips the client measured to nodes (seconds; the head's and the tail's
    links to the client count).
    """
    links = LinkDelays.of(state, policy).with_client(client_rtts or {})
    try:
        return _find_route(state, max_length, exclude, recent or {}, policy, links, need_room=True)
    except NoRouteError as roomy:
        # Nothing with room (as last reported): the nodes themselves decide, "busy" or not.
        try:
            return _find_route(state, max_length, exclude, recent or {}, policy, links, need_room=False)
        except NoRouteError:
            raise roomy from None  # it names the full nodes too


def _find_route(
    state: SwarmState,
    max_length: int,
    exclude: Collection[str],
    recent: Mapping[str, int],
    policy: RoutingPolicy,
    links: LinkDelays,
    *,
    need_room: bool,
) -> tuple[Span, ...]:
    L = state.num_layers
    usable, skipped = _usable(state, exclude, max_length, need_room)
    # Of the nodes serving the same range only the cheapest few can be on the best
    # route, so the search runs over distinct ranges (tens, even with thousands of nodes).
    groups: dict[tuple[int, int], list[Candidate]] = {}
    for v in usable:
        r = v.serving
        assert r is not None
        groups.setdefault((r.start, r.end), []).append((seconds_per_layer(v, recent.get(v.node_id, 0), policy), v.node_id, v))
    keep = links.candidates_per_range(len(groups))
    cheapest = {key: sorted(members, key=lambda m: m[:2])[:keep] for key, members in groups.items()}
    spans = _search(L, cheapest, links)
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


def _search(L: int, candidates: Mapping[tuple[int, int], Sequence[Candidate]], links: LinkDelays) -> tuple[Span, ...] | None:
    """Dijkstra over (boundary position, node that ends there), a few candidates per
    distinct range; ties go to fewer hops, then smaller node ids. ``None`` when ``[0, L)``
    cannot be chained.

    A span from ``pos`` can end only at the boundaries in ``(pos, end]`` of its range
    (a slice of the sorted boundaries), and the tie-break key (hops, node ids) is built
    only for a cost that can win: the search runs once per route request."""
    if not links.measured:
        return _search_unlinked(L, candidates, links.default)
    points = sorted({0, L} | {p for key in candidates for p in key})
    at = {p: i for i, p in enumerate(points)}
    by_start = sorted((start, end, at[end], members) for (start, end), members in candidates.items())
    # With no link measured every hop costs the same, and the sender does not matter:
    # the search collapses to boundary positions alone (as many states as boundaries).
    by_sender = links.measured
    hop = links.default
    Key = tuple[float, int, tuple[str, ...]]
    Node = tuple[int, str]  # (position, last node id; "" = the client, or anyone when not by_sender)
    best: dict[Node, Key] = {(0, ""): (0.0, 0, ())}
    back: dict[Node, tuple[Node, NodeView]] = {}
    heap: list[tuple[Key, Node]] = [((0.0, 0, ()), (0, ""))]
    done: set[Node] = set()
    goal: Node | None = None
    while heap:
        key, here = heapq.heappop(heap)
        if here in done or key != best.get(here):
            continue
        done.add(here)
        pos, last = here
        if pos == L:
            goal = here
            break
        cost, hops, ids = key
        first = at[pos] + 1
        for start, end, stop, members in by_start:
            if start > pos:
                break
            if pos >= end:
                continue
            ends = points[first : stop + 1]
            for per_layer, node_id, view in members:
                if node_id == last:
                    continue
                enter = links.one_way(last, node_id) if by_sender else hop
                for q in ends:
                    leave = (links.one_way(node_id, "") if by_sender else hop) if q == L else 0.0  # the tail answers the client
                    new_cost = cost + enter + (q - pos) * per_layer + leave
                    there = (q, node_id if by_sender else "")
                    old = best.get(there)
                    if old is not None and (new_cost > old[0] or (new_cost == old[0] and hops + 1 > old[1])):
                        continue
                    new: Key = (new_cost, hops + 1, ids + (node_id,))
                    if old is None or new < old:
                        best[there] = new
                        back[there] = (here, view)
                        heapq.heappush(heap, (new, there))
    if goal is None:
        return None
    spans: list[Span] = []
    node = goal
    while node[0] != 0:
        prev, view = back[node]
        spans.append(Span(view.node_id, view.address, prev[0], node[0]))
        node = prev
    return tuple(reversed(spans))


def _search_unlinked(L: int, candidates: Mapping[tuple[int, int], Sequence[Candidate]], hop: float) -> tuple[Span, ...] | None:
    """:func:`_search` when no link is measured: every hop costs ``hop``, so which node
    a span follows does not matter. One pass over the boundaries in order (every span
    goes forward): at each boundary the best way to be there (``free``, any span may end
    at any boundary) and, per node serving the next segment, the best way to be inside
    its span there (continuing its span, or entering it from ``free``). A few states per
    boundary and node instead of one relaxation per (boundary, node, reachable end):
    tens of times fewer steps on a thousand-node swarm's fragmented ranges. Same keys
    as :func:`_search` (cost, hops, node ids)."""
    # A node whose range lies within that of a node cheaper per layer (or as cheap with a
    # smaller id) can be replaced by it on any route at no loss, ties included: leave it
    # out, and its boundaries with it.
    kept: list[tuple[float, str, int, int, NodeView]] = []
    for per_layer, node_id, start, end, view in sorted(
        (per_layer, node_id, start, end, view) for (start, end), members in candidates.items() for per_layer, node_id, view in members
    ):
        if not any(s <= start and end <= e for _, _, s, e, _ in kept):
            kept.append((per_layer, node_id, start, end, view))
    points = sorted({0, L} | {p for _, _, start, end, _ in kept for p in (start, end)})
    at = {p: i for i, p in enumerate(points)}
    serving: list[list[Candidate]] = [[] for _ in points]  # segment i = [points[i], points[i + 1])
    views: dict[str, NodeView] = {}
    for per_layer, node_id, start, end, view in kept:
        for i in range(at[start], at[end]):
            serving[i].append((per_layer, node_id, view))
        views[node_id] = view
    # A state inside a span: (cost when it was entered, hop included; hops; node ids;
    # where each span starts; seconds per layer). Its cost at boundary q is computed the
    # way _search computes a span's, one product per span, so near-ties come out alike.
    State = tuple[float, int, tuple[str, ...], tuple[int, ...], float]
    inside: dict[str, State] = {}
    free: tuple[float, int, tuple[str, ...], tuple[int, ...]] | None = (0.0, 0, (), ())
    for i in range(len(points) - 1):
        pos, q = points[i], points[i + 1]
        if i:  # the best of the spans that can end here (the lowest key)
            free = None
            for entered, hops, ids, starts, per in inside.values():
                cost = entered + (pos - starts[-1]) * per
                if free is None or cost < free[0] or (cost == free[0] and (hops, ids) < (free[1], free[2])):
                    free = (cost, hops, ids, starts)
        if free is None:
            return None  # nothing reaches this boundary
        fcost, fhops, fids, fstarts = free
        nxt: dict[str, State] = {}
        enter = fcost + hop
        for per_layer, node_id, _ in serving[i]:
            here = inside.get(node_id)
            if here is not None:
                entered, hops, ids, starts, _ = here
                stay, switch = entered + (q - starts[-1]) * per_layer, enter + (q - pos) * per_layer
                if stay < switch or (stay == switch and (hops, ids) <= (fhops + 1, fids + (node_id,))):
                    nxt[node_id] = here
                    continue
            nxt[node_id] = (enter, fhops + 1, fids + (node_id,), fstarts + (pos,), per_layer)
        inside = nxt
    if not inside:
        return None
    _, _, ids, starts = min(
        (entered + (L - starts[-1]) * per + hop, hops, ids, starts) for entered, hops, ids, starts, per in inside.values()
    )
    ends = (*starts[1:], L)
    return tuple(Span(n, views[n].address, a, b) for n, a, b in zip(ids, starts, ends, strict=True))


class RouteIndex:
    """Routing over one snapshot, with the per-node work done once per snapshot.

    The ready nodes of the state's model are grouped by served range and sorted by their
    cost under the recent-session counts of the moment the index is built (``recent``,
    copied). A request then takes, per group, the cheapest few of the nodes whose count
    has not changed since (their cost is the sorted one) and weighs the changed ones
    (the few routed through or expired since: tens, against hundreds of nodes) one by
    one, so a route costs about one look per distinct range plus one per changed node
    instead of one per node. Excluded and full nodes are skipped. Same answers as
    :func:`find_route` (which it falls back on to explain a failure). The nodes' link
    delays are gathered once per snapshot too.
    """

    def __init__(
        self,
        state: SwarmState,
        policy: RoutingPolicy = RoutingPolicy(),
        recent: Mapping[str, int] | None = None,
        *,
        previous: RouteIndex | None = None,
    ) -> None:
        """``previous``: the index of an earlier snapshot; only the nodes whose view
        (the registry reuses a node's view until a message of that node arrives) or
        recent count differ are regrouped, the rest of its sorted groups is kept."""
        self.state = state
        self.policy = policy
        self.links = LinkDelays.of(state, policy)
        self._recent = dict(recent or {})  # the counts the order below was computed with
        if previous is not None and previous.policy == policy and previous.state.num_layers == state.num_layers:
            updated = self._update(previous)
            if updated is not None:
                self._groups, self._group_of = updated
                return
        groups: dict[tuple[int, int], list[Candidate]] = {}
        self._group_of: dict[str, tuple[int, int]] = {}
        for view in state.nodes.values():
            entry = self._entry(view)
            if entry is not None:
                groups.setdefault(entry[0], []).append(entry[1])
                self._group_of[view.node_id] = entry[0]
        for members in groups.values():
            members.sort(key=lambda m: (m[0], m[1]))
        self._groups = groups

    def _entry(self, view: NodeView) -> tuple[tuple[int, int], Candidate] | None:
        """The group and sort entry of a node, ``None`` when it cannot be on a route."""
        r = view.serving
        if r is None or not self.state.serves_model(view) or r.end > self.state.num_layers:
            return None
        return (r.start, r.end), (seconds_per_layer(view, self._recent.get(view.node_id, 0), self.policy), view.node_id, view)

    def _update(
        self, previous: RouteIndex
    ) -> tuple[dict[tuple[int, int], list[Candidate]], dict[str, tuple[int, int]]] | None:
        """``previous``'s groups with the changed nodes regrouped; ``None`` when so many
        changed that building afresh is cheaper."""
        before, now = previous.state.nodes, self.state.nodes
        then, counts = previous._recent, self._recent
        dirty = {node_id for node_id, view in now.items() if before.get(node_id) is not view}
        dirty.update(before.keys() - now.keys())
        dirty.update(k for k, v in counts.items() if then.get(k) != v)
        dirty.update(then.keys() - counts.keys())
        if 8 * len(dirty) > len(now):
            return None
        groups = dict(previous._groups)  # lists copied only where they change
        group_of = dict(previous._group_of)
        copied: set[tuple[int, int]] = set()

        def members_of(key: tuple[int, int]) -> list[Candidate]:
            if key not in copied:
                groups[key] = list(groups.get(key, ()))
                copied.add(key)
            return groups[key]

        for node_id in dirty:
            old = group_of.pop(node_id, None)
            if old is not None:
                members = members_of(old)
                members[:] = [m for m in members if m[1] != node_id]
                if not members:
                    del groups[old]
                    copied.discard(old)
            view = now.get(node_id)
            entry = self._entry(view) if view is not None else None
            if entry is not None:
                bisect.insort(members_of(entry[0]), entry[1], key=lambda m: (m[0], m[1]))
                group_of[node_id] = entry[0]
        return groups, group_of

    def _changed(self, recent: Mapping[str, int]) -> tuple[set[str], dict[tuple[int, int], list[NodeView]]]:
        """The nodes whose recent-session count differs from the index's, and the indexed
        ones among them by group."""
        then = self._recent
        changed = {k for k, v in recent.items() if then.get(k) != v}
        changed.update(then.keys() - recent.keys())
        by_group: dict[tuple[int, int], list[NodeView]] = {}
        for node_id in changed:
            key = self._group_of.get(node_id)
            if key is not None:
                by_group.setdefault(key, []).append(self.state.nodes[node_id])
        return changed, by_group

    def route(
        self, *, max_length: int = 1, exclude: Collection[str] = frozenset(), recent: Mapping[str, int] | None = None,
        client_rtts: Mapping[str, float] | None = None,
    ) -> tuple[Span, ...]:
        recent = recent or {}
        links = self.links.with_client(client_rtts or {})
        keep = links.candidates_per_range(len(self._groups))
        changed, moved_by_group = self._changed(recent)
        for need_room in (True, False):
            cheapest: dict[tuple[int, int], list[Candidate]] = {}
            for key, members in self._groups.items():
                moved = moved_by_group.get(key, ())
                picks: list[Candidate] = []  # the `keep` cheapest unchanged nodes, in order
                for member in members:
                    node_id, view = member[1], member[2]
                    if node_id in exclude or (moved and node_id in changed) or (need_room and not has_room(view, max_length)):
                        continue
                    picks.append(member)
                    if len(picks) >= keep:
                        break
                if moved:
                    for view in moved:
                        if view.node_id in exclude or (need_room and not has_room(view, max_length)):
                            continue
                        picks.append((seconds_per_layer(view, recent.get(view.node_id, 0), self.policy), view.node_id, view))
                    picks.sort(key=lambda m: m[:2])
                    del picks[keep:]
                if picks:
                    cheapest[key] = picks
            spans = _search(self.state.num_layers, cheapest, links)
            if spans is not None:
                return spans
        # no route: the full search says why, naming the skipped nodes
        return find_route(
            self.state, max_length=max_length, exclude=exclude, recent=recent, policy=self.policy,
            client_rtts=client_rtts,
        )


def route_latency(
    state: SwarmState,
    spans: Iterable[Span],
    *,
    recent: Mapping[str, int] | None = None,
    policy: RoutingPolicy = RoutingPolicy(),
    client_rtts: Mapping[str, float] | None = None,
    links: LinkDelays | None = None,
) -> float:
    """Estimated seconds per decode step along ``spans`` (K spans cost K+1 hops, each
    its link's one-way delay where measured, ``hop_latency_s`` where not)."""
    recent = recent or {}
    links = (links or LinkDelays.of(state, policy)).with_client(client_rtts or {})
    total, last = 0.0, ""
    for span in spans:
        view = state.nodes[span.node_id]
        total += links.one_way(last, span.node_id) + (span.end - span.start) * seconds_per_layer(
            view, recent.get(span.node_id, 0), policy
        )
        last = span.node_id
    return total + links.one_way(last, "")


class LinkDelays:
    """One-way delays between the parties of a route, from measured round trips.

    Node ``a`` to node ``b``: half the round trip ``a`` reported to ``b`` (or ``b`` to
    ``a``: links are taken as symmetric); client to node and back: half the round trip
    the client measured (``""`` names the client). An unmeasured link costs
    ``policy.hop_latency_s``, the cost of a traversal on a fast local network. The
    nodes' part is gathered once per state (:meth:`of`); :meth:`with_client` adds a
    request's figures without copying it.
    """

    def __init__(self, peers: Mapping[tuple[str, str], float], client: Mapping[str, float], default: float) -> None:
        self.peers = peers
        self.client = client
        self.default = default

    @classmethod
    def of(cls, state: SwarmState, policy: RoutingPolicy = RoutingPolicy()) -> LinkDelays:
        peers: dict[tuple[str, str], float] = {}
        for view in state.nodes.values():
            if view.load is not None:
                for peer in view.load.peer_rtts:
                    peers[(view.node_id, peer.node_id)] = peer.rtt_s
        return cls(peers, {}, policy.hop_latency_s)

    def with_client(self, client_rtts: Mapping[str, float]) -> LinkDelays:
        return LinkDelays(self.peers, client_rtts, self.default) if client_rtts else self

    @property
    def measured(self) -> bool:
        return bool(self.peers or self.client)

    def candidates_per_range(self, ranges: int) -> int:
        """Without measured links the cheapest node of a range is the only candidate;
        with them a few, within a total that keeps the search small on big swarms."""
        if not self.measured:
            return 1
        return max(1, min(MAX_LINK_CANDIDATES, MAX_LINK_CANDIDATES_TOTAL // max(1, ranges)))

    def rtt(self, a: str, b: str) -> float | None:
        if not a or not b:
            return self.client.get(a or b)
        got = self.peers.get((a, b))
        return got if got is not None else self.peers.get((b, a))

    def one_way(self, a: str, b: str) -> float:
        rtt = self.rtt(a, b)
        return self.default if rtt is None else max(rtt / 2, self.default / 2)


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
