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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from swarm_coordinator.assignment import AssignmentPolicy, eligible, estimate_throughput, plan
from swarm_coordinator.errors import CoverageError
from swarm_coordinator.registry import Registry
from swarm_coordinator.state import Assignment, SwarmState

log = logging.getLogger(__name__)

__all__ = ["Planner", "decide"]


def decide(state: SwarmState, policy: AssignmentPolicy = AssignmentPolicy()) -> Assignment | None:
    """The assignment to publish for ``state`` (pure); ``None`` when no node can take layers.

    When the nodes cannot hold the whole model, the best partial assignment is returned:
    nodes start loading what they can while more nodes join.
    """
    planned = replace(state, nodes={k: v for k, v in state.nodes.items() if not v.status.pinned})
    if not eligible(planned):
        return None
    try:
        return plan(planned, planned.current_assignment(), policy)
    except CoverageError as exc:
        log.warning("%s", exc)
        return exc.partial


class Planner:
    """Runs :func:`decide` on registry changes and publishes the result."""

    def __init__(self, registry: Registry, policy: AssignmentPolicy = AssignmentPolicy(), *, settle: float = 1.0) -> None:
        self.registry = registry
        self.policy = policy
        self.settle = settle
        self.plans = 0  # plans that changed something (tests, metrics)
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
        assignment = decide(state, self.policy)
        if assignment is None:
            return {}
        changes = await self.registry.publish_assignment(assignment)
        if changes:
            self.plans += 1
            covered = assignment.covers(state.num_layers)
            log.info(
                "assignment %s: %s (%s, estimated %.1f tokens/s)",
                self.registry.epoch,
                ", ".join(f"{n}: {r}" for n, r in assignment.items()),
                "covered" if covered else f"uncovered {assignment.uncovered(state.num_layers)}",
                estimate_throughput(state, assignment) if covered else 0.0,
            )
        return dict(changes)

    async def _run(self) -> None:
        # Let the retained messages of a running swarm arrive before the first plan.
        await asyncio.sleep(self.settle)
        changes = self.registry.changes()
        while True:
            try:
                await self.replan()
            except Exception:  # a planning bug must not stop the coordinator; the next change retries
                log.exception("planning failed")
            await changes.__anext__()
            await asyncio.sleep(self.settle)
