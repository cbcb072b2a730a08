"""Generation over the swarm: routes from a provider, sessions along them, failover.

A route provider hands out chains of hops covering the model:

- :class:`CoordinatorRoutes` asks a coordinator (``GetRoute``), reports failed hops
  (``ReportFailure``) and lists nodes (``ListNodes``): ``swarm generate --coordinator``;
- :class:`StaticRoutes` is a fixed chain (``--route``), with nowhere to report to.

:class:`RoutedBackend` is an ``AsyncTokenSource``: it opens a :class:`RouteSession`
on a route, prefills the prompt and decodes token by token. When a step fails (an
error on a stream, a node gone, or no answer within the step timeout) it reports the
hop, gets a route that avoids it, reopens the session and replays the history
(prompt + tokens so far), then goes on; sampling is deterministic in
``(seed, position)``, so the tokens are those of a run without the failure. By default
the session is reopened under the same id on the old route with only the failed hop
replaced, and the survivors keep their caches ("span" replay); the pieces live in
:mod:`swarm_client.failover`, the protocol in docs/failover.md.

A hop that refuses for capacity ("busy": RESOURCE_EXHAUSTED with a retry hint) has
not failed: it is neither blamed, avoided nor reported. The generation waits for the
hint and asks for a route again (the coordinator sends new sessions where there is
room), within ``FailoverPolicy.busy_wait`` in all, then raises :class:`BusyError`; with
``busy_at_start="raise"`` a refusal before the first token raises at once, for a
caller that keeps its own line (the gateway's queue).

With ``speculation`` (:mod:`swarm_client.speculation`), each decode step carries the
last token and up to k drafted ones; the tail returns the drafts it accepted and its
own next token, so a step may bring several tokens, always the ones one-token steps
would have brought. The history kept for failover holds accepted tokens only.
``decode_stats`` counts round trips and tokens (``swarm generate --stats``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc

from swarm_client.errors import BusyError, GenerationError
from swarm_client.failover import FailoverPolicy, FailoverRecord, StepClock, blame, hop_key, patch_route
from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_client.speculation import DecodeStats, Speculation, SpeculativeRun
from swarm_client.types import AsyncTokenSource, SampledToken
from swarm_client.verify import Blame, CheckResult, Verifier, VerifyPolicy
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.backoff import Backoff
from swarm_proto.links import LinkProbe
from swarm_proto.tls import TlsFiles, secure_aio_channel
from swarm_proto.transport import Metadata, call_metadata
from swarm_proto.wire import SamplingParams, wire_code

logger = logging.getLogger(__name__)

__all__ = ["CoordinatorRoutes", "NodeSummary", "Route", "RouteProvider", "RoutedBackend", "StaticRoutes", "parse_route"]


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]
    session_id: str = ""  # a suggestion from the coordinator; "" lets the session pick
    expected_step_s: float = 0.0  # the coordinator's estimate of a decode step; 0 = unknown


@dataclass(frozen=True)
class NodeSummary:
    node_id: str
    address: str
    start: int
    end: int
    device: str
    active_sessions: int


class RouteProvider(Protocol):
    """Where routes come from. ``route()`` is required; the rest are capabilities with
    no-op defaults, inherited by subclassing: a provider with nowhere to report to and no
    node list (``StaticRoutes``) keeps them."""

    async def route(
        self, *, max_length: int, exclude_node_ids: Collection[str] = (), exclude_addresses: Collection[str] = ()
    ) -> Route: ...

    async def report_failure(self, error: RouteError, session_id: str) -> None:
        """Tell the route's source that a hop failed (advice: never raises)."""
        return  # (an empty body would make it abstract)

    async def report_recovery(self, record: FailoverRecord) -> None:
        """Tell the route's source what a finished failover cost (advice: never raises)."""
        return  # (an empty body would make it abstract)

    async def list_nodes(self) -> list[NodeSummary]:
        """The nodes a failed hop may be replaced with; [] when unknown (then a failover
        asks for a whole new route)."""
        return []

    async def report_liar(self, blame: Blame, session_id: str) -> None:
        """Tell the route's source that a spot check caught a node lying (advice: never raises)."""
        return  # (an empty body would make it abstract)

    def has_alternatives(self) -> bool:
        """Whether routes through other nodes may exist (somewhere to spot-check on)."""
        return True

    async def aclose(self) -> None:
        return  # (an empty body would make it abstract)


