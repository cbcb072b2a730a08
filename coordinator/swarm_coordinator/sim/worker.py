"""A worker process of the scale harness: hosts a share of the simulated nodes.

``python -m swarm_coordinator.sim.worker`` reads one JSON line on stdin (``config``: a
:class:`~.harness.SimConfig` without its models, already cut to this worker's share;
``models``; ``broker``; ``index``), then commands, one JSON object a line:
``join`` (join the initial nodes), ``start`` (churn begins), ``stop`` (churn stops; the
counts are reported), ``exit`` (every node leaves; the process ends). On stdout, one JSON
object a line: ``{"joined": n[, "done": true]}``, ``{"assigned": n}`` (its nodes with an assignment,
as that changes, from ``join`` to ``start``), ``{"mask": [model, bits]}`` whenever
the layers its nodes serve change, ``{"churn": n}`` every second with churn, and
``{"stats": {...}}`` after ``stop``.

Each node keeps its own MQTT connection, Last Will and key, as in one process: only
the process they live in changes. Invariant: nothing but those JSON lines goes to stdout
(logs go to stderr).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from swarm_coordinator.sim.harness import Harness, SimConfig, SimModel, _quiet_crashes

log = logging.getLogger(__name__)


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _ticker(harness: Harness) -> None:
    while True:
        await asyncio.sleep(1.0)
        if harness._churn_now:
            _emit({"churn": harness._churn_now})
            harness._churn_now = 0


async def _report_assigned(harness: Harness) -> None:
    """During warm-up: how many of this worker's nodes have an assignment, as it changes."""
    last = -1
    while True:
        now = harness.assigned()
        if now != last:
            _emit({"assigned": now})
            last = now
        await asyncio.sleep(0.2)


async def main() -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_crashes)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    models = tuple(SimModel(**m) for m in spec["models"])
    config = SimConfig(**{**spec["config"], "models": models})
    harness = Harness(config, spec["broker"], workdir=Path("."), worker=int(spec["index"]), emit=_emit)
    ticker: asyncio.Task[None] | None = None
    placing: asyncio.Task[None] | None = None
    try:
        async for line in reader:
            command = json.loads(line)["cmd"]
            if command == "join":
                await harness.join_initial()
                _emit({"joined": len(harness.live), "done": True})
                placing = loop.create_task(_report_assigned(harness))
            elif command == "start":
                if placing is not None:
                    placing.cancel()
                harness.start_churn()
                ticker = loop.create_task(_ticker(harness))
            elif command == "stop":
                if ticker is not None:
                    ticker.cancel()
                _emit({"stats": await harness.stop_churn()})
            elif command == "exit":
                break
    finally:
        await harness.leave_all()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("swarm_proto").setLevel(logging.WARNING)
    asyncio.run(main())
