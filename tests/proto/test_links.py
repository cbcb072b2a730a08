"""LinkProbe: round trips measured with Info calls, bounded and cached (real gRPC on loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from swarm_coordinator.broker import free_port
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.links import LinkProbe


class CountingNode(swarm_pb2_grpc.NodeServicer):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    async def Info(self, request: swarm_pb2.InfoRequest, context: Any) -> swarm_pb2.NodeInfo:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return swarm_pb2.NodeInfo(node_id="n")


async def test_round_trips_are_measured_cached_and_bounded() -> None:
    nodes = {"near": CountingNode(0.0), "far": CountingNode(0.05)}
    servers, addresses = [], {}
    for name, servicer in nodes.items():
        server = grpc.aio.server()
        swarm_pb2_grpc.add_NodeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses[name] = f"127.0.0.1:{port}"
    try:
        probe = LinkProbe(ttl=60.0, timeout=2.0, max_nodes=2)
        dead = f"127.0.0.1:{free_port()}"
        got = await probe.rtts([("near", addresses["near"]), ("far", addresses["far"]), ("dead", dead)])
        assert set(got) == {"near", "far"}  # the third is beyond the bound; a dead one would get no figure
        assert got["far"] >= 0.05 > got["near"]
        calls = sum(n.calls for n in nodes.values())
        assert calls == 6  # one to connect, then the best of two, each
        assert await probe.rtts([("near", addresses["near"]), ("far", addresses["far"])]) == got
        assert sum(n.calls for n in nodes.values()) == calls  # cached
        assert await LinkProbe(timeout=0.5).rtts([("dead", dead)]) == {}
    finally:
        for server in servers:
            await server.stop(None)
