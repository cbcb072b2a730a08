"""Weight-only quantized linear layers on CUDA: grouped affine 4-bit run by PyTorch's tinygemm.

The form is `engine.quant`'s (``W = (q - 8) * s + z`` per row and group of 32 columns,
codes wider than 4 bits as two nibble halves side by side along K with the input
repeated), run by ``aten._weight_int4pack_mm`` (CUDA, sm80+), whose dequantization is
exactly that: ``bf16(q - 8) * scale + zero`` with ``scales_and_zeros`` [K'/32, N, 2].
Layouts, as PyTorch >= 2.5 defines them (aten/src/ATen/native/cuda/int4mm.cu):

- ``aten._convert_weight_to_int4pack(w, inner_k_tiles)`` takes uint8 [N, K'/2] whose
  byte j holds code 2j in its high nibble and code 2j + 1 in its low one, and returns
  int32 [N/8, K'/(16 inner_k_tiles), 32, inner_k_tiles/2] (8-row n-tiles: slicing the
  first dimension selects whole groups of 8 rows).
- ``aten._weight_int4pack_mm(x, packed, 32, scales_and_zeros)``: ``x`` bfloat16 [M, K']
  contiguous, output bfloat16 [M, N], float32 accumulation. bfloat16 only: a quantized
  matrix on CUDA always runs a bfloat16 kernel (``KERNEL_DTYPE``).

Why this kernel for int8 as well (docs/engine.md): ``aten._weight_int8pack_mm`` has a
CUDA kernel, but with one scale per output row (our int8 is per group of 32, like Q8_0)
and a plain dot-product loop; two nibble halves through tinygemm read the same bytes
(8 bits a weight) in a tensor-core kernel and keep the CPU path's exact form.

Invariants: the codes are converted on the GPU (``quant.quantize_groups`` runs there too for
``--quantize``); a module's buffers are all it holds (``quant.module_bytes``), the same
byte count as the CPU layout's at bfloat16 scales (``swarm_proto.weight_format``);
``rows(ids)`` dequantizes rows through the kernel itself, so it agrees with ``forward``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from swarm_node.engine import quant
from swarm_proto.weight_format import GROUP

log = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16  # the only activation dtype tinygemm takes
N_TILE = 8  # rows per n-tile of the packed layout
_ROWS_CHUNK = 1024  # identity rows per kernel call in `CudaQuantLinear.rows`

__all__ = ["KERNEL_DTYPE", "CudaQuantLinear", "inner_k_tiles", "linear_from_float", "linear_from_gguf", "on_cuda"]


def on_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def inner_k_tiles(kp: int) -> int:
    """The widest inner k-tiling (8, 4 or 2 tiles of 16) that divides K' (>= 32)."""
    for t in (8, 4, 2):
        if kp % (16 * t) == 0:
            return t
    raise ValueError(f"K' = {kp} is not a multiple of 32")


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K'] in 0..15 (on the GPU) -> tinygemm's int32 packed layout."""
    c = codes.to(torch.uint8)
    b = ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()  # high nibble: even column
    return torch.ops.aten._convert_weight_to_int4pack(b, inner_k_tiles(codes.shape[1]))


class CudaQuantLinear(nn.Module):
    """``F.linear`` of grouped affine 4-bit weights with PyTorch's CUDA int4 kernel.

    Inputs are cast to bfloat16 and outputs back to the input's dtype. Buffers:
    ``packed`` int32 (tinygemm layout, N*K'/2 bytes); ``scales_and_zeros`` bfloat16
    [K'/32, N, 2]; ``splits`` K-wide pieces side by side (input repeated)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, splits: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.splits = in_features, splits
        self.out_features = scales_and_zeros.shape[1]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.to(KERNEL_DTYPE), requires_grad=False)

    @staticmethod
    def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, splits: int,
                   bias: torch.Tensor | None = None) -> CudaQuantLinear:
        """Codes uint8 [N, K'] and float32 scale/zero [N, K'/32], all on one GPU."""
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)  # [G, N, 2]
        return CudaQuantLinear(pack(codes), sz, in_features, splits, None if bias is None else bias.to(codes.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        if self.splits > 1:
            x2 = x2.repeat(1, self.splits)  # [T, K'] = [x, x]
        y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.packed, GROUP, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Dequantized rows ``ids`` [R] -> bfloat16 [R, in_features], as the kernel sees
        them: the rows' 8-row tiles form a smaller packed matrix, multiplied by identity
        rows (each output is one weight: exact in the float32 accumulator). ``exact`` is
        accepted for `quant.QuantEmbedding`; the scales here are bfloat16 either way."""
        ids = ids.to(self.packed.device)
        tiles = ids // N_TILE
        kp = self.in_features * self.splits
        packed = self.packed[tiles].contiguous()  # [R, ...]: R tiles, 8R rows
        groups = self.scales_and_zeros.shape[0]
        sz = self.scales_and_zeros.view(groups, -1, N_TILE, 2)[:, tiles].reshape(groups, -1, 2).contiguous()
        cols = []
        for k0 in range(0, kp, _ROWS_CHUNK):
            c = min(_ROWS_CHUNK, kp - k0)
            eye = torch.zeros(c, kp, dtype=KERNEL_DTYPE, device=ids.device)
            at = torch.arange(c, device=ids.device)
            eye[at, k0 + at] = 1
            cols.append(torch.ops.aten._weight_int4pack_mm(eye, packed, GROUP, sz))  # [chunk, 8R]
        wt = torch.cat(cols)  # [K', 8R]: column 8r + j is row j of tile r
        w = wt.t().reshape(len(ids), N_TILE, kp)[torch.arange(len(ids), device=ids.device), ids % N_TILE]
        return w.float().reshape(len(ids), self.splits, self.in_features).sum(1).to(KERNEL_DTYPE)


def linear_from_float(w: torch.Tensor, bits: int, device: torch.device | str,
                      bias: torch.Tensor | None = None) -> CudaQuantLinear:
    """``--quantize`` on CUDA: a float [N, K] weight (any device), quantized on the GPU
    one band of rows at a time."""
    n, k = w.shape
    step = 4096
    bands = [quant.quantize_groups(w[r : r + step].to(device, non_blocking=True), bits) for r in range(0, n, step)]
    codes = torch.cat([b[0] for b in bands])
    scale = torch.cat([b[1] for b in bands])
    zero = torch.cat([b[2] for b in bands])
    del bands
    return CudaQuantLinear.from_codes(codes, scale, zero, k, 2 if bits == 8 else 1, bias)


def linear_from_gguf(parts: Sequence[tuple[str, np.ndarray]], k: int, device: torch.device | str,
                     bias: torch.Tensor | None = None) -> nn.Module:
    """`quant.linear_from_gguf` for a GPU: GGUF row blocks decoded on the CPU a band at a
    time (`quant.decode_band`), converted and packed on the GPU. Q6_K keeps its int8 form
    (`quant.GroupedInt8Linear`, dequantized per call) in bfloat16; mixed types become a
    `quant.ConcatLinear`."""
    if len({kind for kind, _ in parts}) > 1:
        return quant.per_part(parts, bias, lambda part, b: linear_from_gguf(part, k, device, b))
    kind = parts[0][0]
    step = 256
    if kind == "Q6_K":
        decoded = [quant.decode_q6_k(np.asarray(raw[r : r + step]), k) for _, raw in parts
                   for r in range(0, raw.shape[0], step)]
        codes = torch.cat([torch.from_numpy(c).to(device) for c, _ in decoded])
        scales = torch.cat([torch.from_numpy(s).to(device) for _, s in decoded]).to(KERNEL_DTYPE)
        return quant.GroupedInt8Linear(codes, scales, None if bias is None else bias.to(device, KERNEL_DTYPE))
    codes_l, scale_l, zero_l = [], [], []
    splits = 1
    for _, raw in parts:
        for r in range(0, raw.shape[0], step):
            band = quant.decode_band(kind, np.asarray(raw[r : r + step]), k)
            if band is None:
                raise ValueError(f"GGUF type {kind} has no quantized form here")
            codes_l.append(torch.from_numpy(np.ascontiguousarray(band.codes, dtype=np.uint8)).to(device))
            scale_l.append(torch.from_numpy(np.asarray(band.scale, dtype=np.float32)).to(device))
            zero_l.append(torch.from_numpy(np.asarray(band.zero, dtype=np.float32)).to(device))
            splits = band.splits
    return CudaQuantLinear.from_codes(torch.cat(codes_l), torch.cat(scale_l), torch.cat(zero_l), k, splits,
                                      None if bias is None else bias.to(device))
