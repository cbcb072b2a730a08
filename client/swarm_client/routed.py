"""Generation over the swarm: routes from a provider, sessions along them, failover.

A route provider hands out chains of hops covering the model:

- :class:`CoordinatorRoutes` asks a coordinator (``GetRoute``), reports failed hops
  (``ReportFailure``) and lists nodes (``ListNodes``): ``swarm generate --coordinator``;
- :class:`StaticRoutes` is a fixed chain (``--route``), with nowhere to report to.

:class:`RoutedBackend` is an ``AsyncTokenSource``: it opens a :class:`RouteSession`
on a route, prefills the prompt and decodes token by token. When a hop fails it
reports the hop, asks for a route that avoids it, opens a new session and replays the
history (prompt + tokens so far) as a prefill; sampling is deterministic in
``(seed, position)``, so the tokens are those of a run without the failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from swarm_client.errors import GenerationError
from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_client.types import SampledToken
from swarm_node.sampler import SamplingParams
from swarm_proto import swarm_pb2, swarm_pb2_grpc

logger = logging.getLogger(__name__)

__all__ = ["CoordinatorRoutes", "NodeSummary", "Route", "RouteProvider", "RoutedBackend", "StaticRoutes", "parse_route"]


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]
    session_id: str = ""  # a suggestion from the coordinator; "" lets the session pick


class RouteProvider(Protocol):
    async def route(
        self, *, max_length: int, exclude_node_ids: Collection[str] = (), exclude_addresses: Collection[str] = ()
    ) -> Route: ...

    async def report_failure(self, error: RouteError, session_id: str) -> None: ...

    async def aclose(self) -> None: ...


def parse_route(text: str) -> tuple[Hop, ...]:
    """``"host:port=0:10,host:port=10:30"`` -> hops (the layers of each, in order)."""
    hops = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        address, sep, layers = part.rpartition("=")
        a, colon, b = layers.partition(":")
        if not sep or not colon or not address:
            raise ValueError(f"bad hop {part!r}: expected HOST:PORT=START:END")
        hops.append(Hop(address, int(a), int(b)))
    if not hops:
        raise ValueError("empty route")
    return tuple(hops)


class StaticRoutes:
    """Always the same chain (no failover: there is nowhere else to go)."""

    def __init__(self, hops: Sequence[Hop]) -> None:
        self.hops = tuple(hops)

    async def route(
        self, *, max_length: int, exclude_node_ids: Collection[str] = (), exclude_addresses: Collection[str] = ()
    ) -> Route:
        bad = [h for h in self.hops if h.address in exclude_addresses or (h.node_id and h.node_id in exclude_node_ids)]
        if bad:
            raise GenerationError(f"the static route's hop {bad[0].address} failed and there is no other route")
        return Route(self.hops)

    async def report_failure(self, error: RouteError, session_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class NodeSummary:
    node_id: str
    address: str
    start: int
    end: int
    device: str
    active_sessions: int


class CoordinatorRoutes:
    """Routes from the coordinator's gRPC service at ``HOST:PORT``.

    The channel is made on first use, in the event loop that uses it.
    """

    def __init__(self, address: str, *, model: str = "", timeout: float = 10.0) -> None:
        self.address = address
        self.model = model
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _stub(self) -> swarm_pb2_grpc.CoordinatorStub:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(self.address)
            self._loop = loop
        return swarm_pb2_grpc.CoordinatorStub(self._channel)

    async def route(
        self, *, max_length: int, exclude_node_ids: Collection[str] = (), exclude_addresses: Collection[str] = ()
    ) -> Route:
        request = swarm_pb2.RouteRequest(
            model=self.model,
            max_length=max_length,
            exclude_node_ids=sorted(exclude_node_ids),
            exclude_addresses=sorted(exclude_addresses),
        )
        try:
            reply = await self._stub().GetRoute(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise RouteError(exc.code(), f"coordinator {self.address}: {exc.details()}") from exc
        return Route(tuple(Hop(h.address, h.start, h.end, h.node_id) for h in reply.hops), reply.session_id)

    async def report_failure(self, error: RouteError, session_id: str) -> None:
        report = swarm_pb2.FailureReport(
            node_id=error.node_id,
            address=error.address,
            session_id=session_id,
            code=error.code.value[0],
            message=error.message[:1000],
        )
        try:
            await self._stub().ReportFailure(report, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:  # the report is advice; the retry goes on
            logger.warning("could not report the failure to %s: %s", self.address, exc.details())

    async def list_nodes(self) -> list[NodeSummary]:
        try:
            reply = await self._stub().ListNodes(swarm_pb2.ListNodesRequest(model=self.model), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise RouteError(exc.code(), f"coordinator {self.address}: {exc.details()}") from exc
        return [NodeSummary(n.node_id, n.address, n.start, n.end, n.device, n.active_sessions) for n in reply.nodes]

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# Failures worth another route: the hop is gone, busy, overloaded or was reassigned.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


class RoutedBackend:
    """An ``AsyncTokenSource`` generating along routes from ``routes``, with failover."""

    is_async = True

    def __init__(
        self,
        routes: RouteProvider,
        *,
        max_context: int,
        eos_token_ids: Sequence[int],
        max_attempts: int = 4,
        step_timeout: float = 60.0,
        retry_delay: float = 0.5,
    ) -> None:
        self.routes = routes
        self._max_context = max_context
        self._eos = tuple(eos_token_ids)
        self.max_attempts = max_attempts
        self.step_timeout = step_timeout
        self.retry_delay = retry_delay
        self.failovers = 0  # sessions reopened after a failure (tests, stats)
        self.last_route: Route | None = None

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    async def tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> AsyncIterator[SampledToken]:
        if not prompt_ids:
            raise GenerationError("the prompt has no tokens")
        history = [int(t) for t in prompt_ids]
        max_length = min(self._max_context, len(history) + max_new_tokens + 1)
        generated = 0
        excluded_ids: set[str] = set()
        excluded_addresses: set[str] = set()
        attempt = 0
        while generated < max_new_tokens:
            route = await self._route(max_length, excluded_ids, excluded_addresses, attempt)
            self.last_route = route
            session = RouteSession(
                route.hops,
                max_length=max_length,
                sampling=params,
                prompt_length=len(prompt_ids),
                session_id=route.session_id or None,
                timeout=self.step_timeout,
            )
            try:
                async with session:
                    out = await session.prefill(history)  # the prompt, or the replay after a failure
                    while True:
                        if out.token is None:
                            raise GenerationError("the tail returned no token")
                        history.append(out.token)
                        generated += 1
                        yield SampledToken(out.token, out.logprob)
                        if generated >= max_new_tokens:
                            return
                        out = await session.decode(out.token)
            except RouteError as err:
                attempt += 1
                if err.code not in _RETRYABLE or attempt >= self.max_attempts:
                    raise GenerationError(f"generation failed after {attempt} attempt(s): {err}") from err
                self.failovers += 1
                logger.warning("route failed (%s); replaying %d positions on a new route", err, len(history))
                if err.code == grpc.StatusCode.FAILED_PRECONDITION:
                    # The hop was reassigned, not broken: ask again once it announces its new range.
                    await asyncio.sleep(self.retry_delay)
                    continue
                await self.routes.report_failure(err, session.session_id)
                if err.node_id:
                    excluded_ids.add(err.node_id)
                elif err.address:
                    excluded_addresses.add(err.address)

    async def _route(self, max_length: int, ids: set[str], addresses: set[str], attempt: int) -> Route:
        while True:
            try:
                return await self.routes.route(max_length=max_length, exclude_node_ids=ids, exclude_addresses=addresses)
            except RouteError as err:
                # No route yet (a reassignment is loading, the swarm is still joining): wait a bit.
                attempt += 1
                if err.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_attempts * 4:
                    raise GenerationError(f"no route: {err.message}") from err
                await asyncio.sleep(self.retry_delay * min(attempt, 4))

    async def aclose(self) -> None:
        await self.routes.aclose()
