"""The ``swarm.Coordinator`` gRPC service: routes, failure reports, the node list.

Routes come from :func:`swarm_coordinator.routing.find_route` over the registry's
current state. A node reported as failed is left out of routes for a backoff that
doubles with every report (2 s, 4 s, ... up to a minute) and is forgotten after a quiet
spell (:class:`swarm_proto.backoff.Backoff`, the very mechanism clients use; clients
never report a node that only refused for capacity); when leaving the reported nodes out would leave no route at all, they are used
anyway (a report may say more about the client's network than about the node).

A report with ``evidence`` says a spot check caught the node lying (docs/verification.md):
the node is quarantined -- left out of every route and of the node list for good (until
the coordinator restarts), a ``quarantine`` event published with the evidence. Evidence
needs two witnesses, known nodes other than the accused, that agreed against it.

This is the only module of the coordinator that reads or builds ``swarm_pb2`` messages.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping

import grpc

from swarm_coordinator.errors import NoRouteError
from swarm_coordinator.registry import Registry
from swarm_coordinator.routing import RecentRoutes, RouteIndex, RoutingPolicy, Span, route_latency
from swarm_coordinator.state import NodeView, SwarmState
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.backoff import Backoff
from swarm_proto.presence import MAX_RTT_S, Event, EventKind
from swarm_proto.wire import code_name, printable, session_label

log = logging.getLogger(__name__)

__all__ = ["CoordinatorService"]

MAX_EXCLUDES = 256
MAX_CLIENT_RTTS = 64  # round trips one route request may carry
ROUTE_STATE_MAX_AGE_S = 0.1  # what routing reads is at most this old (Registry.snapshot)
MIN_WITNESSES = 2


class CoordinatorService(swarm_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        registry: Registry,
        *,
        mqtt_url: str,
        version: str,
        failures: Backoff | None = None,
        policy: RoutingPolicy = RoutingPolicy(),
        clock: Callable[[], float] = time.monotonic,
        coordinator_key: bytes = b"",
    ) -> None:
        self.registry = registry
        self.mqtt_url = mqtt_url  # never with credentials: every caller may read it
        self.coordinator_key = coordinator_key
        self.version = version
        self.failures = failures or Backoff()  # node ids reported as failed (the client's schedule)
        self.policy = policy
        self.recent = RecentRoutes()
        self._index: RouteIndex | None = None  # of the last snapshot routed on
        self._clock = clock
        self.routes_given = 0
        self.route_seconds: deque[float] = deque(maxlen=20_000)  # time in GetRoute, the most recent calls
        self.route_cpu_seconds: deque[float] = deque(maxlen=20_000)  # CPU time of this thread in them
        self.failovers = 0  # recovered failovers reported by clients
        self.quarantined: dict[str, str] = {}  # node id -> the evidence, one line (bounded by the known nodes)

    # --- GetRoute ---------------------------------------------------------------------

    async def GetRoute(self, request: swarm_pb2.RouteRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.Route:  # type: ignore[type-arg]
        started, cpu = time.perf_counter(), time.thread_time()
        state = self.registry.snapshot(ROUTE_STATE_MAX_AGE_S)
        if request.model and request.model != state.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this swarm serves {state.model!r}, not {request.model!r}")
        if request.max_length < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_length must be >= 0")
        if len(request.exclude_node_ids) + len(request.exclude_addresses) > MAX_EXCLUDES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_EXCLUDES} exclusions")
        if len(request.client_rtt_s) > MAX_CLIENT_RTTS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_CLIENT_RTTS} client round trips")
        rtts = dict(request.client_rtt_s)
        if not all(math.isfinite(v) and 0 <= v <= MAX_RTT_S for v in rtts.values()):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"client round trips must be in [0, {MAX_RTT_S:g}] s")
        now = self._clock()
        asked = set(request.exclude_node_ids) | _ids_at(state, request.exclude_addresses) | self.quarantined.keys()
        try:
            spans = self._route(state, request.max_length or 1, asked, self.failures.avoided(now), now, rtts)
        except NoRouteError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        links = self._index.links if self._index is not None and self._index.state is state else None
        expected = route_latency(
            state, spans, recent=self.recent.counts(now), policy=self.policy, client_rtts=rtts, links=links
        )
        self.recent.record(spans, now)
        self.routes_given += 1
        self.route_seconds.append(time.perf_counter() - started)
        self.route_cpu_seconds.append(time.thread_time() - cpu)
        return swarm_pb2.Route(
            hops=[swarm_pb2.Hop(address=s.address, start=s.start, end=s.end, node_id=s.node_id) for s in spans],
            session_id=uuid.uuid4().hex,
            num_layers=state.num_layers,
            expected_step_s=expected,
        )

    def _route(
        self, state: SwarmState, max_length: int, asked: Collection[str], avoided: Collection[str], now: float,
        rtts: Mapping[str, float],
    ) -> tuple[Span, ...]:
        recent = self.recent.counts(now)
        if self._index is None or self._index.state is not state:
            self._index = RouteIndex(state, self.policy, recent, previous=self._index)
        try:
            return self._index.route(
                max_length=max_length, exclude=set(asked) | set(avoided), recent=recent, client_rtts=rtts
            )
        except NoRouteError:
            if not set(avoided) - set(asked):
                raise
            log.info("no route without the recently failed nodes %s: using them anyway", sorted(avoided))
            return self._index.route(max_length=max_length, exclude=asked, recent=recent, client_rtts=rtts)

    # --- ReportFailure ----------------------------------------------------------------

    async def ReportFailure(self, request: swarm_pb2.FailureReport, context: grpc.aio.ServicerContext) -> swarm_pb2.FailureAck:  # type: ignore[type-arg]
        problem = check_report(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        state = self.registry.state
        node_id = request.node_id
        if not node_id and request.address:
            node_id = next(iter(sorted(_ids_at(state, [request.address]))), "")
        if request.recovered:
            # The second report of a failover: the session produced a token again. This
            # is the failover event (the first report only moved routes away).
            self.failovers += 1
            detail = failover_detail(request)
            known = node_id if node_id in state.nodes else None  # a report names nodes; only known ones are shown
            log.warning("failover of %s: %s", known or printable(node_id or request.address, 64), detail)
            await self.registry.publish_event(Event(EventKind.FAILOVER, known, detail))
            return swarm_pb2.FailureAck()
        if not node_id or node_id not in state.nodes:
            # Unknown nodes cannot be routed to anyway; acknowledge so clients move on.
            log.info("failure report for an unknown node %r at %r", request.node_id[:64], request.address[:64])
            return swarm_pb2.FailureAck()
        if request.HasField("evidence"):
            await self._quarantine(state, node_id, request)
            return swarm_pb2.FailureAck()
        backoff = self.failures.record(node_id, self._clock())
        log.warning(
            "node %s reported failing (%s: %s, session %s): avoided for %.0f s",
            node_id, code_name(request.code), printable(request.message, 200), session_label(request.session_id), backoff,
        )
        return swarm_pb2.FailureAck()

    async def _quarantine(self, state: SwarmState, node_id: str, request: swarm_pb2.FailureReport) -> None:
        ev = request.evidence
        witnesses = {w for w in ev.witnesses if w in state.nodes and w != node_id}
        if len(witnesses) < MIN_WITNESSES:
            log.warning("evidence against %s ignored: %d known witnesses, %d needed", node_id, len(witnesses), MIN_WITNESSES)
            return
        if node_id in self.quarantined:
            return
        detail = (
            f"layers [{ev.start}, {ev.end}) wrong at position {ev.position}: {ev.detail[:300]}; "
            f"claimed {_floats(ev.claimed)}, recomputed {_floats(ev.recomputed)}; witnesses {', '.join(sorted(witnesses))}"
        )
        self.quarantined[node_id] = detail
        log.warning("node %s quarantined: %s", node_id, detail)
        await self.registry.publish_event(Event(EventKind.QUARANTINE, node_id, detail))

    # --- ListNodes --------------------------------------------------------------------

    async def ListNodes(self, request: swarm_pb2.ListNodesRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.NodeList:  # type: ignore[type-arg]
        state = self.registry.state
        nodes = [
            _node_info(state, v) for v in state.online()
            if (not request.model or v.status.model == request.model) and v.node_id not in self.quarantined
        ]
        return swarm_pb2.NodeList(nodes=nodes)

    # --- GetSwarmInfo -----------------------------------------------------------------

    async def GetSwarmInfo(self, request: swarm_pb2.SwarmInfoRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.SwarmInfo:  # type: ignore[type-arg]
        state = self.registry.state
        return swarm_pb2.SwarmInfo(
            swarm_id=self.registry.config.swarm_id,
            mqtt_url=self.mqtt_url,
            model=state.model,
            num_layers=state.num_layers,
            version=self.version,
            coordinator_key=self.coordinator_key,
        )


def _floats(values: Collection[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in list(values)[:8]) + "]"
MAX_REPORT_FIELD = 256  # characters of a report's ids and address
MAX_REPORT_MESSAGE = 4096  # characters of its message (the event shows 120 of them)


def check_report(report: swarm_pb2.FailureReport) -> str:
    """Why a report is refused (INVALID_ARGUMENT), or "": a caller picks its strings, and
    they end up in logs and in every dashboard snapshot."""
    for name in ("node_id", "address", "session_id", "mode"):
        if len(getattr(report, name)) > MAX_REPORT_FIELD:
            return f"{name} is longer than {MAX_REPORT_FIELD} characters"
    if len(report.message) > MAX_REPORT_MESSAGE:
        return f"message is longer than {MAX_REPORT_MESSAGE} characters"
    ev = report.evidence
    if len(ev.detail) > MAX_REPORT_MESSAGE or len(ev.witnesses) > 16 or max(len(ev.claimed), len(ev.recomputed)) > 64:
        return "evidence too large (detail 4096 characters, 16 witnesses, 64 values at most)"
    if any(len(w) > MAX_REPORT_FIELD for w in ev.witnesses):
        return f"a witness id is longer than {MAX_REPORT_FIELD} characters"
    return ""


def failover_detail(report: swarm_pb2.FailureReport) -> str:
    """The event line of a recovered failover: which session (its label, never its id),
    what failed, what it cost. Every string in it is cut and made printable."""
    return (
        f"session {session_label(report.session_id)}: {code_name(report.code)} ({printable(report.message, 120)}); "
        f"stall {report.stall_s:.3f} s (detect {report.detect_s:.3f}, reroute {report.reroute_s:.3f}, "
        f"replay {report.replay_s:.3f}); replayed {report.replayed_tokens} of {report.history_tokens} tokens "
        f"({printable(report.mode or 'full', 16)})"
    )


def _ids_at(state: SwarmState, addresses: Collection[str]) -> set[str]:
    if not addresses:
        return set()  # the common request: no walk over a thousand nodes
    wanted = set(addresses)
    return {v.node_id for v in state.nodes.values() if v.address and v.address in wanted}


def _node_info(state: SwarmState, view: NodeView) -> swarm_pb2.NodeInfo:
    hosted = view.status.hosted
    load = view.load
    return swarm_pb2.NodeInfo(
        node_id=view.node_id,
        model=view.status.model,
        start=hosted.start if hosted else 0,
        end=hosted.end if hosted else 0,
        num_layers=state.num_layers,
        device=view.status.device,
        active_sessions=load.active_sessions if load else 0,
        address=view.address,
        stats=swarm_pb2.NodeStats(queued_steps=load.queued_steps if load else 0),
        peer_rtt_s={p.node_id: p.rtt_s for p in load.peer_rtts} if load else {},
    )
