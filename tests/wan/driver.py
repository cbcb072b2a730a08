"""The client side of the WAN bed: run generations from the client's namespace.

``python driver.py JOB.json OUT.json`` (under ``ip netns exec``). The job is
``{"coordinator": ADDR, "max_context": N, "generations": [{"prompt": [ids], "params":
{SamplingParams fields}, "max_new": N, "kill": {"role": "head|middle|tail", "step": i}}],
"pids": {node: pid}, "ping": [ADDR...], "speculate": K, "probe_links": bool}`` (a
generation may carry its own ``"speculate"``). For each generation it
writes the tokens, the time of each token (seconds since the request), the route's
node ids and the failovers; ``ping`` measures Info round trips (min of 5) to the
given addresses. A ``kill`` SIGKILLs the node in that role of the current route
after the step-th token (pids are shared across namespaces).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from swarm_client.routed import CoordinatorRoutes, RoutedBackend
from swarm_client.speculation import Speculation
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.wire import SamplingParams


async def ping(address: str, n: int = 5) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = swarm_pb2_grpc.NodeStub(channel)
        await stub.Info(swarm_pb2.InfoRequest(), timeout=10)  # connect first
        best = float("inf")
        for _ in range(n):
            t = time.monotonic()
            await stub.Info(swarm_pb2.InfoRequest(), timeout=10)
            best = min(best, time.monotonic() - t)
    return best


async def run(job: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"pings": {}, "generations": []}
    for address in job.get("ping", []):
        out["pings"][address] = await ping(address)
    if not job.get("generations"):
        return out
    routes = CoordinatorRoutes(job["coordinator"], probe_links=job.get("probe_links", True))
    backends: dict[int, RoutedBackend] = {}

    def backend_for(k: int) -> RoutedBackend:
        """One backend per draft length (0: no speculation), sharing the route provider."""
        if k not in backends:
            kwargs: dict[str, Any] = {}
            if k:
                kwargs["speculation"] = Speculation(max_draft=k)
            backends[k] = RoutedBackend(routes, max_context=job.get("max_context", 512), eos_token_ids=(), **kwargs)
        return backends[k]

    pids: dict[str, int] = job.get("pids", {})
    try:
        for gen in job["generations"]:
            params = SamplingParams(**gen.get("params", {}))
            kill = gen.get("kill")
            tokens: list[int] = []
            times: list[float] = []
            routes_seen: list[list[str]] = []
            backend = backend_for(int(gen.get("speculate", job.get("speculate", 0))))
            stats = backend.decode_stats
            trips_before = (stats.round_trips, stats.tokens)
            before = len(backend.records)
            t0 = time.monotonic()
            async for t in backend.tokens(gen["prompt"], params, gen["max_new"]):
                times.append(time.monotonic() - t0)
                tokens.append(t.token_id)
                assert backend.last_route is not None
                hops = [h.node_id for h in backend.last_route.hops]
                if not routes_seen or routes_seen[-1] != hops:
                    routes_seen.append(hops)
                if kill and len(tokens) == kill["step"]:
                    index = {"head": 0, "middle": len(hops) // 2, "tail": len(hops) - 1}[kill["role"]]
                    os.kill(pids[hops[index]], signal.SIGKILL)
                    out.setdefault("killed", []).append(hops[index])
            records = [
                {"node_id": r.node_id, "stall_s": r.stall_s, "detect_s": r.detect_s, "reroute_s": r.reroute_s,
                 "replay_s": r.replay_s}
                for r in list(backend.records)[before:]
            ]
            trips = (stats.round_trips - trips_before[0], stats.tokens - trips_before[1])
            out["generations"].append({"tokens": tokens, "times": times, "routes": routes_seen, "failovers": records,
                                       "round_trips": trips[0], "trip_tokens": trips[1]})
    finally:
        for backend in backends.values():
            await backend.aclose()
    return out


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    result = asyncio.run(run(job))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