def parse_route(text: str) -> tuple[Hop, ...]:
    """``"host:port,host:port"`` or ``"host:port=0:10,host:port=10:30"`` -> hops, in order.

    A hop without ``=START:END`` gets the layers its node reports (``Info``) when the
    route is first used; its range is marked -1 until then.
    """
    hops = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        address, sep, layers = part.rpartition("=")
        if not sep:
            if ":" not in part:
                raise ValueError(f"bad hop {part!r}: expected HOST:PORT or HOST:PORT=START:END")
            hops.append(Hop(part, -1, -1))
            continue
        a, colon, b = layers.partition(":")
        if not colon or not address:
            raise ValueError(f"bad hop {part!r}: expected HOST:PORT or HOST:PORT=START:END")
        hops.append(Hop(address, int(a), int(b)))
    if not hops:
        raise ValueError("empty route")
    return tuple(hops)


async def _hosted_range(address: str, metadata: Metadata, timeout: float = 10.0, tls: TlsFiles | None = None) -> tuple[int, int]:
    channel = secure_aio_channel(address, tls)
    try:
        info = await swarm_pb2_grpc.NodeStub(channel).Info(swarm_pb2.InfoRequest(), timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        raise GenerationError(f"route hop {address} does not answer: {exc.details()}") from exc
    finally:
        await channel.close(grace=None)
    return info.start, info.end


class StaticRoutes(RouteProvider):
    """Always the same chain (no failover: there is nowhere else to go)."""

    def __init__(self, hops: Sequence[Hop], *, token: str = "", tls: TlsFiles | None = None) -> None:
        self.hops = tuple(hops)
        self._metadata = call_metadata(token)
        self.tls = tls

    def has_alternatives(self) -> bool:
        return False  # one chain: nowhere to check its results

    async def route(
        self, *, max_length: int, exclude_node_ids: Collection[str] = (), exclude_addresses: Collection[str] = ()
    ) -> Route:
        bad = [h for h in self.hops if h.address in exclude_addresses or (h.node_id and h.node_id in exclude_node_ids)]
        if bad:
            raise GenerationError(f"the static route's hop {bad[0].address} failed and there is no other route")
        if any(h.start < 0 for h in self.hops):
            ranges = await asyncio.gather(*(_hosted_range(h.address, self._metadata, tls=self.tls) for h in self.hops))
            self.hops = tuple(replace(h, start=a, end=b) for h, (a, b) in zip(self.hops, ranges))
            for prev, nxt in zip(self.hops, self.hops[1:]):
                if prev.end != nxt.start:
                    raise GenerationError(
                        f"route hops do not chain: {prev.address} ends at layer {prev.end}, {nxt.address} starts at {nxt.start}"
                    )
        return Route(self.hops)


_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CoordinatorRoutes(RouteProvider):
    """Routes from the coordinator's gRPC service at ``HOST:PORT``, or from the first
    of ``HOST:PORT,HOST:PORT,...`` that answers (an active coordinator and its standby:
    both answer routes; a call that finds one unreachable moves on to the next, and
    later calls start from the one that answered).

    Channels are made on first use, in the event loop that uses them. With
    ``probe_links`` (the default) the client measures its round trips to the swarm's
    nodes (:class:`swarm_proto.links.LinkProbe`; the node list and the figures are
    refreshed every ``links.ttl`` seconds) and sends them with each route request, so a
    client far from the swarm gets a head and a tail near it (docs/wan.md).
    """

    def __init__(
        self,
        address: str,
        *,
        model: str = "",
        timeout: float = 10.0,
        token: str = "",
        tls: TlsFiles | None = None,
        probe_links: bool = True,
    ) -> None:
        self.tls = tls
        self.addresses = tuple(a.strip() for a in address.split(",") if a.strip())
        if not self.addresses:
            raise ValueError(f"no coordinator address in {address!r}")
        self.address = self.addresses[0]  # the one in use
        self.model = model
        self.timeout = timeout
        self._metadata = call_metadata(token)  # the swarm token, when the coordinator wants one
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.links = LinkProbe(tls=tls) if probe_links else None
        self._listed: list[tuple[str, str]] = []
        self._listed_at = -math.inf
        self._refresher: asyncio.Task[None] | None = None

    async def client_rtts(self, exclude_node_ids: Collection[str], exclude_addresses: Collection[str]) -> dict[str, float]:
        """This client's measured round trips to the nodes it may be routed through.

        Only the first call waits for the probes; later ones answer from the cache and
        refresh stale figures in the background, so a failover never waits on a probe
        of a dead or frozen node."""
        if self.links is None:
            return {}
        loop = asyncio.get_running_loop()
        if self._listed_at == -math.inf:
            await self._refresh_links()
        elif time.monotonic() - self._listed_at > self.links.ttl and (
            self._refresher is None or self._refresher.done() or self._refresher.get_loop() is not loop
        ):
            self._listed_at = time.monotonic()
            self._refresher = loop.create_task(self._refresh_links(), name="swarm-link-probes")
        avoid = {n for n, a in self._listed if n in exclude_node_ids or a in exclude_addresses}
        return {n: rtt for n, rtt in self.links.cached().items() if n not in avoid}

    async def _refresh_links(self) -> None:
        assert self.links is not None
        try:
            self._listed = [(n.node_id, n.address) for n in await self.list_nodes() if n.address and n.node_id]
        except RouteError as exc:  # the route request will say what is wrong
            logger.debug("no node list for link probes: %s", exc)
        self._listed_at = time.monotonic()
        await self.links.rtts(self._listed, self._metadata)

    def _stub(self, address: str) -> swarm_pb2_grpc.CoordinatorStub:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._channels = {}
            self._loop = loop
        if address not in self._channels:
            self._channels[address] = secure_aio_channel(address, self.tls)
        return swarm_pb2_grpc.CoordinatorStub(self._channels[address])

    async def _call(self, method: str, request: Any) -> Any:
        """``method`` on the coordinator in use, then on the others while unreachable."""
        start = self.addresses.index(self.address)
        order = self.addresses[start:] + self.addresses[:start]
        for n, address in enumerate(order):
            try:
                call = getattr(self._stub(address), method)
                reply = await call(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _FAILOVER_CODES or n == len(order) - 1:
                    self.address = address
                    raise
                logger.warning("coordinator %s: %s; trying %s", address, exc.code().name, order[n + 1])
                continue
            self.address = address
            return reply
        raise AssertionError("unreachable")

    async def route(
        self, *, max_length: int, exclude_node_ids: Collection[str] = (), exclude_addresses: Collection[str] = ()
    ) -> Route:
        request = swarm_pb2.RouteRequest(
            model=self.model,
            max_length=max_length,
            exclude_node_ids=sorted(exclude_node_ids),
            exclude_addresses=sorted(exclude_addresses),
            client_rtt_s=await self.client_rtts(exclude_node_ids, exclude_addresses),
        )
        try:
            reply = await self._call("GetRoute", request)
        except grpc.aio.AioRpcError as exc:
            raise RouteError(exc.code(), f"coordinator {self.address}: {exc.details()}") from exc
        hops = tuple(Hop(h.address, h.start, h.end, h.node_id) for h in reply.hops)
        return Route(hops, reply.session_id, reply.expected_step_s)

    async def report_failure(self, error: RouteError, session_id: str) -> None:
        report = swarm_pb2.FailureReport(
            node_id=error.node_id[:256],  # named by a peer: cut to what the coordinator takes
            address=error.address[:256],
            session_id=session_id,
            code=wire_code(error.code),
            message=error.message[:1000],
        )
        try:
            await self._call("ReportFailure", report)
        except grpc.aio.AioRpcError as exc:  # the report is advice; the retry goes on
            logger.warning("could not report the failure to %s: %s", self.address, exc.details())

    async def report_recovery(self, record: FailoverRecord) -> None:
        """The failover's numbers, once the session produced a token again (an event)."""
        report = swarm_pb2.FailureReport(
            node_id=record.node_id[:256],
            address=record.address[:256],
            session_id=record.session_id,
            code=wire_code(grpc.StatusCode[record.code]),
            message=record.message[:1000],
            recovered=True,
            stall_s=record.stall_s,
            detect_s=record.detect_s,
            reroute_s=record.reroute_s,
            replay_s=record.replay_s,
            replayed_tokens=record.replayed_tokens,
            history_tokens=record.history_tokens,
            mode=record.mode,
        )
        try:
            await self._call("ReportFailure", report)
        except grpc.aio.AioRpcError as exc:
            logger.warning("could not report the failover to %s: %s", self.address, exc.details())

    async def report_liar(self, blame: Blame, session_id: str) -> None:
        """The evidence of a failed spot check: the coordinator quarantines the node."""
        report = swarm_pb2.FailureReport(
            node_id=blame.node_id,
            address=blame.address,
            session_id=session_id,
            code=wire_code(grpc.StatusCode.DATA_LOSS),
            message=f"spot check: {blame.detail}"[:1000],
            evidence=swarm_pb2.Evidence(
                position=blame.position,
                start=blame.start,
                end=blame.end,
                detail=blame.detail[:1000],
                claimed=list(blame.claimed),
                recomputed=list(blame.recomputed),
                witnesses=list(blame.witnesses),
            ),
        )
        try:
            await self._call("ReportFailure", report)
        except grpc.aio.AioRpcError as exc:
            logger.warning("could not report the liar to %s: %s", self.address, exc.details())

    async def list_nodes(self) -> list[NodeSummary]:
        try:
            reply = await self._call("ListNodes", swarm_pb2.ListNodesRequest(model=self.model))
        except grpc.aio.AioRpcError as exc:
            raise RouteError(exc.code(), f"coordinator {self.address}: {exc.details()}") from exc
        return [NodeSummary(n.node_id, n.address, n.start, n.end, n.device, n.active_sessions) for n in reply.nodes]

    async def aclose(self) -> None:
        if self._refresher is not None and not self._refresher.done():
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        self._refresher = None
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


# Failures worth another route: the hop is gone, busy, overloaded, silent or was reassigned.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}


class RoutedBackend(AsyncTokenSource):
    """An ``AsyncTokenSource`` generating along routes from ``routes``, with failover."""

    # Sessions reopened after a failure (tests, stats); a class attribute, so that it
    # shadows the protocol's read-only property and instances can count.
    failovers: int = 0

    def __init__(
        self,
        routes: RouteProvider,
        *,
        max_context: int,
        eos_token_ids: Sequence[int],
        policy: FailoverPolicy | None = None,
        token: str = "",
        tls: TlsFiles | None = None,
        speculation: Speculation | None = None,
        verify: VerifyPolicy | None = None,
    ) -> None:
        self.token = token  # the swarm token, sent to every node of every route
        self.tls = tls  # mutual TLS to every node (None: in clear)
        self.policy = policy or FailoverPolicy()
        self.verify = verify or VerifyPolicy()  # spot checks (docs/verification.md); rate 0 = off
        self.quarantined: set[str] = set()  # addresses caught lying: never routed through again
        self.blames: deque[Blame] = deque(maxlen=100)  # the liars caught, newest last
        self.checked_steps = 0  # positions verified, over all generations
        self.routes = routes
        self._max_context = max_context
        self._eos = tuple(eos_token_ids)
        self.avoid = Backoff(self.policy.backoff_initial, self.policy.backoff_max)  # addresses seen failing
        self.failovers = 0  # sessions reopened after a failure (tests, stats)
        self.busy_refusals = 0  # routes that refused for capacity (waited for, never blamed)
        self.busy_wait_s = 0.0  # time spent waiting for room, over all generations
        self.records: deque[FailoverRecord] = deque(maxlen=1000)  # the recovered ones, newest last
        self.last_route: Route | None = None
        self.speculation = speculation if speculation is not None and speculation.max_draft > 0 else None
        self.decode_stats = DecodeStats()  # round trips and tokens over all generations
        self._draft_times: dict[int, float] | None = None  # the last generation's step times by drafts (relative)
        self._reports: set[asyncio.Task[None]] = set()

    @property
    def max_context(self) -> int:
        return self._max_context

    def avoided_nodes(self) -> int:
        return len(self.avoid.avoided())

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    async def tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> AsyncGenerator[SampledToken, None]:
        if not prompt_ids:
            raise GenerationError("the prompt has no tokens")
        history = [int(t) for t in prompt_ids]
        max_length = min(self._max_context, len(history) + max_new_tokens + 1)
        spec = self.speculation.start(max_length, self._draft_times) if self.speculation else None
        self.decode_stats.generations += 1
        steps = self._generate(history, params, max_new_tokens, max_length, spec)
        try:
            async for token in steps:
                yield token
        finally:
            await steps.aclose()  # now, not when collected: it frees the session along the route
            if spec is not None:
                spec.close()
                if spec.k.cost_samples:  # measured: the next generation starts from it
                    self._draft_times = dict(spec.k.relative)

    async def _generate(
        self,
        history: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        max_length: int,
        spec: SpeculativeRun | None,
    ) -> AsyncGenerator[SampledToken, None]:
        """The generation of ``tokens``: ``history`` (the prompt) grows by every token."""
        policy = self.policy
        span = policy.replay == "span"
        stats = self.decode_stats
        prompt_length = len(history)
        route = await self._route(max_length)
        session_id = route.session_id or uuid.uuid4().hex
        capability = secrets.token_urlsafe(24)  # the sessions' secret: their Results and resumes need it
        clock = StepClock(policy)  # this session's: its timeouts follow its own routes' speed
        busy_deadline = time.monotonic() + policy.busy_wait
        generated = 0
        pending: FailoverRecord | None = None  # a failover not yet followed by a token
        failures = 0
        verifier = self._verifier(params, max_length, prompt_length)
        released = len(history)  # history[:released] is the prompt plus what the caller got
        check: asyncio.Task[CheckResult] | None = None
        restart = False  # the next session recomputes everything (after a lie)
        logprobs: dict[int, float] = {}  # history index -> the tail's logprob of that token
        try:
            while generated < max_new_tokens or released < len(history):
                self.last_route = route
                clock.prior(route.expected_step_s)
                if restart:
                    session_id = uuid.uuid4().hex
                session = RouteSession(
                    route.hops,
                    max_length=max_length,
                    sampling=params,
                    prompt_length=prompt_length,
                    session_id=session_id,
                    timeout=policy.open_timeout,
                    resumable=span,
                    resume=span and pending is not None and not restart,
                    token=self.token,
                    tls=self.tls,
                    capability=capability,
                )
                restart = False
                sent = time.monotonic()  # when the step now awaited was sent
                try:
                    async with session:
                        n = len(history)
                        if pending is not None:
                            pending.t_opened = time.monotonic()
                            pending.reroute_s = pending.t_opened - pending.t_detected
                            pending.kept, pending.hops = session.kept, route.hops
                            fresh = [h for h, k in zip(route.hops, session.kept) if k < n - 1] if span else route.hops
                            pending.replayed_tokens = n - min(session.kept, default=0) if span else n
                            pending.replayed_layers = sum(h.end - h.start for h in fresh)
                        if pending is not None and span and session.resume:
                            out = await session.replay(history, timeout=clock.timeout(pending.replayed_tokens))
                        else:
                            out = await session.prefill(history, timeout=clock.timeout(n))
                        clock.observe(n if pending is None else pending.replayed_tokens, time.monotonic() - sent)
                        drafts: list[int] = []
                        took: float | None = None  # the last decode step's round trip (None: a prefill or replay)
                        while True:
                            if out.token is None:
                                raise GenerationError("the tail returned no token")
                            if pending is not None:
                                self._recovered(pending)
                                pending = None
                            run = [*out.accepted, (out.token, out.logprob)]
                            stats.round_trips += 1
                            stats.tokens += len(run)
                            stats.drafted += len(drafts)
                            stats.accepted += len(out.accepted)
                            done = False
                            for token, logprob in run:
                                history.append(token)
                                logprobs[len(history) - 1] = logprob
                                generated += 1
                                if verifier is None:
                                    released = len(history)
                                    yield SampledToken(token, logprob)
                                done = generated >= max_new_tokens or (verifier is not None and token in self._eos)
                                if done:
                                    break
                            if verifier is None:
                                if generated >= max_new_tokens:
                                    return
                            else:
                                verifier.record(out)
                                wanted = done or released == prompt_length or verifier.want_check()
                                if check is None and not verifier.unavailable and wanted:
                                    check = asyncio.get_running_loop().create_task(verifier.check(list(history), route.hops))
                                if check is not None and (done or check.done()):
                                    for _ in range(3):  # a verifier caught lying: check again on another
                                        result = await check
                                        check = None
                                        self.checked_steps += result.checked
                                        if result.blame is None:
                                            break
                                        await self._caught(result.blame, session_id)
                                        if result.blame.on_main:
                                            raise _Lied(result.blame)
                                        if not done:
                                            break
                                        check = asyncio.get_running_loop().create_task(verifier.check(list(history), route.hops))
                                    if check is not None:  # verifiers kept lying: give up checking this one
                                        check.cancel()
                                        check = None
                                        logger.warning("no honest verifier found: the last tokens are released unchecked")
                                    upto = len(history) if done else min(len(history), verifier.checked_upto + 1)
                                    while released < upto:
                                        released += 1
                                        yield SampledToken(history[released - 1], logprobs[released - 1], verifier.checked)
                                if check is None and verifier.unavailable:  # nowhere to check: stop holding back
                                    while released < len(history):
                                        released += 1
                                        yield SampledToken(history[released - 1], logprobs[released - 1], verifier.checked)
                                if done and released >= len(history):
                                    return
                            if spec is not None:
                                spec.judge(history, drafts, [t for t, _ in run], took)
                                # The run may bring up to len(drafts) + 1 tokens: within max_new_tokens and the session.
                                limit = min(max_new_tokens - generated - 1, max_length - len(history))
                                drafts = await spec.drafts_for(history, limit)
                            sent = time.monotonic()
                            out = await session.verify(history[-1], drafts, timeout=clock.timeout(1 + len(drafts)))
                            took = time.monotonic() - sent
                            clock.observe(1 + len(drafts), took)
                except _Lied as lie:
                    # Its results from the first wrong position on are void: cut the history
                    # there and recompute it on a route without the liar (a fresh session:
                    # survivors downstream of it hold caches built on its output).
                    q = lie.blame.position
                    if check is not None:
                        check.cancel()
                        check = None
                    del history[max(q + 1, prompt_length) :]
                    generated = len(history) - prompt_length
                    assert verifier is not None
                    verifier.rewind(q)
                    self.failovers += 1
                    restart = True
                    pending = None
                    route = await self._route(max_length)
                    continue
                except RouteError as err:
                    if err.busy:
                        # Full, not failed: no blame, no avoidance, no report; wait and ask again.
                        self.busy_refusals += 1
                        at_start = generated == 0 and pending is None
                        if at_start and policy.busy_at_start == "raise":
                            raise BusyError(f"the swarm is busy: {err.message}", err.retry_after) from err
                        wait = min(err.retry_after, busy_deadline - time.monotonic())
                        if wait <= 0:
                            raise BusyError(
                                f"no room in the swarm within {policy.busy_wait:g} s: {err.message}", err.retry_after
                            ) from err
                        logger.info("hop %s is busy (%s); retrying in %.2f s", err.address, err.message, wait)
                        t0 = time.monotonic()
                        await asyncio.sleep(wait)
                        self.busy_wait_s += time.monotonic() - t0
                        route = await self._route(max_length)
                        if not span or pending is None:  # a fresh session (the refused open left nothing)
                            session_id = route.session_id or uuid.uuid4().hex
                        continue
                    failures += 1
                    if err.code not in _RETRYABLE or failures > policy.max_failovers:
                        raise GenerationError(f"generation failed after {failures} failure(s): {err}") from err
                    detected = time.monotonic()
                    culprits = await blame(err, route.hops, clock.probe_timeout(), call_metadata(self.token), self.tls)
                    if err.code == grpc.StatusCode.DEADLINE_EXCEEDED and not culprits:
                        clock.slower()  # every hop answers: the route is slow, not dead
                    for hop in culprits:
                        backoff = self.avoid.record(hop_key(hop))
                        logger.warning("hop %s (layers [%d, %d)) failed: %s; avoided for %.0f s", hop.address, hop.start, hop.end, err, backoff)
                        self._background(self.routes.report_failure(_naming(err, hop), session_id))
                    if pending is None:
                        first = culprits[0] if culprits else None
                        pending = FailoverRecord(
                            session_id=session_id,
                            node_id=first.node_id if first else err.node_id,
                            address=first.address if first else err.address,
                            code=err.code.name,
                            message=err.message,
                            history_tokens=len(history),
                            mode=policy.replay,
                            t_failed=sent,
                            t_detected=detected,
                        )
                        pending.detect_s = detected - sent
                    else:
                        pending.attempts += 1
                    self.failovers += 1
                    if err.code == grpc.StatusCode.FAILED_PRECONDITION and not culprits:
                        await asyncio.sleep(policy.retry_delay)  # a hop was reassigned: let it announce its new range
                    route = await self._reroute(route, culprits, max_length)
                    if not span:
                        session_id = route.session_id or uuid.uuid4().hex

        finally:
            if check is not None:
                check.cancel()
            if verifier is not None:
                await verifier.aclose()

    def _verifier(self, params: SamplingParams, max_length: int, prompt_length: int) -> Verifier | None:
        if self.verify.rate <= 0 or not self.routes.has_alternatives():
            return None
        verifier = Verifier(
            self.routes, policy=self.verify, max_length=max_length, sampling=params,
            prompt_length=prompt_length, token=self.token, tls=self.tls,
        )
        verifier.excluded |= self.quarantined
        return verifier

    async def _caught(self, blame: Blame, session_id: str) -> None:
        """A liar caught by a spot check: never route through it again, and report it."""
        logger.warning(
            "spot check: %s (layers [%d, %d)) lied at %s; witnesses %s",
            blame.address, blame.start, blame.end, blame.detail, ", ".join(blame.witnesses),
        )
        self.quarantined.add(blame.address)
        self.blames.append(blame)
        self._background(self.routes.report_liar(blame, session_id))

    async def _reroute(self, old: Route, culprits: Sequence[Hop], max_length: int) -> Route:
        """A route avoiding the failed hops: the old one patched where possible (its
        survivors keep the session's cache), else a new one from the provider."""
        if self.policy.replay == "span" and culprits:
            try:
                nodes = await self.routes.list_nodes()
            except RouteError as err:
                logger.info("no node list (%s): asking for a new route", err)
            else:
                hops = patch_route(old.hops, culprits, nodes, set(self.avoid.avoided()) | self.quarantined)
                if hops is not None:
                    return Route(hops, old.session_id, old.expected_step_s)
        return await self._route(max_length)

    async def _route(self, max_length: int) -> Route:
        """A route from the provider, waiting (bounded) while none exists."""
        deadline = time.monotonic() + self.policy.no_route_wait
        delay = self.policy.retry_delay
        while True:
            avoided = set(self.avoid.avoided()) | self.quarantined
            try:
                return await self.routes.route(max_length=max_length, exclude_addresses=avoided)
            except RouteError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE:  # refused (a wrong token, an unknown model)
                    raise GenerationError(f"no route: {err.message}") from err
                # No route yet (a reassignment is loading, the swarm is still joining): wait a bit.
                if time.monotonic() + delay > deadline:
                    raise GenerationError(
                        f"no route after waiting {self.policy.no_route_wait:g} s: {err.message}"
                    ) from err
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _recovered(self, record: FailoverRecord) -> None:
        record.replay_s = time.monotonic() - record.t_opened
        self.records.append(record)
        logger.warning("failover: %s", record.summary())
        self._background(self.routes.report_recovery(record))

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def aclose(self) -> None:
        if self._reports:
            await asyncio.wait(set(self._reports), timeout=2.0)
        await self.routes.aclose()


class _Lied(Exception):
    """A spot check caught a node of the current route lying (internal to ``tokens``)."""

    def __init__(self, blame: Blame) -> None:
        super().__init__(blame.detail)
        self.blame = blame


def _naming(error: RouteError, hop: Hop) -> RouteError:
    """``error`` as a report about ``hop`` (a probe may blame another hop than the error named)."""
    if hop.address == error.address and (not hop.node_id or hop.node_id == error.node_id):
        return error
    return RouteError(error.code, error.message, address=hop.address, node_id=hop.node_id, step_id=error.step_id)
