"""The ``swarm.Node`` gRPC service: sessions, forwarding along the route, results.

One Session stream per session reaches this node from its upstream (the client at
the head, the previous node elsewhere). For each session the node holds a KV cache
and, unless it is the tail, ONE long-lived Session stream to its successor, opened
with the rest of the route. A step is validated, computed by the scheduler (merged
with other sessions' steps) and forwarded; at the tail it becomes a ``Result`` on the
stream the client opened with ``Results``.

Failures are reported upstream in-band (an ``Error`` reply naming the node where it
happened) and then as the stream's gRPC status, so a client can both read the status
and tell which hop to report. A bad message ends only its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import grpc
import torch
from google.protobuf.message import DecodeError

from swarm_node import convert, resume
from swarm_node.admission import Admission, Busy, kv_bytes
from swarm_node.config import NodeConfig
from swarm_node.convert import ProtocolError
from swarm_node.engine import reslice
from swarm_node.engine.loading import model_bytes
from swarm_node.engine.model import ModelSlice
from swarm_node.scheduler import Scheduler
from swarm_node.session import Failed, NodeSession
from swarm_proto import swarm_pb2, swarm_pb2_grpc, version, wire
from swarm_proto.transport import ChannelPool, call_metadata
from swarm_proto.weight_format import describe

log = logging.getLogger(__name__)


AUTO_KV_SESSIONS = 16  # without --kv-budget: the KV memory of this many full-length sessions
RESULTS_WAIT_S = 5.0  # how long a step waits for its client to read results beyond the bounds


class NodeService(swarm_pb2_grpc.NodeServicer):
    def __init__(self, config: NodeConfig, model: ModelSlice, scheduler: Scheduler, *, address: str) -> None:
        self.config = config
        self.model = model
        self.scheduler = scheduler
        self.address = address
        self.draining = False
        self.sessions: dict[str, NodeSession] = {}
        self.opened = 0
        self.refused = 0
        self._channels = ChannelPool(tls=config.tls)  # to successors: held per session, idle ones bounded
        self._background: set[asyncio.Task[None]] = set()
        self.on_session_end: Callable[[str], None] | None = None  # metrics hook: the reason
        self._views: dict[tuple[int, int], ModelSlice] = {}
        self._steps_running = 0  # steps between submit and sent on (what a drain waits for)
        self._no_steps = asyncio.Event()
        self._no_steps.set()
        self.parking = resume.ParkingLot(config.park_timeout, config.max_sessions)  # failed resumable sessions
        self.admission = Admission(self._kv_budget(model), config.max_sessions)  # KV room, open + opening

    def _kv_budget(self, model: ModelSlice) -> int:
        """The configured KV budget, or room for AUTO_KV_SESSIONS full-length sessions on ``model``'s layers."""
        return self.config.kv_budget or AUTO_KV_SESSIONS * self.session_bytes(model.end - model.start, self.config.max_length)

    def session_bytes(self, layers: int, max_length: int) -> int:
        """The KV bytes a session on ``layers`` of this model with ``max_length`` reserves."""
        a = self.model.args
        element = torch.empty((), dtype=self.model.dtype).element_size()
        return kv_bytes(layers, max_length, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, element_size=element)

    def free_kv_tokens(self) -> int:
        """Full-slice positions a new session could still reserve here (load reports, metrics)."""
        per_position = self.session_bytes(self.model.end - self.model.start, 1) // 64
        return self.admission.free_bytes(self.parking.nbytes) // max(1, per_position)

    def kv_tokens(self) -> int:
        per_position = self.session_bytes(self.model.end - self.model.start, 1) // 64
        return self.admission.budget_bytes // max(1, per_position)

    # --- Info -----------------------------------------------------------------------

    async def Info(self, request: swarm_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.NodeInfo:  # type: ignore[type-arg]
        return convert.node_info_to_proto(
            self.config,
            self.model.args,
            address=self.address,
            version=version(),
            active_sessions=len(self.sessions),
            stats=self.scheduler.stats,
            queued=self.scheduler.queued,
            opened=self.opened,
            refused=self.refused,
            weight_format=describe(self.config.weight_format, self.config.resolved_dtype, self.config.model),
            weight_bytes=model_bytes(self.model),
        )

    # --- Session --------------------------------------------------------------------

    async def Session(
        self,
        request_iterator: AsyncIterator[swarm_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> None:
        requests = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(requests.__anext__(), self.config.open_timeout)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        except DecodeError as exc:  # bytes that are not a SessionRequest
            await self._abort(context, self._error(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {exc}"), None)
            return
        session: NodeSession | None = None
        reason = "closed"
        try:
            if first.WhichOneof("kind") == "open" and first.open.resume:
                await self._supersede(first.open.session_id, first.open.capability)
            session = await self._admit(first)
            session.task = asyncio.current_task()
            if session.spec.downstream:
                await self._connect(session)
            kept = (session.kept, *session.downstream_kept)
            await context.write(convert.opened_reply(session.sid, session.spec.max_length, kept, session.spec.capability))
            self._log_open(session)
            reason = await self._serve(session, requests, context)
        except ProtocolError as exc:
            reason = f"refused: {exc.message}"
            step_id = session.current_step if session is not None else 0
            error = self._error(exc.code, exc.message, step_id=step_id, retry_after_s=exc.retry_after_s)
            await self._abort(context, error, session)
        except Failed as exc:
            reason = f"failed: {exc.error.message}"
            await self._abort(context, exc.error, session)
        except asyncio.CancelledError:
            if session is None or session.failure is None:
                reason = "upstream went away"
                raise
            _uncancel()
            reason = f"failed: {session.failure.message}"
            await self._abort(context, session.failure, session)
        finally:
            if session is not None:
                await self._release(session, reason)

    async def _admit(self, first: swarm_pb2.SessionRequest) -> NodeSession:
        if first.WhichOneof("kind") != "open":
            raise convert.invalid("the first message of a Session stream must be `open`")
        if self.draining:
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        args = self.model.args
        spec = convert.open_from_proto(
            first.open,
            start=self.model.start,
            end=self.model.end,
            num_layers=args.num_layers,
            max_length=self.config.max_length,
        )
        if spec.session_id in self.sessions or spec.session_id in self.admission:
            raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS, f"session {spec.session_id!r} is already open here")
        if not spec.capability:  # the first node of the route makes the session's secret
            spec = replace(spec, capability=secrets.token_urlsafe(24))
        model = self.view(spec.start, spec.end)
        held = None
        if spec.resume:
            if not self.parking.may_take(spec.session_id, spec.capability):
                raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED, "a resume must present the session's capability")
            held = self.parking.take(spec.session_id, spec.start, spec.end, spec.max_length, spec.capability)
        nbytes = self.session_bytes(spec.end - spec.start, spec.max_length)
        refusal = None
        if held is None:  # a resumed cache was counted while parked: it needs no new room
            try:
                refusal = await self._make_room(nbytes)
            except ValueError as exc:  # can never fit here: not busy, the request is too big
                raise ProtocolError(grpc.StatusCode.OUT_OF_RANGE, str(exc)) from exc
        if refusal is not None:
            self.refused += 1
            log.info("session %s refused, %s; retry in %.2f s", spec.session_id, refusal.message, refusal.retry_after_s)
            raise convert.busy(refusal.message, refusal.retry_after_s)
        self.admission.reserve(spec.session_id, nbytes)  # opening: waiting for its cache
        try:
            # On the forward thread: the slice's KV pool may grow, which must not happen mid-forward.
            cache = held.cache if held is not None else await self.scheduler.call(model.new_cache, spec.max_length)
        except (RuntimeError, MemoryError) as exc:  # torch raises RuntimeError/OutOfMemoryError
            self.refused += 1
            self.admission.release(spec.session_id)
            raise convert.busy(f"busy: no memory for the KV cache: {exc}", self.admission.retry_after_s()) from exc
        except BaseException:
            self.admission.release(spec.session_id)
            raise
        self.admission.opened(spec.session_id)
        session = NodeSession(spec=spec, cache=cache, model=model)
        try:
            if held is not None:
                held.adopt_into(session)
            else:
                resume.new_outputs(session, args.hidden_size)
        except BaseException:
            self.admission.release(spec.session_id)
            raise
        self.sessions[spec.session_id] = session
        self.opened += 1
        return session

    def _refusal(self, nbytes: int) -> Busy | None:
        return self.admission.refusal(nbytes, self.parking.nbytes, parked=len(self.parking))

    def _drop_parked(self, nbytes: int) -> Busy | None:
        """Parked caches give way to a live session, oldest first."""
        refusal = self._refusal(nbytes)
        while refusal is not None and self.parking.drop_oldest():
            refusal = self._refusal(nbytes)
        return refusal

    async def _make_room(self, nbytes: int) -> Busy | None:
        """Room for a session of ``nbytes``, or why there is none: parked caches give way
        first, then sessions idle for more than ``idle_evict_after``, the longest idle
        first and only as many as needed. So a caller that opens sessions and leaves
        them cannot hold the node for the whole idle timeout; their clients own the
        token history and fail over (a replay) if they come back."""
        refusal = self._drop_parked(nbytes)
        if refusal is None:
            return None
        now = time.monotonic()
        idle = sorted(
            (s for s in self.sessions.values() if not s.busy and now - s.last_active > self.config.idle_evict_after),
            key=lambda s: s.last_active,
        )
        for session in idle:
            idle_s = now - session.last_active
            session.fail(
                self._error(
                    grpc.StatusCode.ABORTED,
                    f"evicted: idle for {idle_s:.0f} s while the node was full "
                    f"(--idle-evict-after {self.config.idle_evict_after:g} s)",
                )
            )
            if session.task is not None and not session.task.done():
                await asyncio.wait({session.task}, timeout=2.0)
            log.info("session %s evicted after %.0f s idle to make room", session.sid, idle_s)
            refusal = self._drop_parked(nbytes)  # (an evicted resumable session parks)
            if refusal is None:
                break
        return refusal

    async def _connect(self, session: NodeSession) -> None:
        """Open the successor's Session stream and wait until the rest of the route is open."""
        hop = session.spec.downstream[0]
        stub = swarm_pb2_grpc.NodeStub(self._channels.acquire(hop.address))
        session.channel_address = hop.address
        try:
            call = stub.Session(metadata=call_metadata(self.config.token))
            session.downstream = call
            await call.write(swarm_pb2.SessionRequest(open=wire.open_to_proto(session.spec, session.spec.downstream)))
            reply = await asyncio.wait_for(call.read(), self.config.open_timeout)
        except asyncio.TimeoutError:
            raise Failed(self._error(grpc.StatusCode.DEADLINE_EXCEEDED, "timed out opening the session", at=hop)) from None
        except grpc.aio.AioRpcError as exc:
            raise Failed(self._rpc_error(exc, hop)) from exc
        if reply is grpc.aio.EOF:
            raise Failed(self._error(grpc.StatusCode.UNAVAILABLE, "successor ended the stream while opening", at=hop))
        if reply.WhichOneof("kind") == "error":
            raise Failed(reply.error)
        if reply.WhichOneof("kind") != "opened":
            raise Failed(self._error(grpc.StatusCode.INTERNAL, "successor answered open with a step ack", at=hop))
        session.downstream_kept = tuple(reply.opened.kept)
        session.reader = asyncio.get_running_loop().create_task(self._read_downstream(session, call))

    async def _read_downstream(self, session: NodeSession, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        hop = session.spec.downstream[0]
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    if not session.closing:
                        session.fail(self._error(grpc.StatusCode.UNAVAILABLE, "successor ended the session", at=hop))
                    return
                if reply.WhichOneof("kind") == "error":
                    session.fail(reply.error)
                    return
        except grpc.aio.AioRpcError as exc:
            if not session.closing:
                session.fail(self._rpc_error(exc, hop))

    async def _serve(
        self,
        session: NodeSession,
        requests: AsyncIterator[swarm_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> str:
        """Handle steps until Close or the end of the upstream's stream."""
        while True:
            try:
                req = await requests.__anext__()
            except StopAsyncIteration:
                await self._close_downstream(session)
                return "upstream finished"
            except DecodeError as exc:
                raise convert.invalid(f"malformed message: {exc}") from exc
            session.last_active = time.monotonic()
            kind = req.WhichOneof("kind")
            if kind == "step":
                await self._step(session, req.step)
            elif kind == "close":
                await self._close_downstream(session)
                return "closed"
            else:
                raise convert.invalid("session is already open")

    async def _step(self, session: NodeSession, msg: swarm_pb2.Step) -> None:
        session.current_step = msg.step_id
        if self.draining:
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        args = session.model.args
        step = convert.step_from_proto(
            msg,
            is_head=session.model.is_head,
            hidden_size=args.hidden_size,
            vocab_size=args.vocab_size,
            dtype=session.model.dtype,
            max_tokens=session.spec.max_length,
        )
        if step.step_id <= session.last_step_id:
            raise convert.invalid(f"step_id {step.step_id} after {session.last_step_id}: ids must increase")
        session.last_step_id = step.step_id
        cache = session.cache
        if step.start_pos > cache.length:
            raise convert.invalid(
                f"step {step.step_id} starts at position {step.start_pos} but {cache.length} positions are cached"
            )
        if step.start_pos > session.verified:
            raise convert.invalid(
                f"step {step.step_id} starts at position {step.start_pos} but this resumed session is confirmed "
                f"up to {session.verified}: replay from 0 first"
            )
        if step.start_pos + step.length > cache.max_length:
            raise ProtocolError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"step {step.step_id} reaches position {step.start_pos + step.length}, past max_length {cache.max_length}",
            )
        if step.return_logits and session.model.is_tail:
            logits_bytes = step.length * args.vocab_size * 4
            if logits_bytes > self.config.max_pending_result_bytes:
                raise ProtocolError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"step {step.step_id} asks for {logits_bytes / 1e6:.1f} MB of logits; at most "
                    f"{self.config.max_pending_result_bytes / 1e6:.1f} MB a step here: ask in shorter steps",
                )
        if resume.can_skip(session, step):
            await self._skip(session, step)
            return
        job = session.job(step)
        session.busy = True
        self._steps_running += 1
        self._no_steps.clear()
        try:
            out = await self.scheduler.submit(job)
            resume.confirm(session, step, out.hidden)
            session.steps += 1
            session.tokens += step.length
            model = session.model
            commit = convert.commitment(
                step, out.commit, node_id=self.config.node_id, address=self.address, start=model.start, end=model.end
            )
            if session.model.is_tail:
                result = session.result(step, out, commit)
                if result is not None:
                    await self._publish(session, result)
            else:
                assert out.hidden is not None and session.downstream is not None
                request = swarm_pb2.SessionRequest(
                    step=convert.step_to_proto(step, out.hidden, session.spec.wire_codec, commit)
                )
                await self._send_downstream(session, request)
        except ValueError as exc:  # the engine refused the step (checked above; a safety net)
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"step {step.step_id}: {exc}") from exc
        except RuntimeError as exc:  # the forward itself failed (out of memory, device error)
            raise ProtocolError(grpc.StatusCode.INTERNAL, f"step {step.step_id}: {exc}") from exc
        finally:
            session.busy = False
            session.last_active = time.monotonic()
            self._steps_running -= 1
            if not self._steps_running:
                self._no_steps.set()

    async def _publish(self, session: NodeSession, result: swarm_pb2.Result) -> None:
        """Queue a result for the client's Results stream, within the session's bounds.

        Over them the step waits (backpressure: the upstream's stream is not read
        meanwhile) up to ``RESULTS_WAIT_S`` for the client to catch up; a client that
        does not read its results then loses its session, and the node no memory."""
        size = result.ByteSize()
        cfg = self.config

        def over() -> bool:
            count = session.results.qsize()
            return count >= cfg.max_pending_results or (count > 0 and session.pending_bytes + size > cfg.max_pending_result_bytes)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESULTS_WAIT_S
        while over():
            remaining = deadline - loop.time()
            if remaining <= 0:
                count, held = session.results.qsize(), session.pending_bytes
                raise ProtocolError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{count} results ({held / 1e6:.1f} MB) wait unread at the tail (at most {cfg.max_pending_results} "
                    f"and {cfg.max_pending_result_bytes / 1e6:.1f} MB): read the session's Results stream",
                )
            session.results_taken.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(session.results_taken.wait(), remaining)
        session.pending_bytes += size
        session.results.put_nowait(result)

    async def _skip(self, session: NodeSession, step: convert.StepIn) -> None:
        """A replay step this node already holds: send on the activations it kept."""
        session.verified = step.start_pos + step.length
        if session.model.is_tail:
            return
        assert session.outputs is not None and session.downstream is not None
        hidden = session.outputs[step.start_pos : session.verified]
        request = swarm_pb2.SessionRequest(step=convert.step_to_proto(step, hidden, session.spec.wire_codec))
        await self._send_downstream(session, request)

    async def _send_downstream(self, session: NodeSession, request: swarm_pb2.SessionRequest) -> None:
        """Write to the successor; a successor that is gone ends the session with an
        in-band error naming it (the reader's verdict when it came first)."""
        assert session.downstream is not None
        hop = session.spec.downstream[0]
        try:
            await session.downstream.write(request)
        except grpc.aio.AioRpcError as exc:
            raise Failed(session.failure or self._rpc_error(exc, hop)) from exc
        except asyncio.InvalidStateError as exc:  # the call ended between the reader's verdict and this write
            raise Failed(session.failure or self._error(grpc.StatusCode.UNAVAILABLE, "successor ended the session", at=hop)) from exc

    async def _supersede(self, session_id: str, capability: str) -> None:
        """A resume of a session still open here: its upstream gave up on it (a step
        timed out somewhere). End it -- it parks -- so the resume can adopt its cache.
        Only its opener can: the resume must carry the session's capability."""
        old = self.sessions.get(session_id)
        if old is None or not old.spec.resumable:
            return
        if not _same_secret(old.spec.capability, capability):
            raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED, "a resume must present the session's capability")
        old.fail(self._error(grpc.StatusCode.ABORTED, "superseded by a resume of the session"))
        if old.task is not None and old.task is not asyncio.current_task():
            await asyncio.wait({old.task}, timeout=5.0)

    async def _close_downstream(self, session: NodeSession, *, wait: bool = True) -> None:
        """Send Close to the successor. Its stream is ordered, so it first finishes every
        step already sent (the tail publishes their results), then frees the session."""
        session.closing = True
        call = session.downstream
        if call is None or session.close_sent or call.done():
            return
        session.close_sent = True
        try:
            await asyncio.wait_for(call.write(swarm_pb2.SessionRequest(close=swarm_pb2.Close())), 2.0)
            await asyncio.wait_for(call.done_writing(), 2.0)
            if wait and session.reader is not None:
                await asyncio.wait_for(asyncio.shield(session.reader), timeout=self.config.drain_timeout)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, asyncio.TimeoutError) as exc:
            log.debug("session %s: closing downstream: %s", session.sid, exc)

    async def _finish_downstream(self, session: NodeSession) -> None:
        """Let the successor finish what it was sent, then drop the stream."""
        call = session.downstream
        assert call is not None
        try:
            await self._close_downstream(session, wait=True)
        finally:
            if session.reader is not None and not session.reader.done():
                session.reader.cancel()
            if not call.done():
                call.cancel()
            self._release_channel(session)  # only now: the pool may close an unused channel

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        error: swarm_pb2.Error,
        session: NodeSession | None,
    ) -> None:
        if session is not None:
            session.failure = session.failure or error
            session.results.put_nowait(convert.failed_result(session.sid, error))
        where = error.node_address or self.address
        try:
            await context.write(swarm_pb2.SessionReply(error=error))
        except (grpc.aio.AioRpcError, RuntimeError) as exc:  # upstream already gone
            log.debug("could not report error upstream: %s", exc)
        await context.abort(wire.status_code(error), f"{error.message} (at {where})")

    def _release_channel(self, session: NodeSession) -> None:
        if session.channel_address:
            self._channels.release(session.channel_address)
            session.channel_address = ""

    async def _release(self, session: NodeSession, reason: str) -> None:
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]
            self.admission.release(session.sid, time.monotonic() - session.opened_at)
            hosted = self.model.start <= session.spec.start and session.spec.end <= self.model.end
            if reason != "closed" and hosted and not self.draining and self.parking.park(session):
                log.info("session %s: %d positions parked for a resume", session.sid, session.valid)
        if self.on_session_end is not None:
            self.on_session_end(reason)
        session.closing = True
        if session.downstream is not None and not session.downstream.done():
            task = asyncio.get_running_loop().create_task(self._finish_downstream(session))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self._release_channel(session)
        if session.failure is None and reason == "upstream went away":
            error = self._error(grpc.StatusCode.CANCELLED, "upstream ended the session without closing it")
            session.results.put_nowait(convert.failed_result(session.sid, error))
        session.results.put_nowait(None)
        log.info(
            "session %s %s: %d steps, %d positions, %.1f s, %d/%d active",
            session.sid,
            reason,
            session.steps,
            session.tokens,
            time.monotonic() - session.opened_at,
            len(self.sessions),
            self.admission.free_sessions + len(self.sessions),
        )

    def _log_open(self, session: NodeSession) -> None:
        spec = session.spec
        log.info(
            "session %s opened: layers [%d, %d), max_length %d, KV %.2f MB, %d hops after this, wire %s, %d/%d active",
            spec.session_id,
            spec.start,
            spec.end,
            spec.max_length,
            session.cache.nbytes / 1e6,
            len(spec.downstream),
            spec.wire_codec,
            len(self.sessions),
            self.config.max_sessions,
        )

    # --- Results --------------------------------------------------------------------

    async def Results(
        self,
        request: swarm_pb2.ResultsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> None:
        session = self.sessions.get(request.session_id)
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no open session {request.session_id[:128]!r} on this node")
            return
        if not _same_secret(session.spec.capability, request.capability):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "Results needs the session's capability (Opened.capability)")
            return
        if not session.model.is_tail:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "results come from the tail of the route")
            return
        if session.subscribed:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"session {session.sid!r} already has a results stream")
            return
        session.subscribed = True
        while True:
            item = await session.results.get()
            if item is None:
                return
            if not item.HasField("error"):
                session.pending_bytes -= item.ByteSize()
                session.results_taken.set()
            await context.write(item)

    # --- layers ---------------------------------------------------------------------

    def view(self, start: int, end: int) -> ModelSlice:
        """The hosted layers [start, end) as a slice sharing the hosted weights."""
        if (start, end) == (self.model.start, self.model.end):
            return self.model
        view = self._views.get((start, end))
        if view is None:
            view = self._views[(start, end)] = reslice.view(self.model, start, end)
        return view

    async def reload(self, start: int, end: int) -> None:
        """Host layers [start, end) from now on, without a restart.

        Layers kept from the current range are not read again; only the missing ones
        are. Sessions whose layers are all kept go on untouched (they hold views made
        of the very same blocks); sessions on dropped layers end with FAILED_PRECONDITION
        so their clients fail over. New sessions see the new range at once.
        """
        old = self.model
        if (start, end) == (old.start, old.end):
            return
        t0 = time.monotonic()
        new = await asyncio.to_thread(
            reslice.extend, old, self.config.model, start, end, dtype=old.dtype, device=old.device,
            weights=self.config.weight_format, kernel_dtype=self.config.torch_kernel_dtype,
        )
        kept_views = {k: v for k, v in self._views.items() if start <= k[0] and k[1] <= end}
        if start <= old.start and old.end <= end:
            kept_views[(old.start, old.end)] = old  # its blocks are the new slice's blocks
        self.model, self._views = new, kept_views
        self.scheduler.model = new
        self.config = replace(self.config, start=start, end=end)
        self.admission.budget_bytes = self._kv_budget(new)
        dropped = 0
        for session in list(self.sessions.values()):
            if not (start <= session.spec.start and session.spec.end <= end):
                dropped += 1
                session.fail(
                    self._error(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"this node was reassigned to layers [{start}, {end}); "
                        f"the session's layers [{session.spec.start}, {session.spec.end}) are no longer here",
                    )
                )
        log.info(
            "now hosting layers [%d, %d) (was [%d, %d)), reloaded in %.2f s; %d session(s) kept, %d ended",
            start, end, old.start, old.end, time.monotonic() - t0, len(self.sessions) - dropped, dropped,
        )

    # --- housekeeping ---------------------------------------------------------------

    def expire_idle(self) -> None:
        """Fail every session that has been idle longer than the idle timeout."""
        now = time.monotonic()
        self.parking.expire(now)
        self._channels.prune()
        for session in list(self.sessions.values()):
            # A session that never got a step has a shorter leash: opening is cheap for a
            # caller and holds the node's KV room until then.
            limit = self.config.idle_timeout
            if session.last_step_id == 0:
                limit = min(limit, self.config.open_idle_timeout)
            if not session.busy and now - session.last_active > limit:
                session.fail(self._error(grpc.StatusCode.DEADLINE_EXCEEDED, f"idle for more than {limit:g} s"))

    async def wait_steps_done(self, timeout: float) -> bool:
        """Wait until no step is computing or being sent on (a drain); False on timeout."""
        try:
            await asyncio.wait_for(self._no_steps.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def fail_all(self, code: grpc.StatusCode, message: str) -> None:
        for session in list(self.sessions.values()):
            session.fail(self._error(code, message))

    async def wait_background(self, timeout: float) -> None:
        """Wait for successors to finish the sessions this node ended (bounded)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

    async def close_channels(self) -> None:
        await self._channels.close()

    def _error(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        at: wire.Hop | None = None,
        step_id: int = 0,
        retry_after_s: float = 0.0,
    ) -> swarm_pb2.Error:
        address, node_id = (at.address, at.node_id) if at is not None else (self.address, self.config.node_id)
        return convert.error_to_proto(
            code, message, address=address, node_id=node_id, step_id=step_id, retry_after_s=retry_after_s
        )

    def _rpc_error(self, exc: grpc.aio.AioRpcError, hop: wire.Hop) -> swarm_pb2.Error:
        return self._error(exc.code(), f"successor {hop.address}: {exc.details()}", at=hop)


def _same_secret(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()
