"""Round trips to nodes, for link-aware routes (clients to nodes, nodes to peers).

A client far from the swarm should get a head and a tail near it. The coordinator
cannot know where a client is, so the client measures: :class:`LinkProbe` calls each
node's ``Info`` (one unary round trip) and keeps the best of a few, and the route
request carries the figures (``RouteRequest.client_rtt_s``; docs/wan.md).

Invariants: at most ``max_nodes`` nodes are measured and cached (the request's bound);
figures older than ``ttl`` seconds are measured again, all in one concurrent round; a
node that does not answer within ``timeout`` gets no figure (it then costs a local hop
in the coordinator's estimate, and the failover machinery deals with dead nodes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc

from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.tls import TlsFiles, secure_aio_channel
from swarm_proto.transport import Metadata

log = logging.getLogger(__name__)

__all__ = ["LinkProbe"]

MAX_PROBED_NODES = 64  # as the coordinator accepts in one route request


class LinkProbe:
    """Measured round trips to nodes by node id (seconds), cached for ``ttl``."""

    def __init__(self, *, ttl: float = 30.0, timeout: float = 2.0, pings: int = 2,
                 max_nodes: int = MAX_PROBED_NODES, tls: TlsFiles | None = None) -> None:
        self.tls = tls  # mutual TLS to the nodes (None: in clear)
        self.ttl = ttl
        self.timeout = timeout
        self.pings = pings
        self.max_nodes = max_nodes
        self._rtts: dict[str, tuple[float, float]] = {}  # node id -> (rtt, measured at)

    def cached(self) -> dict[str, float]:
        """Every figure held, fresh or not (a stale one still beats none)."""
        return {n: rtt for n, (rtt, _) in self._rtts.items()}

    async def rtts(self, nodes: Sequence[tuple[str, str]], metadata: Metadata = None) -> dict[str, float]:
        """Round trips to ``nodes`` (``(node_id, address)`` pairs), measuring stale ones."""
        now = time.monotonic()
        wanted = list(dict(nodes).items())[: self.max_nodes]
        stale = [(n, a) for n, a in wanted if n not in self._rtts or now - self._rtts[n][1] > self.ttl]
        if stale:
            got = await asyncio.gather(*(self._measure(a, metadata) for _, a in stale))
            for (node_id, _), rtt in zip(stale, got):
                if rtt is not None:
                    self._rtts[node_id] = (rtt, now)
            if len(self._rtts) > self.max_nodes:  # keep the freshest
                keep = sorted(self._rtts.items(), key=lambda kv: kv[1][1], reverse=True)[: self.max_nodes]
                self._rtts = dict(keep)
        return {n: self._rtts[n][0] for n, _ in wanted if n in self._rtts}

    async def _measure(self, address: str, metadata: Metadata) -> float | None:
        """Best of ``pings`` Info round trips after one that opens the connection."""
        try:
            async with secure_aio_channel(address, self.tls) as channel:
                stub = swarm_pb2_grpc.NodeStub(channel)
                deadline = time.monotonic() + self.timeout
                await stub.Info(swarm_pb2.InfoRequest(), timeout=self.timeout, metadata=metadata)
                best = float("inf")
                for _ in range(self.pings):
                    t = time.monotonic()
                    await stub.Info(swarm_pb2.InfoRequest(), timeout=max(0.01, deadline - t), metadata=metadata)
                    best = min(best, time.monotonic() - t)
                return best
        except grpc.aio.AioRpcError as exc:
            log.debug("no round trip to %s: %s", address, exc.code().name)
            return None
