"""The assignment loop: every change in the registry may move layers between nodes.

::

    async for state in registry.changes():
        assignment = plan(state)            # pure (swarm_coordinator.assignment)
        await registry.publish_assignment(assignment)   # retained assign/<id>

Changes are gathered for ``settle`` seconds before planning, so that a burst of joins
(or the retained messages a restarted coordinator receives) becomes one plan rather
than a plan per message. :func:`plan` itself keeps what works and applies hysteresis,
so planning on every change (load reports included) is idempotent.

Pinned nodes (``swarm-node --layers``) are left out of planning: they serve what their
operator chose and never get an assignment; routing still uses them.

At scale (see docs/scale.md): plans are incremental (survivors keep their ranges, holes
are repaired, newcomers placed) and a whole-swarm proposal is weighed only every
``rebalance_interval`` seconds; load reports do not wake the planner (only statuses,
timeouts and assignments do); and each node may be moved off a range it hosts at most
``reload_budget`` times per ``reload_window`` seconds (:class:`ReloadBudget`), unless
keeping it would leave a layer uncovered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import replace

from swarm_coordinator.assignment import AssignmentPolicy, eligible, estimate_throughput, plan
from swarm_coordinator.errors import CoverageError
from swarm_coordinator.registry import Registry
from swarm_coordinator.state import Assignment, SwarmState

log = logging.getLogger(__name__)

__all__ = ["Planner", "ReloadBudget", "decide"]


class ReloadBudget:
    """How often each node was moved off a range it hosted, within a sliding window.

    Keyed by node ids of the registry; :meth:`prune` drops nodes that are gone, and each
    node keeps at most ``budget`` timestamps, so the table stays bounded.
    """

    def __init__(self, budget: int = 2, window_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.window_s = window_s
        self._clock = clock
        self._moves: dict[str, deque[float]] = {}

    def exhausted(self, node_id: str) -> bool:
        moves = self._moves.get(node_id)
        if not moves:
            return False
        now = self._clock()
        while moves and moves[0] <= now - self.window_s:
            moves.popleft()
        return len(moves) >= self.budget

    def record(self, node_id: str) -> None:
        self._moves.setdefault(node_id, deque(maxlen=max(1, self.budget))).append(self._clock())

    def prune(self, known: Collection[str]) -> None:
        for node_id in [n for n in self._moves if n not in known]:
            del self._moves[node_id]


def decide(
    state: SwarmState,
    policy: AssignmentPolicy = AssignmentPolicy(),
    *,
    full: bool = True,
    budget: ReloadBudget | None = None,
) -> Assignment | None:
    """The assignment to publish for ``state``; ``None`` when no node can take layers.

    When the nodes cannot hold the whole model, the best partial assignment is returned:
    nodes start loading what they can while more nodes join. With a ``budget``, nodes
    that used theirs keep their current range unless that would uncover a layer.
    """
    planned = replace(state, nodes={k: v for k, v in state.nodes.items() if not v.status.pinned})
    if not eligible(planned):
        return None
    current = planned.current_assignment()
    try:
        assignment = plan(planned, current, policy, full=full)
    except CoverageError as exc:
        log.warning("%s", exc)
        return exc.partial
    if budget is None:
        return assignment
    held = Assignment(
        {
            **dict(assignment.items()),
            **{n: current[n] for n, r in current.changes(assignment).items() if n in current and budget.exhausted(n)},
        }
    )
    if held != assignment and (held.covers(state.num_layers) or not assignment.covers(state.num_layers)):
        return held
    return assignment


class Planner:
    """Runs :func:`decide` on registry changes and publishes the result."""

    def __init__(
        self,
        registry: Registry,
        policy: AssignmentPolicy = AssignmentPolicy(),
        *,
        settle: float = 1.0,
        rebalance_interval: float = 60.0,
        budget: ReloadBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.settle = settle
        self.rebalance_interval = rebalance_interval
        self.budget = budget if budget is not None else ReloadBudget(clock=clock)
        self._clock = clock
        self._last_full = float("-inf")
        self.plans = 0  # plans that changed something (tests, metrics)
        self.runs = 0  # plans computed
        self.plan_seconds = 0.0  # time spent computing them (the scale bench: planner time per event)
        self.reloads = 0  # nodes moved off a range they hosted
        self.first_loads = 0  # nodes given a range while hosting none
        self.active = True  # a standby coordinator's planner waits for the lease (lease.py)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="swarm-planner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def replan(self) -> dict[str, object]:
        """Plan once from the registry's current state; returns what changed."""
        state = self.registry.state
        now = self._clock()
        full = now - self._last_full >= self.rebalance_interval
        started = time.perf_counter()
        self.budget.prune(state.nodes)
        assignment = decide(state, self.policy, full=full, budget=self.budget)
        self.plan_seconds += time.perf_counter() - started
        self.runs += 1
        if full:
            self._last_full = now
        if assignment is None:
            return {}
        current = state.current_assignment()
        changes = await self.registry.publish_assignment(assignment)
        if changes:
            self.plans += 1
            for node_id, layers in changes.items():
                if layers is None:
                    continue
                if node_id in current:
                    self.reloads += 1
                    self.budget.record(node_id)
                else:
                    self.first_loads += 1
            covered = assignment.covers(state.num_layers)
            log.info(
                "assignment %s: %d node(s) changed (%s, estimated %.1f tokens/s)",
                self.registry.epoch,
                len(changes),
                "covered" if covered else f"uncovered {assignment.uncovered(state.num_layers)}",
                estimate_throughput(state, assignment) if covered else 0.0,
            )
            log.debug("assignment %s: %s", self.registry.epoch, ", ".join(f"{n}: {r}" for n, r in changes.items()))
        return dict(changes)

    def activate(self, active: bool = True) -> None:
        """Start (or stop) publishing plans; activating plans at once."""
        self.active = active
        self._wake.set()

    async def _run(self) -> None:
        # Let the retained messages of a running swarm arrive before the first plan.
        await asyncio.sleep(self.settle)
        while True:
            changed = self.registry.membership_event
            if self.active:
                try:
                    await self.replan()
                except Exception:  # a planning bug must not stop the coordinator; the next change retries
                    log.exception("planning failed")
            waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                # the timeout: time for a full rebalance even without changes
                await asyncio.wait(waits, timeout=max(self.rebalance_interval, 0.1), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            self._wake.clear()
            await asyncio.sleep(self.settle)
