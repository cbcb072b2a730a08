"""Continuous batching: the waiting steps of all sessions share one forward pass.

Sessions submit ``Job``s (one chunk of one sequence each) from the event loop; a
single worker thread runs the model, so the loop stays free to move bytes while the
matrices multiply. Whenever the worker is free it takes every waiting job it can --
at most one per session (a session's next chunk needs the cache its previous chunk
writes) and at most ``max_batch_tokens`` positions -- packs them along the token axis
and runs them as one forward. At the tail it also samples, batched, in the same
thread. A job with drafts (speculative decoding) is sampled at each of its last
``draft + 1`` positions, in the same batched call; the session decides what to accept.

If a merged forward raises, its jobs are retried one by one so that only the job at
fault fails (a failed forward leaves the caches' lengths untouched, so a retry is
safe).

Sessions decoding together send their next steps in a burst (the previous node or
the client writes them one after another). A worker that starts on the first step
of a burst makes the rest wait a whole forward, and the sessions drift apart into
small batches. So before a forward, while fewer sessions wait than were active in
the last second, the worker waits for the next arrival -- at most ``linger`` seconds
and 5% of a recent forward per gap, 25% of a forward in all. A lone session never
waits.

A lone session's decode step runs on the event loop itself: with nothing to batch
it with, the two thread hand-offs (to the worker and back) would only add latency,
about 0.3 ms per step on a small machine. Prefill chunks and batches still go to
the worker, and so does `call` (a KV pool growing); the two never overlap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from swarm_node.engine.kv_cache import KVCache
from swarm_node.engine.model import ModelSlice, SeqChunk
from swarm_node.engine.sampler import BatchSample, sample
from swarm_node.verify import Lie, commit_tensors
from swarm_proto.wire import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SampleRequest:
    """Sample the token for ``position`` from the last logits of a chunk; with ``draft``
    > 0 also the tokens for the ``draft`` positions before it (each from the logits of
    the position before it, with the history up to there)."""

    params: SamplingParams
    position: int
    history: Sequence[int]  # the tokens before `position`, prompt included
    top_logprobs: int = 0
    draft: int = 0


class Sampled(NamedTuple):
    """One sampled position of a job: token, its logprob, top alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Job:
    cache: KVCache
    start_pos: int
    x: torch.Tensor  # [T] int64 token ids at the head, [T, C] hidden states elsewhere
    sample: SampleRequest | None = None  # tail only
    return_logits: bool = False  # tail only: logits of every position of the chunk
    future: asyncio.Future[JobOutput] | None = None
    # The slice to run (a session on part of the hosted layers, or on the slice it
    # opened on before a reload); None: the scheduler's model. Only jobs of the same
    # slice share a forward.
    model: ModelSlice | None = None
    draft: int = 0  # drafted tokens among the positions (speculative decoding; the tail samples them via `sample`)
    # Tail only (a verifier's recomputation): also sample after every position, one
    # request per position of the chunk.
    sample_all: Sequence[SampleRequest] = ()
    given: Sequence[int] = ()  # with sample_all: the token that follows each position (-1: unknown)

    @property
    def length(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class JobOutput:
    hidden: torch.Tensor | None = None  # [T, C] on the CPU, non-tail slices
    logits: torch.Tensor | None = None  # [T, V] float32 on the CPU, when asked
    token: int | None = None
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()
    # A job with drafts: the samples at its last draft + 1 positions, in order (`token`
    # is the first of them).
    samples: tuple[Sampled, ...] = ()
    # The commitment of this chunk's output: row-major [T, k] indices and values
    # (swarm_node.verify.commit_rows); empty when commitments are off.
    commit: tuple[list[int], list[float]] = ([], [])
    sampled: tuple[int, ...] = ()  # sample_all: the token after each position
    sampled_logprobs: tuple[float, ...] = ()  # ... its raw log-probability
    given_logprobs: tuple[float, ...] = ()  # ... and that of Job.given's token (NaN where unknown)


@dataclass
class BatchStats:
    steps: int = 0
    tokens: int = 0
    batches: int = 0
    batched_steps: int = 0
    max_batch: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches

    def record(self, jobs: Sequence[Job]) -> None:
        n = len(jobs)
        self.steps += n
        self.tokens += sum(j.length for j in jobs)
        self.batches += 1
        self.batched_steps += n
        self.max_batch = max(self.max_batch, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1


class Scheduler:
    """Merges submitted jobs into forward passes of ``model`` on one worker thread."""

    def __init__(
        self, model: ModelSlice, *, max_batch_tokens: int = 2048, linger: float = 0.002, commit_k: int = 8
    ) -> None:
        self.model = model
        self.commit_k = commit_k  # entries per position in each step's commitment; 0 = none
        self.lie = Lie.from_env()  # test-only fault injection (swarm_node.verify)
        self.max_batch_tokens = max_batch_tokens
        self.linger = linger
        self._recent: dict[int, float] = {}  # id(cache) -> when it last submitted
        self._forward_s = 0.0  # moving average of a forward's duration
        self.stats = BatchStats()
        self._queue: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-forward")
        self._calls = 0  # `call`s queued or running on the worker
        self._task: asyncio.Task[None] | None = None
        # Metrics hooks (swarm_node.metrics): each forward pass, each finished step.
        self.on_batch: Callable[[Sequence[Job], float], None] | None = None
        self.on_step: Callable[[Job, float], None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        assert self._task is None, "scheduler already started"
        self._task = asyncio.get_running_loop().create_task(self._run(), name="swarm-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for job in self._queue:
            if job.future is not None and not job.future.done():
                job.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the forward thread, between two forward passes."""
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._calls -= 1

    async def submit(self, job: Job) -> JobOutput:
        """Queue ``job`` and wait for its output. Cancelling the wait drops the job."""
        assert self._task is not None, "scheduler not started"
        job.future = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        self._recent[id(job.cache)] = time.monotonic()
        self._queue.append(job)
        self._wake.set()
        out = await job.future
        if self.on_step is not None:
            self.on_step(job, time.perf_counter() - t0)
        return out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await self._gather()
            batch = self._take()
            if not batch:
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                if self._lone_decode(batch):
                    outputs = self._forward_safely(batch)
                else:
                    outputs = await loop.run_in_executor(self._executor, self._forward_safely, batch)
            except asyncio.CancelledError:
                for job in batch:
                    if job.future is not None and not job.future.done():
                        job.future.cancel()
                raise
            elapsed = time.perf_counter() - t0
            self._forward_s = elapsed if not self._forward_s else 0.8 * self._forward_s + 0.2 * elapsed
            for job, out in zip(batch, outputs):
                assert job.future is not None
                if job.future.done():  # the session went away meanwhile
                    continue
                if isinstance(out, BaseException):
                    job.future.set_exception(out)
                else:
                    job.future.set_result(out)
            if self.on_batch is not None:
                self.on_batch(batch, time.perf_counter() - t0)
            log.debug(
                "forward: %d steps, %d positions, %.1f ms",
                len(batch),
                sum(j.length for j in batch),
                (time.perf_counter() - t0) * 1e3,
            )

    async def _gather(self) -> None:
        """Let the rest of a burst of steps arrive before a forward (see the module doc)."""
        gap = min(self.linger, 0.05 * self._forward_s)
        if gap < 1e-4 or not self._queue:
            return
        now = time.monotonic()
        self._recent = {k: t for k, t in self._recent.items() if now - t < 1.0}
        deadline = now + 0.25 * self._forward_s
        try:
            while len({id(j.cache) for j in self._queue}) < len(self._recent):
                left = min(gap, deadline - time.monotonic())
                if left <= 0:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    return
        finally:
            self._wake.set()  # _run takes the batch next

    def _lone_decode(self, batch: list[Job]) -> bool:
        """One decode step of the only session active in the last second, nothing else
        waiting or running on the worker (see the module doc)."""
        if len(batch) != 1 or batch[0].length != 1 or self._queue or self._calls:
            return False
        if len(self._recent) > 1:
            now = time.monotonic()
            self._recent = {k: t for k, t in self._recent.items() if now - t < 1.0}
        return len(self._recent) <= 1

    def _take(self) -> list[Job]:
        """Pop the jobs for the next forward: FIFO, one per cache, within the token budget."""
        batch: list[Job] = []
        caches: set[int] = set()
        tokens = 0
        kept: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if job.future is None or job.future.done():  # cancelled while waiting
                continue
            fits = not batch or tokens + job.length <= self.max_batch_tokens
            same_slice = not batch or (job.model or self.model) is (batch[0].model or self.model)
            if id(job.cache) in caches or not fits or not same_slice:
                kept.append(job)
                continue
            batch.append(job)
            caches.add(id(job.cache))
            tokens += job.length
        self._queue = kept
        return batch

    # --- worker thread --------------------------------------------------------------

    def _forward_safely(self, batch: list[Job]) -> list[JobOutput | BaseException]:
        try:
            outputs: list[JobOutput | BaseException] = list(self._forward(batch))
            self.stats.record(batch)
            return outputs
        except Exception as exc:  # noqa: BLE001 - isolate the faulty job below
            if len(batch) == 1:
                log.warning("forward failed: %s", exc)
                return [exc]
            log.warning("merged forward of %d steps failed (%s); retrying one by one", len(batch), exc)
            return [self._forward_safely([job])[0] for job in batch]

    def _forward(self, batch: list[Job]) -> list[JobOutput]:
        model = batch[0].model or self.model
        device = model.device
        seqs = [SeqChunk(j.cache, j.start_pos, j.length) for j in batch]
        x = torch.cat([j.x for j in batch])  # [T] or [T, C]
        x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
        all_logits = any(j.return_logits or j.sample_all or (j.sample is not None and j.sample.draft > 0) for j in batch)
        h, out = model.run(x, seqs, all_logits=all_logits)
        lengths = [j.length for j in batch]
        if self.lie is not None:
            h = torch.cat([self.lie.perturb(r, j.start_pos) for r, j in zip(h.split(lengths), batch)])
        if out is None:
            # One trip to the host for the hidden states and the commitments together.
            if self.commit_k:
                idx, values = commit_tensors(h, self.commit_k)  # [T, k] each
                hidden, idx, values = to_host(h, idx, values)
                commits = _split_commits(idx, values, lengths)
            else:
                (hidden,) = to_host(h)
                commits = [([], [])] * len(batch)
            return [JobOutput(hidden=r, commit=c) for r, c in zip(hidden.split(lengths), commits)]
        # out: [T, V] with all_logits, else [N, V] (each chunk's last position)
        if all_logits:
            per_job = list(out.split([j.length for j in batch]))
        else:
            per_job = [out[i : i + 1] for i in range(len(batch))]
        # The commitments come to the host with the sampled tokens, in one trip.
        extra = commit_tensors(h, self.commit_k) if self.commit_k else ()
        samples, extra = self._sample(batch, per_job, extra)
        commits = _split_commits(*extra, lengths) if self.commit_k else [([], [])] * len(batch)
        outputs = []
        for i, job in enumerate(batch):
            picked = samples.get(i, ())
            first = picked[0] if picked else Sampled(-1, 0.0)
            logits = per_job[i].to("cpu") if job.return_logits else None
            token = first.token if picked else None
            if self.lie is not None and token is not None and job.sample is not None and not job.sample.draft:
                token = self.lie.token(token, job.sample.position, per_job[i].shape[-1])
            sampled: tuple[int, ...] = ()
            sampled_lp: tuple[float, ...] = ()
            given_lp: tuple[float, ...] = ()
            if job.sample_all:
                every = list(job.sample_all)
                drawn = sample(per_job[i], [r.params for r in every], [r.position for r in every], [r.history for r in every])
                sampled = tuple(int(t) for t in drawn.tokens)
                lp = torch.log_softmax(per_job[i].float(), dim=-1)  # [T, V]
                rows_t = torch.arange(lp.shape[0])
                sampled_lp = tuple(lp[rows_t, drawn.tokens.to(torch.int64)].tolist())
                given = torch.tensor([max(g, 0) for g in job.given], dtype=torch.int64)
                given_lp = tuple(v if g >= 0 else float("nan") for v, g in zip(lp[rows_t, given].tolist(), job.given))
            outputs.append(
                JobOutput(
                    logits=logits,
                    token=token,
                    logprob=first.logprob,
                    top=first.top,
                    samples=picked if len(picked) > 1 else (),
                    commit=commits[i],
                    sampled=sampled,
                    sampled_logprobs=sampled_lp,
                    given_logprobs=given_lp,
                )
            )
        return outputs

    @staticmethod
    def _sample(
        batch: list[Job], per_job: list[torch.Tensor], extra: tuple[torch.Tensor, ...] = ()
    ) -> tuple[dict[int, tuple[Sampled, ...]], tuple[torch.Tensor, ...]]:
        """Every sampling row of the batch in one call: each sampling job's last position,
        and for a job with drafts the positions before it too. ``extra`` tensors come
        back on the host, fetched together with the samples."""
        logits: list[torch.Tensor] = []
        params: list[SamplingParams] = []
        positions: list[int] = []
        histories: list[Sequence[int]] = []
        owners: list[tuple[int, int]] = []  # (job index, its top_logprobs) per row
        for i, job in enumerate(batch):
            req = job.sample
            if req is None:
                continue
            rows = req.draft + 1
            logits.append(per_job[i][-rows:])  # [rows, V]
            penalised = req.params.repetition_penalty != 1.0
            for r in range(rows):
                pos = req.position - req.draft + r
                params.append(req.params)
                positions.append(pos)
                histories.append(req.history[:pos] if penalised and r < req.draft else req.history)
                owners.append((i, req.top_logprobs))
        if not owners:
            return {}, to_host(*extra)
        stacked = torch.cat(logits)  # [R, V]
        drawn = sample(stacked, params, positions, histories)
        tokens, logprobs, *rest = to_host(drawn.tokens, drawn.logprobs, *extra)  # one trip to the host
        picked = BatchSample(tokens, logprobs)
        want = max(n for _, n in owners)
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(owners)
        if want:
            values, ids = torch.log_softmax(stacked.float(), dim=-1).topk(want, dim=-1)  # [R, want]
            tops = [tuple(zip(ids[r, :n].tolist(), values[r, :n].tolist())) for r, (_, n) in enumerate(owners)]
        out: dict[int, list[Sampled]] = {}
        for r, (i, _) in enumerate(owners):
            out.setdefault(i, []).append(Sampled(int(picked.tokens[r]), float(picked.logprobs[r]), tops[r]))
        return {i: tuple(rows) for i, rows in out.items()}, tuple(rest)


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on the CPU. From CUDA: queued copies into pinned memory and one wait
    for all of them, instead of one synchronizing copy each."""
    if not tensors or all(not t.is_cuda for t in tensors):
        return tuple(t.to("cpu") for t in tensors)
    out = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return out


def _split_commits(idx: torch.Tensor, values: torch.Tensor, lengths: Sequence[int]) -> list[tuple[list[int], list[float]]]:
    """Per job, the row-major lists of its rows of the [T, k] commitment tensors."""
    out = []
    for i, v in zip(idx.split(list(lengths)), values.split(list(lengths))):
        out.append((i.reshape(-1).tolist(), v.reshape(-1).tolist()))
    return out
