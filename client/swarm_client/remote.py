"""Drive one session along a route of swarm nodes (the client side of swarm.proto).

``RouteSession`` holds the two streams a client needs: the Session stream to the
head (where it sends token ids) and the Results stream from the tail (where sampled
tokens come back), so each token costs K + 1 network traversals for K nodes::

    async with RouteSession(hops, max_length=64, sampling=params) as s:
        out = await s.prefill(prompt_ids)          # chunked and pipelined
        while not out.finished:
            out = await s.decode(out.token)

Speculative decoding sends a token and drafted ones after it in one step
(:meth:`RouteSession.verify`); the tail returns the drafts it accepted and its next
token, and the session goes on right after them.

Failures raise ``RouteError`` with the gRPC status and the address of the node where
the failure happened, which is what failover needs: report that node, get a new
route, open the session again and replay the history -- under a new session id
(:meth:`RouteSession.prefill`, every node recomputes it), or under the same id with
``resume=True`` (:meth:`RouteSession.replay`, only nodes without the session's cache
recompute it; see docs/failover.md). A node that refuses for capacity answers
RESOURCE_EXHAUSTED with a retry hint (``Error.retry_after_ms``): ``RouteError.busy``,
which is not a failure of that node.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from swarm_client.errors import GenerationError
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.commit import Commit, from_proto
from swarm_proto.daemon import Service
from swarm_proto.transport import DEFAULT_MAX_RECEIVE, ChannelPool, call_metadata
from swarm_proto.wire import Generation, Hop, OpenSpec, SamplingParams, open_to_proto, status_code

if TYPE_CHECKING:
    import torch

__all__ = ["Hop", "RouteError", "RouteSession", "StepOutput"]



class RouteError(GenerationError):
    """A hop of the route failed: ``code`` is the gRPC status, ``address`` the node."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        address: str = "",
        node_id: str = "",
        step_id: int = 0,
        retry_after: float = 0.0,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" (at {address})" if address else ""))
        self.code = code
        self.message = message
        self.address = address
        self.node_id = node_id
        self.step_id = step_id
        self.retry_after = retry_after  # seconds; > 0 only for a busy refusal

    @property
    def busy(self) -> bool:
        """A refusal for capacity (the node is healthy and full), not a failure."""
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_after > 0

    @classmethod
    def from_proto(cls, error: swarm_pb2.Error) -> RouteError:
        return cls(
            status_code(error),
            error.message,
            address=error.node_address,
            node_id=error.node_id,
            step_id=error.step_id,
            retry_after=error.retry_after_ms / 1000.0,
        )

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError, address: str) -> RouteError:
        return cls(exc.code(), exc.details() or "", address=address)


@dataclass(frozen=True)
class StepOutput:
    """What the tail returned for one step."""

    step_id: int
    position: int  # where `token` goes in the sequence
    token: int | None
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()
    finished: bool = False
    logits: torch.Tensor | None = None  # [T, V] when asked for
    # A step with drafts (`verify`): the drafts the tail accepted, with their logprobs, at
    # the positions before `position`; the run the step produced is these + `token`.
    accepted: tuple[tuple[int, float], ...] = ()
    commits: tuple[Commit, ...] = ()  # every hop's commitment for the step's positions, head first
    sampled: tuple[int, ...] = ()  # recompute(): the token after each position of the chunk
    sampled_logprobs: tuple[float, ...] = ()  # ... its raw log-probability
    given_logprobs: tuple[float, ...] = ()  # ... and that of the token that actually follows (NaN: unknown)


