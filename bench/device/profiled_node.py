"""``swarm-node`` with cProfile switched on and off by signals, for bench/gpu_swarm.py.

    python bench/device/profiled_node.py OUT.prof -m swarm_node.cli [node flags...]

SIGUSR1 starts profiling the main thread (the event loop, where a lone session's
steps run whole); SIGUSR2 stops it and writes OUT.prof. Start-up and loading stay out.
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
from typing import Any

profile = cProfile.Profile()
out = sys.argv[1]
args = sys.argv[2:]
if args[:2] == ["-m", "swarm_node.cli"]:
    args = args[2:]
sys.argv = ["swarm-node", *args]


def _start(*_: Any) -> None:
    profile.enable()


def _stop(*_: Any) -> None:
    profile.disable()
    profile.dump_stats(out)


signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _stop)
runpy.run_module("swarm_node.cli", run_name="__main__", alter_sys=True)
