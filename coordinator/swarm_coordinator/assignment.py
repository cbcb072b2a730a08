"""Which node hosts which layers: a pure function of the swarm state.

The throughput model: a node of speed ``s`` (layer-steps/s) hosting ``n`` layers passes
about ``s / n`` tokens per second through each of its layers. A layer's throughput is the
sum over the nodes hosting it, and the swarm's is that of its weakest layer (sessions are
spread over replicas by routing).

:func:`propose` builds a fresh assignment: eligible nodes are dealt into ``replicas``
chains (fewer when memory is short), each able to hold the whole model; within a chain
the layers are shared in proportion to speed, capped by each node's memory budget
(water-filling), and laid end to end. Nodes not needed by the chains become partial
replicas where they raise the weakest layers most. Splitting in proportion to speed
balances each chain's stages; where memory does not bind, every layer then passes
``sum(speed) / L`` tokens/s, the most the swarm's compute allows.

:func:`plan` is what the coordinator calls: it keeps the current assignment where it still
works, repairs holes left by nodes that went away by extending survivors or using idle
nodes, places newcomers where they add the most, and only switches to a fresh proposal
when that is better by more than ``min_gain`` (hysteresis) or restores coverage or
replicas that the incremental plan cannot.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm_coordinator.errors import CoverageError, format_ranges
from swarm_coordinator.state import Assignment, LayerRange, NodeState, NodeView, SwarmState

__all__ = [
    "AssignmentPolicy",
    "eligible",
    "estimate_throughput",
    "layer_throughput",
    "plan",
    "propose",
    "shares",
]

_EPS = 1e-9


@dataclass(frozen=True)
class AssignmentPolicy:
    replicas: int = 1  # copies of each layer wanted, where memory allows
    min_gain: float = 0.2  # a working swarm is reshuffled only for more than this gain
    replica_floor: int = 2  # below this many copies a fresh proposal wins outright; above, only by min_gain

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.min_gain < 0 or self.replica_floor < 1:
            raise ValueError("replicas and replica_floor must be >= 1 and min_gain >= 0")


def eligible(state: SwarmState) -> tuple[NodeView, ...]:
    """Nodes that may be given layers: online, not draining, right model, room for a layer."""
    return tuple(
        v
        for v in state.nodes.values()
        if v.online
        and v.status.state is not NodeState.DRAINING
        and state.serves_model(v)
        and v.capacity(state.bytes_per_layer) >= 1
    )


def _speeds(nodes: Sequence[NodeView]) -> dict[str, float]:
    """Measured speeds; a node that has not measured yet counts as a typical one."""
    known = [v.speed for v in nodes if v.speed > 0]
    fallback = statistics.median(known) if known else 1.0
    return {v.node_id: v.speed if v.speed > 0 else fallback for v in nodes}


def layer_throughput(state: SwarmState, assignment: Assignment) -> tuple[float, ...]:
    """Estimated tokens/s each layer can pass (nodes unknown to ``state`` add nothing)."""
    speeds = _speeds(state.online())
    thr = [0.0] * state.num_layers
    for node_id, r in assignment.items():
        speed = speeds.get(node_id, 0.0)
        for layer in range(r.start, min(r.end, state.num_layers)):
            thr[layer] += speed / len(r)
    return tuple(thr)


def estimate_throughput(state: SwarmState, assignment: Assignment) -> float:
    """Tokens/s the swarm could sustain with ``assignment`` (0 if a layer is uncovered)."""
    return min(layer_throughput(state, assignment))


def shares(speeds: Mapping[str, float], caps: Mapping[str, int], total: int) -> dict[str, int]:
    """Split ``total`` layers in proportion to speed, no node above its cap
    (water-filling, then rounding that keeps the slowest stage fastest); nodes whose share rounds to 0 are left out."""
    target = min(total, sum(caps.values()))
    exact: dict[str, float] = {}
    free = set(caps)
    left = float(target)
    while free:  # cap the nodes that would overflow, share the rest among the others
        weight = sum(speeds[n] for n in free)
        over = {n for n in free if left * speeds[n] / weight >= caps[n]}
        if not over:
            exact.update({n: left * speeds[n] / weight for n in free})
            break
        for n in over:
            exact[n] = caps[n]
            left -= caps[n]
        free -= over
    out = {n: int(x + _EPS) for n, x in exact.items()}
    for _ in range(target - sum(out.values())):
        # each left-over layer goes where it slows its stage least: the bottleneck
        # max(n / speed) stays as low as integers allow
        n = min((n for n in out if out[n] < caps[n]), key=lambda n: ((out[n] + 1) / speeds[n], n))
        out[n] += 1
    return {n: k for n, k in out.items() if k > 0}


def _chains(
    nodes: Sequence[NodeView], caps: Mapping[str, int], speeds: Mapping[str, float], L: int, replicas: int
) -> tuple[list[list[str]], list[str]]:
    """Split nodes into up to ``replicas`` chains that can each hold all ``L`` layers.

    Nodes are dealt largest memory first to the chain with the least memory until every
    chain can hold the model; later nodes join the slowest chain when all ``replicas``
    chains exist, and are left over as partial replicas when memory allowed fewer.
    """
    order = sorted(nodes, key=lambda v: (-caps[v.node_id], -speeds[v.node_id], v.node_id))
    for count in range(replicas, 0, -1):
        chains: list[list[str]] = [[] for _ in range(count)]
        room = [0] * count
        speed = [0.0] * count
        extras: list[str] = []
        for v in order:
            short = [i for i in range(count) if room[i] < L]
            if short:
                i = min(short, key=lambda i: (room[i], speed[i], i))
            elif count == replicas:
                i = min(range(count), key=lambda i: (speed[i], i))
            else:
                extras.append(v.node_id)
                continue
            chains[i].append(v.node_id)
            room[i] += caps[v.node_id]
            speed[i] += speeds[v.node_id]
        if min(room) >= L or count == 1:
            return chains, extras
    raise AssertionError("unreachable")


def propose(state: SwarmState, policy: AssignmentPolicy = AssignmentPolicy()) -> Assignment:
    """A fresh assignment, ignoring what nodes host now.

    Nodes are grouped into ``replicas`` chains (fewer when memory is short); each chain
    splits the layers among its nodes in proportion to speed within their budgets and
    lays them end to end. Nodes left over become partial replicas where they add most.
    Raises :class:`CoverageError` (with the best partial assignment) when the eligible
    nodes cannot hold every layer.
    """
    L = state.num_layers
    nodes = eligible(state)
    speeds = _speeds(nodes)
    caps = {v.node_id: min(L, v.capacity(state.bytes_per_layer)) for v in nodes}
    chains, extras = _chains(nodes, caps, speeds, L, policy.replicas)
    ranges: dict[str, LayerRange] = {}
    for chain in chains:
        sizes = shares({n: speeds[n] for n in chain}, {n: caps[n] for n in chain}, L)
        pos = 0
        for node_id in sorted(sizes, key=lambda n: (-speeds[n], n)):
            ranges[node_id] = LayerRange(pos, pos + sizes[node_id])
            pos += sizes[node_id]
    assignment = Assignment(ranges)
    by_id = {v.node_id: v for v in nodes}
    if extras:
        placer = _Placer(state, assignment, policy.replicas)
        for node_id in sorted(extras, key=lambda n: (-speeds[n], n)):
            placer.place(by_id[node_id], speeds[node_id])
        assignment = placer.a
    _check_coverage(state, assignment)
    return assignment


def _check_coverage(state: SwarmState, assignment: Assignment) -> None:
    uncovered = assignment.uncovered(state.num_layers)
    if not uncovered:
        return
    nodes = eligible(state)
    room = sum(min(state.num_layers, v.capacity(state.bytes_per_layer)) for v in nodes)
    raise CoverageError(
        f"model {state.model!r} needs {state.num_layers} layers of {state.bytes_per_layer} bytes "
        f"but the {len(nodes)} eligible node(s) can hold {room}: "
        f"layers {format_ranges(uncovered)} uncovered",
        uncovered,
        assignment,
    )


# ---------------------------------------------------------------------------
# Incremental planning
# ---------------------------------------------------------------------------


def _score(state: SwarmState, a: Assignment, replicas: int) -> tuple[bool, int, float]:
    counts = a.coverage(state.num_layers)
    covered = min(counts, default=0) > 0
    return covered, min(min(counts, default=0), replicas), estimate_throughput(state, a) if covered else 0.0


def _prefix_min(values: Sequence[float]) -> list[float]:
    """``out[i]`` is ``min(values[:i])`` (infinite for ``i == 0``)."""
    out, low = [float("inf")], float("inf")
    for v in values:
        low = min(low, v)
        out.append(low)
    return out


class _Placer:
    """Places idle nodes one after another, keeping per-layer replica counts and
    throughput up to date instead of recomputing them from the whole assignment."""

    def __init__(self, state: SwarmState, a: Assignment, replicas: int) -> None:
        self.state = state
        self.a = a
        self.replicas = replicas
        self.counts = list(a.coverage(state.num_layers))
        self.thr = list(layer_throughput(state, a))

    def place(self, node: NodeView, speed: float) -> LayerRange:
        r = _best_window(self.state, node, speed, self.replicas, self.counts, self.thr)
        self.a = self.a.with_range(node.node_id, r)
        for layer in range(r.start, r.end):
            self.counts[layer] += 1
            self.thr[layer] += speed / len(r)
        return r


def _place_best(state: SwarmState, a: Assignment, node: NodeView, speed: float, replicas: int) -> Assignment:
    """Give an idle node the window that most raises (replica level, weakest layer),
    then covers the most of the current weakest layers, then is largest."""
    placer = _Placer(state, a, replicas)
    placer.place(node, speed)
    return placer.a


def _best_window(
    state: SwarmState, node: NodeView, speed: float, replicas: int, coverage: Sequence[int], thr: Sequence[float]
) -> LayerRange:
    L = state.num_layers
    cap = min(L, node.capacity(state.bytes_per_layer))
    counts = [float(min(c, replicas)) for c in coverage]
    # the minimum outside a window [start, end) is min(before start, from end on)
    count_before, thr_before = _prefix_min(counts), _prefix_min(thr)
    count_after, thr_after = _prefix_min(counts[::-1])[::-1], _prefix_min(thr[::-1])[::-1]
    weakest = min(thr)
    at_weakest = [0]  # prefix counts of layers at the weakest throughput
    for x in thr:
        at_weakest.append(at_weakest[-1] + (x <= weakest * (1 + _EPS) + _EPS))
    top = float(replicas)
    best_key: tuple[float, int, int, int, int] | None = None
    best_at = (0, 0)
    for start in range(L):
        count_in = thr_in = float("inf")  # minimum inside [start, end), grown one layer at a time
        c_before, t_before = count_before[start], thr_before[start]
        for end in range(start + 1, min(L, start + cap) + 1):
            size = end - start
            c, t = counts[end - 1], thr[end - 1]
            count_in = min(count_in, c)
            thr_in = min(thr_in, t)
            rep = min(c_before, count_after[end], min(count_in + 1, top))
            low = min(t_before, thr_after[end], thr_in + speed / size)
            key = (rep, int(low * 1e9 + 0.5), at_weakest[end] - at_weakest[start], size, -start)  # low to 1e-9
            if best_key is None or key > best_key:
                best_key, best_at = key, (start, end)
    assert best_key is not None
    return LayerRange(*best_at)


def _repair(
    state: SwarmState, a: Assignment, nodes: Sequence[NodeView], speeds: dict[str, float], need: int = 1
) -> Assignment | None:
    """Bring every layer to ``need`` copies (1: cover the holes) by growing survivors'
    ranges or using idle nodes, one move at a time; ``None`` if not possible."""
    L = state.num_layers
    while True:
        counts = a.coverage(L)
        if min(counts) >= need:
            return a
        holes = [0]  # holes[i]: layers short of copies below i
        for c in counts:
            holes.append(holes[-1] + (c < need))
        best: tuple[tuple[int, int, float, str], str, LayerRange] | None = None
        for v in nodes:
            cap = min(L, v.capacity(state.bytes_per_layer))
            cur = a.get(v.node_id)
            lo_range = range(L) if cur is None else range(cur.start + 1)
            own = holes[cur.end] - holes[cur.start] if cur is not None else 0  # no new copy where it is already
            for lo in lo_range:
                min_hi = lo + 1 if cur is None else cur.end
                for hi in range(max(min_hi, lo + 1), min(L, lo + cap) + 1):
                    gained = holes[hi] - holes[lo] - own
                    if gained <= 0:
                        continue
                    added = (hi - lo) - (len(cur) if cur else 0)
                    key = (gained, -added, speeds[v.node_id], v.node_id)
                    if best is None or key > best[0]:
                        best = (key, v.node_id, LayerRange(lo, hi))
        if best is None:
            return None
        a = a.with_range(best[1], best[2])


def plan(
    state: SwarmState,
    current: Assignment | None = None,
    policy: AssignmentPolicy = AssignmentPolicy(),
    *,
    full: bool = True,
) -> Assignment:
    """The assignment the swarm should move to, given what it has now.

    ``current`` defaults to ``state.current_assignment()``. With ``full=False`` the plan
    is incremental: survivors keep their ranges, holes are repaired and newcomers
    placed, and a fresh :func:`propose` is computed only when that cannot cover the
    model (a large swarm plans this way on every change, and in full now and then).
    Raises :class:`CoverageError` when no assignment can cover the model.
    """
    if current is None:
        current = state.current_assignment()
    L = state.num_layers
    nodes = eligible(state)
    speeds = _speeds(nodes)
    by_id = {v.node_id: v for v in nodes}
    kept = Assignment(
        {
            n: r
            for n, r in current.items()
            if n in by_id and r.end <= L and len(r) <= by_id[n].capacity(state.bytes_per_layer)
        }
    )
    base = _repair(state, kept, nodes, speeds) if kept else None
    if base is None:
        return propose(state, policy)  # raises CoverageError when nothing can cover
    newcomers = sorted((v for v in nodes if v.node_id not in base), key=lambda v: (-speeds[v.node_id], v.node_id))
    if newcomers:
        placer = _Placer(state, base, policy.replicas)
        for v in newcomers:
            placer.place(v, speeds[v.node_id])
        base = placer.a
    floor = min(policy.replicas, policy.replica_floor)
    if not full:
        if base.replicas(L) < floor:  # grow survivors back to the floor before reshuffling anyone
            base = _repair(state, base, nodes, speeds, need=floor) or base
        if base.replicas(L) >= floor:
            return base
    proposal = propose(state, policy)
    covered_b, rep_b, thr_b = _score(state, base, floor)
    covered_p, rep_p, thr_p = _score(state, proposal, floor)
    if (covered_p, rep_p) > (covered_b, rep_b):
        return proposal
    if (covered_p, rep_p) == (covered_b, rep_b) and thr_p > thr_b * (1 + policy.min_gain):
        return proposal
    return base
