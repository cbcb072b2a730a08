"""A swarm in the WAN bed: broker, coordinator, nodes and client each in a namespace.

:class:`WanSwarm` starts mosquitto, ``swarm-coordinator`` and pinned ``swarm-node``
daemons in a :class:`wan.bed.WanBed`, waits until every node serves and has reported its
round trips to its peers, and runs generations from the client's namespace with
:mod:`driver`. Used by ``tests/wan`` and ``bench/wan.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from wan.bed import HERE, WanBed

from swarm_proto import swarm_pb2, swarm_pb2_grpc


@dataclass(frozen=True)
class WanNode:
    name: str
    layers: str
    speed: float = 1000.0  # announced layer-steps/s (nodes do not measure in tests)


class WanSwarm:
    """Start with :meth:`start`, always :meth:`close` (also on failure)."""

    def __init__(self, model: Path, tmp: Path, nodes: Sequence[WanNode], *, delay: float,
                 delays: Mapping[tuple[str, str], float] | None = None, node_args: Sequence[str] = (),
                 probe_interval: float = 2.0) -> None:
        self.model = model
        self.tmp = tmp
        self.nodes = list(nodes)
        self.node_args = list(node_args)
        self.probe_interval = probe_interval
        names = ["broker", "coordinator", "client", *(n.name for n in self.nodes)]
        self.bed = WanBed(names, tmp, delay=delay, delays=delays)
        self.coordinator = ""

    def start(self, timeout: float = 180.0) -> WanSwarm:
        bed = self.bed.build()
        bed.start_relay(["broker", "coordinator", *(n.name for n in self.nodes)])
        bed.start_broker()
        self.coordinator = bed.start_coordinator(self.model)
        for n in self.nodes:
            bed.start_node(n.name, self.model, n.layers,
                           extra=["--speed", str(n.speed), "--probe-interval", str(self.probe_interval),
                                  *self.node_args])
        self.wait_ready(timeout)
        return self

    def close(self) -> None:
        self.bed.close()

    def pids(self) -> dict[str, int]:
        return {n.name: p.proc.pid for n in self.nodes if (p := self.bed.parties[n.name]).proc is not None}

    def list_nodes(self) -> dict[str, swarm_pb2.NodeInfo]:
        """The coordinator's node list (asked from the root namespace, through the relay)."""
        with grpc.insecure_channel(self.coordinator) as channel:
            listed = swarm_pb2_grpc.CoordinatorStub(channel).ListNodes(swarm_pb2.ListNodesRequest(), timeout=10).nodes
        return {n.node_id: n for n in listed}

    def wait_ready(self, timeout: float) -> None:
        """Until every node serves and reports a round trip to every other node."""
        names = {n.name for n in self.nodes}
        deadline = time.monotonic() + timeout
        while True:
            for name in names:
                party = self.bed.parties[name]
                if not party.alive:
                    raise AssertionError(f"node {name} exited:\n{party.tail()}")
            try:
                listed = self.list_nodes()
            except grpc.RpcError:
                listed = {}
            ready = all(
                n in listed and listed[n].end > listed[n].start and set(listed[n].peer_rtt_s) >= names - {n}
                for n in names
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the WAN swarm is not ready after {timeout:g} s: {listed}")
            time.sleep(0.5)

    def drive(self, job: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Run :mod:`driver` in the client's namespace; its JSON result."""
        job = {"coordinator": self.coordinator, "pids": self.pids(), **job}
        path, out = self.tmp / "job.json", self.tmp / "result.json"
        path.write_text(json.dumps(job))
        out.unlink(missing_ok=True)
        proc = self.bed.spawn("client", [sys.executable, str(HERE / "driver.py"), str(path), str(out)],
                              stdout=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"the client timed out:\n{self.bed.parties['client'].tail()}") from None
        if code != 0:
            raise AssertionError(f"the client failed ({code}):\n{self.bed.parties['client'].tail()}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result
