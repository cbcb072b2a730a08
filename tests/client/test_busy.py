"""A full node is busy, not failed: the client library waits for room and blames nobody.

Two in-process nodes whose KV budget holds one session each; two generations at once
over that route: one waits for the other (the busy refusal is counted, never avoided
or reported), and both get the tokens they get alone. ``busy_at_start="raise"`` (the
gateway's mode) and a spent ``busy_wait`` raise ``BusyError`` instead.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from swarm_client.errors import BusyError
from swarm_client.failover import FailoverPolicy
from swarm_client.remote import Hop, RouteError
from swarm_client.routed import RoutedBackend, StaticRoutes
from swarm_node.config import NodeConfig
from swarm_node.server import NodeServer
from swarm_proto.wire import SamplingParams

PROMPT = [1, 5, 9, 13, 2, 7]
GREEDY = SamplingParams(repetition_penalty=1.3)
N = 6


class Recording(StaticRoutes):
    """A fixed route that remembers what it was told about failures."""

    def __init__(self, hops: list[Hop]) -> None:
        super().__init__(hops)
        self.reports: list[RouteError] = []

    async def report_failure(self, error: RouteError, session_id: str) -> None:
        self.reports.append(error)


async def _tokens(backend: RoutedBackend) -> list[int]:
    return [t.token_id async for t in backend.tokens(PROMPT, GREEDY, N)]


async def test_a_full_route_is_waited_for_not_blamed(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama3"])
    per_slot = 3 * 2 * 2 * 8 * 4 * 64  # 3 layers x K,V x kv heads x head dim x float32 x a 64-position slot
    async with AsyncExitStack() as stack:
        servers = []
        for start, end in [(0, 3), (3, 6)]:
            cfg = NodeConfig(model=model, start=start, end=end, node_id=f"n{start}", kv_budget=per_slot)
            servers.append(await stack.enter_async_context(NodeServer(cfg)))
        args = servers[0].service.model.args  # type: ignore[union-attr]
        assert (args.num_kv_heads, args.head_dim) == (2, 8), "the tiny model's shape changed: fix per_slot"
        hops = [Hop(s.address, s.config.start, s.config.end, s.config.node_id) for s in servers]

        routes = Recording(hops)
        backend = RoutedBackend(routes, max_context=64, eos_token_ids=(), policy=FailoverPolicy(busy_wait=60))
        alone = await _tokens(backend)
        a, b = await asyncio.gather(_tokens(backend), _tokens(backend))
        assert a == b == alone
        assert backend.busy_refusals >= 1 and backend.busy_wait_s > 0  # one of them waited
        assert backend.failovers == 0 and routes.reports == [] and not backend.avoid.avoided()
        assert sum(s.service.refused for s in servers) >= 1  # type: ignore[union-attr]

        # the gateway's mode: a refusal before the first token raises at once
        eager = RoutedBackend(routes, max_context=64, eos_token_ids=(), policy=FailoverPolicy(busy_at_start="raise"))
        holder = backend.tokens(PROMPT, GREEDY, N)
        await holder.__anext__()  # holds the only room
        with pytest.raises(BusyError) as err:
            await _tokens(eager)
        assert err.value.retry_after > 0
        # and a caller's wait that runs out
        impatient = RoutedBackend(routes, max_context=64, eos_token_ids=(), policy=FailoverPolicy(busy_wait=0.2))
        with pytest.raises(BusyError, match="no room in the swarm within 0.2 s"):
            await _tokens(impatient)
        await holder.aclose()
        assert await _tokens(eager) == alone  # room again
        assert routes.reports == [] and not eager.avoid.avoided() and not impatient.avoid.avoided()
        await backend.aclose()
