"""Key/value caches: one per sequence, each a slot of a pool shared by a slice.

A `KVPool` holds the keys and values of all the sequences of one model slice in
one pair of tensors [L, slots, S, Hkv, D]; each `KVCache` is a slot of it,
seen as [L, S, Hkv, D]. A batch of decode steps then writes its new keys with
one indexed store per layer and reads every sequence's keys back as one tensor
(`KVPool.gather`), instead of one copy per sequence and layer.

The pool grows by reallocation (doubling its slots, or lengthening them to the
longest requested) and re-points its live caches at the new tensors, so it must
not grow while a forward pass runs on another thread: the node allocates caches
on its forward thread (`Scheduler.call`). A cache's slot is freed when the cache
is garbage-collected; the pool lets go of its memory when no cache is left.
New memory is not zeroed until a slot is first handed out (then the whole slot
is: a batch reads other sequences' slots past their ends, masked, and garbage
there could be NaN, which a zero attention weight does not cancel), so on CPU
the slots a doubling adds cost no resident memory until they are used.
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch

from swarm_node.errors import CacheOverflowError, PositionError

_LENGTH_STEP = 64  # slot lengths are rounded up to a multiple of this


class KVCache:
    """Keys and values of one sequence for `num_layers` consecutive layers.

    `length` counts the positions written so far. A step may start at or before
    `length` (rewriting positions, as a replay does) but never after it.
    Standalone when built directly; `KVPool.allocate` builds pooled ones.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        # Sequence-major, so a layer's filled prefix [:end] is one contiguous block.
        shape = (num_layers, max_length, num_kv_heads, head_dim)  # [L, S, Hkv, D]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0
        self.pool: KVPool | None = None
        self.slot = -1

    @property
    def nbytes(self) -> int:
        """Bytes this sequence holds (its whole slot, in a pool)."""
        return self.k.nbytes + self.v.nbytes

    def check(self, start_pos: int, length: int) -> None:
        """Raise unless positions [start_pos, start_pos + length) can be written."""
        if start_pos < 0 or length <= 0:
            raise PositionError(f"bad step: start position {start_pos}, length {length}")
        if start_pos > self.length:
            raise PositionError(
                f"step starts at position {start_pos} but the cache holds only {self.length}"
            )
        if start_pos + length > self.max_length:
            raise CacheOverflowError(
                f"positions up to {start_pos + length} exceed the cache's max length {self.max_length}"
            )

    def write(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [n, Hkv, D] at start_pos; return the keys and values of [0, start_pos + n)."""
        end = start_pos + k.shape[0]
        self.k[layer, start_pos:end] = k
        self.v[layer, start_pos:end] = v
        return self.k[layer, :end], self.v[layer, :end]  # [P, Hkv, D]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


def _uninitialized(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class KVPool:
    """Slots of keys and values for the sequences of one slice, in one pair of tensors."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k = self.v = torch.empty(0)  # [L, slots, S, Hkv, D] once a cache exists
        self._caches: dict[int, weakref.ref[KVCache]] = {}  # slot -> its cache
        self._clean: set[int] = set()  # slots whose every position holds finite values
        # Slots are freed by the garbage collector, on any thread, or on this one in the
        # middle of `allocate`: hence a re-entrant lock, and no shrinking while allocating.
        self._lock = threading.RLock()
        self._allocating = False

    @property
    def slots(self) -> int:
        return self.k.shape[1] if self.k.dim() == 5 else 0

    @property
    def slot_length(self) -> int:
        return self.k.shape[2] if self.k.dim() == 5 else 0

    @property
    def live(self) -> int:
        return len(self._caches)

    def allocate(self, max_length: int) -> KVCache:
        """A cache for up to `max_length` positions in a free slot, growing the pool if needed."""
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        with self._lock:
            self._allocating = True
            try:
                if not self._caches and self.slots:
                    self._drop()  # nothing left to keep: start small again
                free = next((s for s in range(self.slots) if s not in self._caches), None)
                if free is None or max_length > self.slot_length:
                    self._grow(free is None, max(max_length, self.slot_length))
                    free = next(s for s in range(self.slots) if s not in self._caches)
                if free not in self._clean:
                    self.k[:, free].zero_()
                    self.v[:, free].zero_()
                    self._clean.add(free)
                cache = KVCache.__new__(KVCache)
                cache.max_length, cache.length, cache.pool, cache.slot = max_length, 0, self, free
                self._point(cache)
                self._caches[free] = weakref.ref(cache)
                weakref.finalize(cache, self._release, free)
            finally:
                self._allocating = False
        return cache

    def _release(self, slot: int) -> None:
        with self._lock:
            self._caches.pop(slot, None)
            if not self._caches and not self._allocating:  # let go of the memory once no sequence is left
                self._drop()

    def _drop(self) -> None:
        self.k = self.v = torch.empty(0)
        self._clean.clear()

    def _grow(self, more_slots: bool, length: int) -> None:
        """Reallocate with twice the slots if `more_slots`, each of at least `length`
        positions, keeping the contents and re-pointing the live caches."""
        slots = max(1, 2 * self.slots) if more_slots else self.slots
        length = -(-length // _LENGTH_STEP) * _LENGTH_STEP
        shape = (self.num_layers, slots, length, self.num_kv_heads, self.head_dim)
        k = _uninitialized(shape, self.dtype, self.device)
        v = _uninitialized(shape, self.dtype, self.device)
        if self.slots:
            n, s = self.slots, self.slot_length
            k[:, :n, :s] = self.k
            v[:, :n, :s] = self.v
            k[:, :n, s:] = 0  # the old slots' new positions: clean slots stay clean
            v[:, :n, s:] = 0
        self.k, self.v = k, v
        for ref in list(self._caches.values()):
            cache = ref()
            if cache is not None:
                self._point(cache)

    def _point(self, cache: KVCache) -> None:
        cache.k = self.k[:, cache.slot, : cache.max_length]  # [L, S, Hkv, D]
        cache.v = self.v[:, cache.slot, : cache.max_length]

    def write_decode(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store one new position per sequence: k, v [B, Hkv, D] at (slots[i], positions[i])."""
        self.k[layer].index_put_((slots, positions), k)
        self.v[layer].index_put_((slots, positions), v)

    def gather(self, layer: int, slots: Sequence[int], slot_index: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, length, Hkv, D] of the given slots: a view when the slots
        are consecutive and in order, else (or with ``slots`` empty: a captured graph's
        step, whose slots are known on the device only) one gathered copy."""
        first = slots[0] if slots else -1
        if slots and list(slots) == list(range(first, first + len(slots))):
            return self.k[layer, first : first + len(slots), :length], self.v[layer, first : first + len(slots), :length]
        return self.k[layer, slot_index, :length], self.v[layer, slot_index, :length]