class RouteSession(Service):
    """One session over ``hops`` (head first); use as an async context manager."""

    def __init__(
        self,
        hops: Sequence[Hop],
        *,
        max_length: int,
        sampling: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        max_new_tokens: int = 0,
        top_logprobs: int = 0,
        prompt_length: int = 0,
        wire_dtype: str = "",
        session_id: str | None = None,
        prefill_chunk: int = 128,
        timeout: float = 60.0,
        token: str = "",
        resumable: bool = False,
        resume: bool = False,
        capability: str = "",
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE,
    ) -> None:
        if not hops:
            raise ValueError("a route needs at least one hop")
        self.hops = tuple(hops)
        self.max_length = max_length
        self.generation = Generation(
            sampling or SamplingParams(), tuple(stop_token_ids), max_new_tokens, top_logprobs, prompt_length
        )
        self.wire_dtype = wire_dtype
        self._metadata = call_metadata(token)
        self.session_id = session_id or uuid.uuid4().hex
        self.prefill_chunk = prefill_chunk
        self.timeout = timeout
        self.grace = min(timeout, 5.0)
        self.resumable = resumable or resume
        self.resume = resume
        self.kept: tuple[int, ...] = ()  # per hop: positions adopted from a held cache (Opened.kept)
        # The session's secret: its Results stream and a resume need it, so only this
        # client can read or take over the session (the id alone is not enough).
        self.capability = capability or secrets.token_urlsafe(24)
        self.position = 0  # positions sent so far
        self._step_id = 0
        # A tail sends results (and logits only when asked): a reply bigger than this is
        # refused by gRPC instead of being buffered (a hostile tail could send 1 GiB).
        self._channels = ChannelPool(max_receive_bytes=max_receive_bytes)
        self._head: grpc.aio.StreamStreamCall | None = None  # type: ignore[type-arg]
        self._results: grpc.aio.UnaryStreamCall | None = None  # type: ignore[type-arg]
        self._pending: dict[int, asyncio.Future[StepOutput]] = {}
        self._failure: RouteError | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._head_done = asyncio.Event()
        self._results_done = asyncio.Event()

    async def open(self) -> None:
        head, tail = self.hops[0], self.hops[-1]
        spec = OpenSpec(
            self.session_id, self.max_length, head.start, head.end, tuple(self.hops[1:]),
            self.generation, self.wire_dtype, self.resumable, self.resume, capability=self.capability,
        )
        open_msg = open_to_proto(spec, self.hops)
        try:
            self._head = swarm_pb2_grpc.NodeStub(self._channels.get(head.address)).Session(metadata=self._metadata)
            await self._head.write(swarm_pb2.SessionRequest(open=open_msg))
            reply = await asyncio.wait_for(self._head.read(), self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise RouteError.from_rpc(exc, head.address) from exc
        except asyncio.TimeoutError:
            raise RouteError(grpc.StatusCode.DEADLINE_EXCEEDED, "timed out opening the session", address=head.address) from None
        if reply is grpc.aio.EOF:
            raise RouteError(grpc.StatusCode.UNAVAILABLE, "head ended the stream while opening", address=head.address)
        if reply.WhichOneof("kind") == "error":
            raise RouteError.from_proto(reply.error)
        self.kept = tuple(reply.opened.kept)
        request = swarm_pb2.ResultsRequest(session_id=self.session_id, capability=self.capability)
        self._results = swarm_pb2_grpc.NodeStub(self._channels.get(tail.address)).Results(request, metadata=self._metadata)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_head()), loop.create_task(self._read_results())]

    async def prefill(
        self, tokens: Sequence[int], *, return_logits: bool = False, timeout: float | None = None
    ) -> StepOutput:
        """Send ``tokens`` from the current position in chunks (without waiting between
        them, so nodes work on consecutive chunks at once); sample after the last."""
        if not tokens:
            raise ValueError("nothing to prefill")
        chunks = [tokens[i : i + self.prefill_chunk] for i in range(0, len(tokens), self.prefill_chunk)]
        futures = []
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            futures.append(await self._send(chunk, sample=last, return_logits=return_logits))
        outs = [await self._wait(f, timeout) for f in futures if f is not None]
        final = outs[-1]
        if return_logits:
            import torch  # logits are tensors: only a caller asking for them needs torch

            logits = torch.cat([o.logits for o in outs if o.logits is not None])
            final = StepOutput(final.step_id, final.position, final.token, final.logprob, final.top, final.finished, logits)
        return final

    async def replay(self, history: Sequence[int], *, timeout: float | None = None) -> StepOutput:
        """After a resume: send ``history`` again from position 0 and sample after it.

        All but the last position go as ``replay`` steps, which the nodes that kept the
        session's cache skip (sending on the activations they kept); the last position
        is an ordinary step that every node computes (a rewind where it was cached), so
        the tail samples from fresh logits."""
        if not history:
            raise ValueError("nothing to replay")
        if self.position != 0:
            raise ValueError("replay starts a session")
        body = history[:-1]
        for i in range(0, len(body), self.prefill_chunk):
            await self._send(body[i : i + self.prefill_chunk], sample=False, return_logits=False, replay=True)
        future = await self._send(history[-1:], sample=True, return_logits=False)
        assert future is not None
        return await self._wait(future, timeout)

    async def recompute(
        self, tokens: Sequence[int], *, next_token: int | None = None, timeout: float | None = None
    ) -> list[StepOutput]:
        """A verifier's pass: send ``tokens`` from the current position (chunked) and
        have the tail sample after every position and score the token that follows it
        (``next_token`` after the last); one output per chunk, each with the hops'
        commitments, ``sampled`` and the log-probabilities."""
        futures = []
        n = self.prefill_chunk
        for i in range(0, len(tokens), n):
            after = tokens[i + n] if i + n < len(tokens) else next_token
            futures.append(await self._send(tokens[i : i + n], sample=True, return_logits=False, sample_all=True, next_token=after))
        return [await self._wait(f, timeout) for f in futures if f is not None]

    def rewind(self, position: int) -> None:
        """Send the next step from ``position`` (at most the current one): the nodes
        replace what they hold from there on."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position} from {self.position}")
        self.position = position

    async def decode(self, token: int, *, return_logits: bool = False, timeout: float | None = None) -> StepOutput:
        """Feed one token at the next position and return the token sampled after it."""
        future = await self._send([token], sample=True, return_logits=return_logits)
        assert future is not None
        return await self._wait(future, timeout)

    async def verify(
        self, token: int, drafts: Sequence[int], *, timeout: float | None = None
    ) -> StepOutput:
        """Speculative decoding: feed ``token`` and the drafted tokens after it in one step;
        the tail accepts the drafts that equal its own samples and returns them (``accepted``)
        with its next sample (``token``). The positions of rejected drafts are given back:
        the next step starts right after the accepted run (a rewind on every node)."""
        if not drafts:
            return await self.decode(token, timeout=timeout)
        start = self.position
        future = await self._send([token, *drafts], sample=True, return_logits=False, draft=len(drafts))
        assert future is not None
        out = await self._wait(future, timeout)
        if out.position != start + 1 + len(out.accepted) or len(out.accepted) > len(drafts):
            # An older tail (or a node dropping `draft` on the way) sampled only after the
            # drafts, as if all were right: its token cannot be trusted.
            raise GenerationError(
                f"a node on the route to {self.hops[-1].address} does not verify drafts (speculative decoding): "
                "upgrade it, or generate without speculation"
            )
        self.position = start + 1 + len(out.accepted)
        return out

    async def close(self) -> None:
        """End the session along the route (frees every node's KV cache)."""
        if self._head is not None:
            try:
                if self._failure is None:
                    await self._head.write(swarm_pb2.SessionRequest(close=swarm_pb2.Close()))
                    await self._head.done_writing()
                    if self._tasks:
                        await asyncio.wait_for(asyncio.shield(self._tasks[0]), 5.0)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, asyncio.InvalidStateError):
                pass
            self._head.cancel()
        for task in self._tasks:
            task.cancel()
        if self._results is not None:
            self._results.cancel()
        await self._channels.close()
        self._fail_pending(RouteError(grpc.StatusCode.CANCELLED, "session closed"))

    start, stop = open, close  # a Service: `async with` opens it and closes it

    # --- internals ------------------------------------------------------------------

    async def _send(
        self,
        tokens: Sequence[int],
        *,
        sample: bool,
        return_logits: bool,
        replay: bool = False,
        sample_all: bool = False,
        next_token: int | None = None,
        draft: int = 0,
    ) -> asyncio.Future[StepOutput] | None:
        if self._failure is not None:
            raise self._failure
        assert self._head is not None, "open the session first"
        self._step_id += 1
        future: asyncio.Future[StepOutput] | None = None
        if sample or return_logits:
            future = asyncio.get_running_loop().create_future()
            # A failure fails every pending step, also those nobody will await any more.
            future.add_done_callback(_retrieve)
            self._pending[self._step_id] = future
        step = swarm_pb2.Step(
            step_id=self._step_id,
            start_pos=self.position,
            tokens=list(tokens),
            sample=sample,
            return_logits=return_logits,
            replay=replay,
            draft=draft,
            sample_all=sample_all,
            next_token=next_token,
        )
        try:
            await self._head.write(swarm_pb2.SessionRequest(step=step))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            if future is not None:
                self._pending.pop(self._step_id, None)
            raise self._failure or RouteError(grpc.StatusCode.UNAVAILABLE, f"head stream broke: {exc}", address=self.hops[0].address) from exc
        self.position += len(tokens)
        return future

    async def _wait(self, future: asyncio.Future[StepOutput], timeout: float | None = None) -> StepOutput:
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            # The route is silent (a node frozen or too slow): the session is over, and
            # close() must not wait for a Close to travel through the silent hop.
            error = RouteError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within {timeout:.3g} s")
            self._fail_pending(error)
            raise error from None

    async def _watch_head(self) -> None:
        """The head's stream is authoritative about failures: its Error names the hop
        where the route broke (relayed hop by hop)."""
        assert self._head is not None
        error: RouteError | None = None
        try:
            while True:
                reply = await self._head.read()
                if reply is grpc.aio.EOF:
                    break
                if reply.WhichOneof("kind") == "error":
                    error = RouteError.from_proto(reply.error)
                    break
        except grpc.aio.AioRpcError as exc:
            error = RouteError.from_rpc(exc, self.hops[0].address)
        if error is not None and self._failure is None:
            self._failure = error
        self._head_done.set()
        if error is not None:
            # Steps sent before the failure may still produce results (a draining
            # node finishes them): give the tail's stream a moment to deliver them.
            if self._pending:
                await _wait_event(self._results_done, self.grace)
            self._fail_pending(error)

    async def _read_results(self) -> None:
        assert self._results is not None
        address = self.hops[-1].address
        error: RouteError | None = None
        try:
            async for result in self._results:
                if result.HasField("error"):
                    error = RouteError.from_proto(result.error)
                    break
                future = self._pending.pop(result.step_id, None)
                if future is None or future.done():
                    continue
                logits = _decode_logits(result.logits) if result.HasField("logits") else None
                future.set_result(
                    StepOutput(
                        step_id=result.step_id,
                        position=result.position,
                        token=result.token if result.HasField("token") else None,
                        logprob=result.logprob,
                        top=tuple((t.token, t.logprob) for t in result.top),
                        finished=result.finished,
                        logits=logits,
                        accepted=tuple(zip(result.accepted, result.accepted_logprobs)),
                        commits=tuple(from_proto(c) for c in result.commits),
                        sampled=tuple(result.sampled),
                        sampled_logprobs=tuple(result.sampled_logprobs),
                        given_logprobs=tuple(result.given_logprobs),
                    )
                )
        except grpc.aio.AioRpcError as exc:
            error = RouteError.from_rpc(exc, address)
        self._results_done.set()
        if self._pending:
            # The tail only knows that its upstream went away; the head's verdict
            # names the hop that actually failed, so prefer it when it comes soon.
            await _wait_event(self._head_done, self.grace)
        self._fail_pending(
            self._failure or error or RouteError(grpc.StatusCode.UNAVAILABLE, "the tail ended the results stream", address=address)
        )

    def _fail_pending(self, error: RouteError) -> None:
        if self._failure is None:
            self._failure = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._failure)
        self._pending.clear()



async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass


def _retrieve(future: asyncio.Future[StepOutput]) -> None:
    if not future.cancelled():
        future.exception()


def _decode_logits(msg: swarm_pb2.Tensor) -> torch.Tensor:
    import torch  # logits are tensors: only a caller asking for them needs torch

    from swarm_proto import codec

    return codec.decode(msg, torch.float32)
