"""A session's key/value cache for the layers of one slice."""

from __future__ import annotations

import torch

from swarm_node.errors import CacheOverflowError, PositionError


class KVCache:
    """Keys and values of one sequence for `num_layers` consecutive layers.

    `length` counts the positions written so far. A step may start at or before
    `length` (rewriting positions, as a replay does) but never after it.
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

    @property
    def nbytes(self) -> int:
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
