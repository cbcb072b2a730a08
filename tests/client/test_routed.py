"""RoutedBackend over in-process nodes: what one client's sessions share and what they don't."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from swarm_client.failover import FailoverPolicy
from swarm_client.remote import Hop
from swarm_client.routed import Route, RoutedBackend, RouteProvider
from swarm_node.config import NodeConfig
from swarm_node.server import NodeServer
from swarm_proto.wire import SamplingParams

pytestmark = pytest.mark.timeout(120)

PROMPT = [5, 17, 33, 2, 90, 101, 7]
SLOW_STEP_S = 1.0  # added to every step of the slow node


class PerTaskRoutes(RouteProvider):
    """Hands each generation the route its task chose (the coordinator would pick by load)."""

    chosen: contextvars.ContextVar[tuple[Hop, ...]] = contextvars.ContextVar("chosen")

    async def route(
        self, *, max_length: int, exclude_node_ids: Collection[str] = (), exclude_addresses: Collection[str] = ()
    ) -> Route:
        return Route(self.chosen.get())


@pytest.fixture
async def fast_and_slow(tiny_models: dict[str, Path]) -> AsyncIterator[tuple[tuple[Hop, ...], tuple[Hop, ...]]]:
    """Two one-node routes over the whole tiny model; every step of the second waits SLOW_STEP_S more."""
    async with AsyncExitStack() as stack:
        hops = []
        for name in ("fast", "slow"):
            server = await stack.enter_async_context(NodeServer(NodeConfig(model=str(tiny_models["llama3"]), start=0, end=6, node_id=name)))
            hops.append((Hop(server.address, 0, 6, name),))
        assert server.scheduler is not None
        submit = server.scheduler.submit

        async def slow_submit(job: Any) -> Any:
            await asyncio.sleep(SLOW_STEP_S)
            return await submit(job)

        server.scheduler.submit = slow_submit  # type: ignore[method-assign]
        yield hops[0], hops[1]


async def test_a_slow_route_and_a_fast_one_share_a_client_and_neither_fails_over(
    fast_and_slow: tuple[tuple[Hop, ...], tuple[Hop, ...]],
) -> None:
    """Step timeouts follow each session's own route: the fast route's millisecond steps
    must not time out the slow route's second-long ones (a clock shared by the client's
    sessions, as the gateway's one backend had, did), and the slow route must not
    stretch the fast one's."""
    fast, slow = fast_and_slow
    # A tight timeout (10 x the measured step, at least 50 ms) so that one route's
    # speed applied to the other shows.
    policy = FailoverPolicy(step_timeout_floor=0.05, step_timeout_factor=10.0)
    backend = RoutedBackend(PerTaskRoutes(), max_context=64, eos_token_ids=(), policy=policy)

    async def generate(route: tuple[Hop, ...], n: int) -> list[int]:
        PerTaskRoutes.chosen.set(route)
        return [t.token_id async for t in backend.tokens(PROMPT, SamplingParams(), n)]

    want = await generate(fast, 8)  # the fast route first: step times of milliseconds
    assert await generate(slow, 3) == want[:3]
    # And both at once, the fast one decoding many steps while the slow one waits.
    both = await asyncio.gather(generate(fast, 8), generate(slow, 3), generate(fast, 8))
    assert both == [want, want[:3], want]
    assert backend.failovers == 0 and not backend.records
    await backend.aclose()
