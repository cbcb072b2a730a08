"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, key-length bucket).

A GPU decode step of a 7B model is some 600 small kernels; launched one by one from
Python they take longer than the GPU needs to run them (docs/engine.md). Captured
once into a CUDA graph, a step is one launch. A graph fixes every shape and address,
so a step is padded to fixed sizes:

- rows: the batch is padded up to the next bucket of ``BATCH_BUCKETS`` (1, 2, 4, 8,
  12, 16, 24, 32, 48, 64); a padding row computes position 0 of a scratch slot of the
  KV pool that this runner holds, so it writes nowhere a sequence reads;
- keys: every row attends over the first ``length`` positions of its slot, the length
  rounded up to a power of two of at least 64 (at most the pool's slot length), the
  positions past its own masked out;
- addresses: the graphs read the slice's KV pool and rotary tables where they were at
  capture; when either is reallocated (a pool growing) every graph is dropped and
  recaptured on demand. The scratch slot is a live cache, so the pool keeps its memory
  (and the graphs stay valid) when the last session ends.

Only batches of decode steps (every chunk one position, every cache a slot of the
slice's pool) of at most the largest bucket replay a graph; prefill, drafted blocks
and larger batches run eagerly, the same code without the padding. The padded step
computes every real row as the eager batched step does (same operations, the same
masked attention when the rows' lengths differ), so greedy tokens agree with eager
ones; a product's rounding may depend on the number of rows on CUDA, as it does for
eager batches of different sizes.

``fake=True`` replays by calling the captured function again: the whole path
(buckets, padding, static buffers, invalidation) runs on a CPU, for tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from swarm_node.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from swarm_node.engine.model import ModelSlice, SeqChunk

log = logging.getLogger(__name__)

BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
MIN_LENGTH_BUCKET = 64


def batch_bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int | None:
    """The smallest bucket holding ``n`` rows, None past the largest."""
    return next((b for b in buckets if b >= n), None)


def length_bucket(end: int, slot_length: int) -> int:
    """Keys a step attends over for sequences ending at ``end``: a power of two of at
    least MIN_LENGTH_BUCKET, at most the pool's slot length (which holds ``end``)."""
    length = MIN_LENGTH_BUCKET
    while length < end:
        length *= 2
    return min(length, slot_length)


class FakeGraph:
    """A stand-in for torch.cuda.CUDAGraph that runs the captured function at each replay."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


@dataclass
class _Entry:
    graph: Any  # torch.cuda.CUDAGraph or FakeGraph
    x: torch.Tensor  # [B] ids or [B, C] hidden states
    index: torch.Tensor  # [2, B] int64: each row's slot, position
    out: list[torch.Tensor]  # [hidden [B, C], logits [B, V]] (logits at the tail only)


class DecodeGraphs:
    """Captured decode steps of one slice (see the module doc). Runs on the forward thread."""

    def __init__(self, model: ModelSlice, *, fake: bool = False, buckets: Sequence[int] = BATCH_BUCKETS) -> None:
        self.model = model
        self.fake = fake
        self.buckets = tuple(sorted(buckets))
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._where: tuple[int, int] | None = None  # addresses the graphs read: KV pool, rotary tables
        self._scratch: KVCache | None = None  # the padding rows' slot
        self._mempool: Any = None
        self.captures = 0  # graphs captured so far (for tests and logs)
        self.failed = False  # a capture failed: every step runs eagerly from then on
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def applies(self, seqs: Sequence[SeqChunk], all_logits: bool) -> bool:
        """True if this forward is a batch of decode steps a graph can run."""
        model = self.model
        pool = model._pool
        if self.failed or pool is None or not seqs or len(seqs) > self.max_batch or model.batch_invariant:
            return False
        return all(s.length == 1 and s.cache.pool is pool for s in seqs)

    def run(self, x: torch.Tensor, seqs: Sequence[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The decode steps of ``seqs`` (inputs ``x``, one row each): (hidden [N, C], logits [N, V] or None);
        None if the graph could not be captured (the caller runs the step eagerly)."""
        model = self.model
        pool = model._pool
        assert pool is not None
        if self._scratch is None or self._scratch.pool is not pool:
            self._scratch = pool.allocate(1)  # may grow the pool: before the addresses are read
        n = len(seqs)
        bucket = batch_bucket(n, self.buckets)
        assert bucket is not None
        end = max(s.start_pos + 1 for s in seqs)
        length = length_bucket(end, pool.slot_length)
        model.rotary.reserve(pool.slot_length)
        where = (pool.k.data_ptr(), model.rotary.address())
        if where != self._where:
            if self._entries:
                log.info("KV pool or rotary tables moved: dropping %d decode graphs", len(self._entries))
            self._entries.clear()
            self._mempool = None  # the old pool goes with its graphs
            self._where = where
        entry = self._entries.get((bucket, length))
        if entry is None:
            try:
                entry = self._capture(bucket, length, x)
            except RuntimeError:
                log.exception("capturing a decode graph failed: decode steps run eagerly from now on")
                self.failed = True
                self._entries.clear()
                return None
            self._entries[(bucket, length)] = entry

        pad = bucket - n
        index = torch.tensor(
            [[s.cache.slot for s in seqs] + [self._scratch.slot] * pad, [s.start_pos for s in seqs] + [0] * pad],
            dtype=torch.int64,
        )  # [2, bucket]: slots, positions
        if entry.x.is_cuda:
            index = index.pin_memory()
        entry.index.copy_(index, non_blocking=True)
        entry.x[:n].copy_(x, non_blocking=True)
        if n < bucket:
            entry.x[n:].zero_()
        entry.graph.replay()
        self.replays += 1
        for s in seqs:
            s.cache.length = s.start_pos + 1
        hidden = entry.out[0][:n].clone()
        logits = entry.out[1][:n].clone() if len(entry.out) > 1 else None
        return hidden, logits

    def _capture(self, bucket: int, length: int, like: torch.Tensor) -> _Entry:
        model = self.model
        device = model.device
        assert self._scratch is not None
        x = torch.zeros((bucket, *like.shape[1:]), dtype=like.dtype, device=device)
        # Warm-up and capture write position 0 of the scratch slot only.
        index = torch.zeros(2, bucket, dtype=torch.int64, device=device)
        index[0] = self._scratch.slot
        slots, positions = index[0], index[1]
        out: list[torch.Tensor] = []

        def step() -> None:
            h, logits = model.decode_step(x, slots, positions, length)
            out[:] = [h] if logits is None else [h, logits]

        t0 = time.perf_counter()
        if self.fake:
            graph: Any = FakeGraph(step)
            step()
        else:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations (cuBLAS handles, workspaces) before capture
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the event loop's thread may use CUDA (a copy) while this one captures.
            # The graphs share the first one's memory pool (they replay one at a time). Not
            # torch.cuda.graph_pool_handle(): torch 2.11 asserted on its first capture.
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                step()
            if self._mempool is None:
                self._mempool = graph.pool()
        self.captures += 1
        log.info("captured a decode graph: %d rows, %d keys (%.0f ms)", bucket, length, (time.perf_counter() - t0) * 1e3)
        return _Entry(graph, x, index, out)
