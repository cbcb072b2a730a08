"""Weight-only quantized linear layers: GGUF blocks kept quantized, repacked once at load.

Every format the engine keeps quantized is brought to one form, *grouped affine
4-bit*: for a weight ``W [N, K]``, codes ``q`` in 0..15 and, per row and group of
32 columns, a scale ``s`` and an offset ``z`` with ``W = (q - 8) * s + z``. That is
exactly what PyTorch's weight-only int4 kernel (``aten._weight_int4pack_mm_for_cpu``)
computes from its packed codes and ``scales_and_zeros``, so the kernel runs the
weights without ever materialising them:

- Q4_0 ``W = d (q - 8)``: ``s = d``, ``z = 0``; Q4_1 ``W = d q + m``: ``s = d``, ``z = m + 8 d``.
- Q4_K (super-blocks of 256, sub-blocks of 32, 6-bit sub-scales and mins):
  ``W = d sc q - dmin m``: ``s = d sc``, ``z = 8 d sc - dmin m``.
- Wider codes are split into two nibbles, ``q = 16 hi + lo``, laid side by side along
  K (``K' = 2 K``) while the input is repeated (``[x, x]``): one kernel call sums both
  halves. Q8_0 (``hi`` signed), Q5_K (``hi`` in {0, 1}) and ``--quantize int8`` go so.
- Q6_K's sub-blocks are 16 wide, narrower than the kernel's smallest group (32), so
  it keeps its 6-bit codes as int8 with per-16 scales and is dequantized per call
  (`GroupedInt8Linear`): compact in memory, slower to run.

Invariants: the load converts one band of rows at a time (no float copy of a whole
matrix is ever made); a module's buffers are all it holds (``held_bytes``); its
``rows(ids)`` gives the dequantized rows, so a tied embedding reads the LM head's
packed weights instead of keeping a second copy. Formats are exact up to the compute
dtype's rounding of ``s`` and ``z``.

Rounding spread (``spread``, the loader's choice for layer matrices with a bfloat16
kernel): the kernel rounds its input and its float32 sums to bfloat16, and those two
roundings are most of what a quantized model's logits differ by from float32 compute.
A layer built with ``spread = (w_1, .., w_R)`` (summing to 1) runs the rows
``w_r * x`` in one kernel call and sums the R results in float32: the R roundings of
input and output are independent, so their error shrinks by about ``sqrt(sum w_r^2)``
(0.59 for `SPREAD`). Each row is still computed on its own (the int4 kernel's rows are
independent and the sum is elementwise), so batch invariance holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from swarm_node.engine import blockq
from swarm_proto.weight_format import GROUP, KEPT_GGUF_TYPES, PACK_ROWS, QK_K, kept_quantized, matrix_bytes

log = logging.getLogger(__name__)

_ROWS_PER_BAND = 256  # rows converted at a time at load (a multiple of PACK_ROWS)
# Weights of the rounding spread (module doc). Measured on SmolLM2 Q4_1 against
# transformers (docs/engine.md): top-1 98.57% -> 99.35% over 768 positions, and
# 98.96% -> 99.61% over 768 held-out ones; two rows (0.3, 0.7 or 0.4, 0.6) did not
# help on the held-out set.
# The loader gives it to the matrices fed by a norm (q/k/v, gate/up: 2/3 of the weights)
# only: the same 99.35% for ~20% less decode time (docs/engine.md).
SPREAD: tuple[float, ...] = (0.25, 0.35, 0.4)
__all__ = ["KEPT_GGUF_TYPES", "SPREAD", "EachRow", "held_bytes", "kept_quantized", "layer_spread", "linear_from_float", "linear_from_gguf", "module_bytes", "rows_independent"]


@dataclass(frozen=True)
class Affine4:
    """A band of rows in grouped affine 4-bit form: ``W = (codes - 8) * scale + zero``.

    codes: uint8 [n, K'] in 0..15; scale, zero: float32 [n, K' / GROUP]; ``splits``
    is how many K-wide pieces lie side by side (2 for codes wider than 4 bits)."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    splits: int


# --- GGUF block decoding (numpy, a band of rows at a time) -----------------------------


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 packed bytes per super-block -> 8 six-bit scales and 8 mins."""
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _split_nibbles(q: np.ndarray, d: np.ndarray, offset: np.ndarray) -> Affine4:
    """Codes ``q`` [n, K] (integers in -128..127) with ``W = d * q + offset`` per group of
    32 ([n, K/32] each) -> two nibble halves side by side: hi (x16) ++ lo.

    hi is stored as hi + 8 with no offset, so ``(hi + 8 - 8) * 16d`` is exact; an offset
    of 128d there would cancel against ``-8 * 16d`` and lose the low bits of both in
    bfloat16."""
    q = q.astype(np.int16)
    hi, lo = q >> 4, q & 15  # arithmetic shift: hi in -8..7
    codes = np.concatenate([hi + 8, lo], axis=1).astype(np.uint8)
    scale = np.concatenate([16 * d, d], axis=1)
    zero = np.concatenate([np.zeros_like(d), 8 * d + offset], axis=1)
    return Affine4(codes, scale, zero, 2)


def decode_band(kind: str, raw: np.ndarray, k: int) -> Affine4 | None:
    """Rows of GGUF blocks ``raw`` [n, bytes per row] of ``kind`` -> grouped affine 4-bit,
    or None when the type has no such form here."""
    n = raw.shape[0]
    if kind in ("Q4_0", "Q4_1"):
        bs = 18 if kind == "Q4_0" else 20
        b = raw.reshape(n, k // 32, bs)
        d = _f16(b[..., 0:2]).reshape(n, -1)
        qs = b[..., bs - 16 :]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k)  # low nibbles: 0..15, high: 16..31
        zero = np.zeros_like(d) if kind == "Q4_0" else _f16(b[..., 2:4]).reshape(n, -1) + 8 * d
        return Affine4(q, d, zero, 1)
    if kind == "Q8_0":
        b = raw.reshape(n, k // 32, 34)
        d = _f16(b[..., 0:2]).reshape(n, -1)
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)
        return _split_nibbles(q, d, np.zeros_like(d))
    if kind in ("Q4_K", "Q5_K"):
        bs = 144 if kind == "Q4_K" else 176
        kb = raw.reshape(n * (k // QK_K), bs)
        d, dmin = _f16(kb[:, 0:2]), _f16(kb[:, 2:4])
        sc, mn = _k_scales(kb[:, 4:16])
        ds = (d * sc).reshape(n, -1)  # [n, K/32]
        dm = (dmin * mn).reshape(n, -1)
        qs = kb[:, bs - 128 :].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        low = (qs & 15).reshape(-1, QK_K)
        if kind == "Q4_K":
            return Affine4(low.reshape(n, k), ds, 8 * ds - dm, 1)
        qh = kb[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        five = low | ((qh & 1).reshape(-1, QK_K) << 4)
        return _split_nibbles(five.reshape(n, k), ds, -dm)
    return None


def decode_q6_k(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K rows -> (int8 codes [n, K] in -32..31, float32 scales [n, K/16])."""
    n = raw.shape[0]
    b = raw.reshape(n * (k // QK_K), 210)
    ql, qh = b[:, :128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 15
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (lo.reshape(-1, QK_K) | (hi.reshape(-1, QK_K) << 4)).astype(np.int8) - np.int8(32)
    return q.reshape(n, k), (d * sc).reshape(n, -1)


# --- float checkpoints (--quantize) ----------------------------------------------------


def quantize_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A float band [n, K] -> (codes uint8 [n, K'], scale, zero float32 [n, K' / 32],
    splits), on ``w``'s device (the CPU path and engine.quant_cuda share it): int4
    asymmetric (min/max per group of 32), int8 symmetric (absmax per group of 32) split
    into nibble halves as `_split_nibbles` does."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    if bits == 4:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15)
        return q.reshape(n, k).to(torch.uint8), scale, lo + 8 * scale, 1
    if bits == 8:
        d = (g.abs().amax(-1) / 127).clamp_min(1e-12)
        q = torch.round(g / d[..., None]).clamp_(-127, 127).reshape(n, k).to(torch.int16)
        hi, lo = q >> 4, q & 15  # arithmetic shift: hi in -8..7
        codes = torch.cat([hi + 8, lo], dim=1).to(torch.uint8)
        return codes, torch.cat([16 * d, d], dim=1), torch.cat([torch.zeros_like(d), 8 * d], dim=1), 2
    raise ValueError(f"cannot quantize to {bits} bits: int8 and int4 are supported")


def quantize_band(w: torch.Tensor, bits: int) -> Affine4:
    """`quantize_groups` of a CPU band, as an `Affine4`."""
    codes, scale, zero, splits = quantize_groups(w, bits)
    return Affine4(codes.numpy(), scale.numpy(), zero.numpy(), splits)


# --- the packed layout ------------------------------------------------------------------


def _pack_aten(codes: np.ndarray) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes.astype(np.int32)), 1)


def _pack_numpy(codes: np.ndarray) -> np.ndarray:
    """The CPU kernel's packed layout (see `_unpack_rows`), written directly: the aten
    conversion wants int32 codes and is many times slower."""
    n, kp = codes.shape
    c = codes.astype(np.uint8).reshape(n // PACK_ROWS, 2, 32, kp)
    b = c[:, 0] | (c[:, 1] << 4)  # [N/64, 32, K']
    return np.ascontiguousarray(b.transpose(0, 2, 1)).reshape(n, kp // 2)


def _pack(codes: np.ndarray) -> np.ndarray:
    return _pack_numpy(codes) if packed_layout_known() else _pack_aten(codes).numpy()


def _unpack_rows(packed: torch.Tensor, ids: torch.Tensor, kp: int) -> torch.Tensor:
    """Codes [len(ids), K'] of rows ``ids`` from the CPU kernel's packed layout: blocks of
    64 rows, each [K', 32] bytes whose low nibble is row j and high nibble row j + 32."""
    flat = packed.reshape(-1, kp, 32)  # [N/64, K', 32]
    block, j = ids // PACK_ROWS, ids % PACK_ROWS
    b = flat[block, :, j % 32]  # [R, K']
    return torch.where((j < 32)[:, None], b & 15, b >> 4)


@lru_cache(maxsize=1)
def packed_layout_known() -> bool:
    """Whether `_pack_numpy` and `_unpack_rows` write and read this PyTorch build's packed
    layout (checked once against aten's own conversion)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.uint8)
    try:
        packed = _pack_aten(codes.numpy())
    except RuntimeError:
        return False
    if packed.shape != (128, 32) or packed.dtype != torch.uint8:
        return False
    ours = torch.from_numpy(_pack_numpy(codes.numpy()))
    return bool(torch.equal(packed, ours) and torch.equal(_unpack_rows(packed, torch.arange(128), 64), codes))


class QuantLinear(nn.Module):
    """``F.linear`` of grouped affine 4-bit weights with PyTorch's int4 kernel (CPU).

    The kernel runs in the dtype of ``scales_and_zeros`` (its *kernel dtype*); inputs
    are cast to it and outputs back to the input's dtype, so a model may keep its
    activations in float32 around bfloat16 products.

    Buffers: ``packed`` uint8 [N, K'/2] in the kernel's layout; ``scales_and_zeros``
    [K'/32, N, 2] in the compute dtype; ``splits`` K-wide pieces (input repeated).
    ``spread``: weights of the rounding spread (module doc), or none."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    residual: torch.Tensor | None

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, splits: int,
                 bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, refine_top: int = 0,
                 spread: Sequence[float] = ()) -> None:
        super().__init__()
        self.in_features, self.splits = in_features, splits
        # a plain tensor, not a buffer: it is settings, not weights (held_bytes)
        self.spread = torch.tensor(spread, dtype=torch.float32)[:, None, None] if len(spread) > 1 else None
        self.out_features = scales_and_zeros.shape[1]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        # What the kernel dtype's rounding took off the float32 scales and offsets (same
        # shape and dtype): ``rows`` adds it back, so dequantized rows are exact.
        self.register_buffer("residual", residual)
        self.refine_top = refine_top if residual is not None else 0
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @staticmethod
    def from_bands(bands: Sequence[Affine4], in_features: int, dtype: torch.dtype,
                   bias: torch.Tensor | None = None, refine_top: int = 0, spread: Sequence[float] = ()) -> QuantLinear:
        """``refine_top`` > 0 (an LM head run in a narrow kernel dtype): keep the scales'
        residual and recompute each row's top ``refine_top`` outputs exactly (`forward`).
        ``spread``: the rounding spread's weights (module doc)."""
        packed = torch.from_numpy(np.concatenate([_pack(b.codes) for b in bands]))
        scale = np.concatenate([b.scale for b in bands])  # [N, G]
        zero = np.concatenate([b.zero for b in bands])
        sz32 = torch.from_numpy(np.stack([scale, zero], axis=-1)).transpose(0, 1).contiguous()  # [G, N, 2] float32
        sz = sz32.to(dtype)
        residual = (sz32 - sz.float()).to(dtype) if refine_top and dtype != torch.float32 else None
        return QuantLinear(packed, sz, in_features, bands[0].splits, bias, residual, refine_top, spread)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        kdtype = self.scales_and_zeros.dtype
        x2 = x.reshape(-1, self.in_features)
        t = x2.shape[0]
        spread = self.spread
        if spread is not None:
            x2 = (x2.float()[None] * spread).to(kdtype).view(-1, self.in_features)  # [R T, K]: w_r x
        else:
            x2 = x2.to(kdtype)
        if self.splits > 1:
            x2 = x2.repeat(1, self.splits)  # [T, K'] = [x, x]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_and_zeros)
        if spread is not None:
            y = torch.sum(y.view(spread.shape[0], t, self.out_features), 0, dtype=torch.float32)
        if self.bias is not None:
            y = y + self.bias
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.refine_top and x.dtype == torch.float32:
            y = self._refine(x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)).reshape(y.shape)
        return y

    def _refine(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each row's top ``refine_top`` outputs [T, N] recomputed in float32 from exact
        rows: an LM head's near-tied logits are decided without the kernel's rounding of
        its input, scales and output (each row alone: batch invariance holds)."""
        ids = y.topk(min(self.refine_top, y.shape[-1]), dim=-1).indices  # [T, k]
        w = self.rows(ids.reshape(-1), exact=True).float().view(*ids.shape, self.in_features)  # [T, k, K]
        exact = (w * x[:, None, :]).sum(-1)  # [T, k]: elementwise, one reduction per output
        if self.bias is not None:
            exact = exact + self.bias.float()[ids]
        return y.scatter(1, ids, exact)

    def rows(self, ids: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Dequantized rows ``ids`` [R] -> [R, in_features] in the compute dtype (float32
        with ``exact`` and a residual: the scales as the file has them)."""
        kp = self.in_features * self.splits
        q = _unpack_rows(self.packed, ids, kp).float()  # [R, K']
        sz = self.scales_and_zeros[:, ids].float()  # [G, R, 2]
        if exact and self.residual is not None:
            sz = sz + self.residual[:, ids].float()
        sz = sz.repeat_interleave(GROUP, dim=0)  # [K', R, 2]
        w = (q - 8) * sz[..., 0].t() + sz[..., 1].t()
        w = w.reshape(len(ids), self.splits, self.in_features).sum(1)
        return w if exact and self.residual is not None else w.to(self.scales_and_zeros.dtype)


class GroupedInt8Linear(nn.Module):
    """Int8 codes with one scale per row and group of ``group`` columns, dequantized per
    call (Q6_K: its 16-wide groups are narrower than the int4 kernel's)."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group = self.in_features // scales.shape[1]
        self.register_buffer("codes", codes)  # int8 [N, K]
        self.register_buffer("scales", scales)  # [N, K/group], compute dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def _weight(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.codes if ids is None else self.codes[ids]
        scales = self.scales if ids is None else self.scales[ids]
        n = codes.shape[0]
        w = codes.view(n, -1, self.group).to(scales.dtype) * scales[..., None]
        return w.view(n, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.scales.dtype), self._weight(), self.bias).to(x.dtype)

    def rows(self, ids: torch.Tensor, exact: bool = False) -> torch.Tensor:
        return self._weight(ids)


class ConcatLinear(nn.Module):
    """Several linear layers on one input, outputs concatenated (a fused matrix whose
    parts are stored in different formats)."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class EachRow(nn.Module):
    """A product run one row at a time: each row's result is then the one a single-row
    call gives, whatever else the batch holds (the LM head of an otherwise batch-invariant
    slice when the head is a dense or Q6_K matrix; see `rows_independent`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.inner(x)  # type: ignore[no-any-return]
        return torch.cat([self.inner(x[i : i + 1].clone()) for i in range(x.shape[0])])


def rows_independent(module: nn.Module) -> bool:
    """Whether each output row of ``module`` is computed from its input row alone, bit for
    bit whatever the other rows are. PyTorch's int4 kernel does so (tests/node/test_quant.py
    checks it); dense BLAS products do not (their blocking and threading depend on the
    number of rows), nor does `GroupedInt8Linear`, a dense product. The VNNI kernel's rows
    are independent too (engine.blockq)."""
    if isinstance(module, ConcatLinear):
        return all(rows_independent(p) for p in module.parts)
    return isinstance(module, (QuantLinear, EachRow, blockq.BlockLinear))


class QuantEmbedding(nn.Module):
    """Token embedding read as dequantized rows of a quantized [V, C] matrix (the LM
    head's own when the two are tied: one copy)."""

    def __init__(self, table: QuantLinear | GroupedInt8Linear | blockq.BlockLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.table.rows(flat, exact=True).to(self.dtype).reshape(*ids.shape, -1)


# --- building from GGUF blocks ----------------------------------------------------------

def per_part(parts: Sequence[tuple[str, np.ndarray]], bias: torch.Tensor | None,
             build: Callable[[list[tuple[str, np.ndarray]], torch.Tensor | None], nn.Module]) -> ConcatLinear:
    """A stack of mixed-type parts: one module per part (``build(part, its bias)``),
    side by side along the output."""
    mods: list[nn.Module] = []
    col = 0
    for kind, raw in parts:
        mods.append(build([(kind, raw)], None if bias is None else bias[col : col + raw.shape[0]]))
        col += raw.shape[0]
    return ConcatLinear(mods)


def linear_from_gguf(parts: Sequence[tuple[str, np.ndarray]], k: int, dtype: torch.dtype,
                     bias: torch.Tensor | None = None, refine_top: int = 0, spread: Sequence[float] = (),
                     vnni: bool = True) -> nn.Module:
    """A linear layer over GGUF row blocks ``parts`` [(type name, raw [n_i, bytes])],
    stacked along the output dimension (a fused q/k/v, say). Parts of one type become
    one kernel call; mixed types become a `ConcatLinear`. Q4_0, Q4_1 and Q8_0 run the
    VNNI kernel where this machine has it (engine.blockq: float32 compute, so neither
    ``refine_top`` nor ``spread`` applies), else (or with ``vnni`` false) PyTorch's int4
    kernel."""
    if len({kind for kind, _ in parts}) > 1:
        return per_part(parts, bias, lambda part, b: linear_from_gguf(part, k, dtype, b, spread=spread, vnni=vnni))
    kind = parts[0][0]
    if vnni and blockq.takes(kind, (sum(raw.shape[0] for _, raw in parts), k)):
        return blockq.BlockLinear.from_gguf(list(parts), k, bias, _ROWS_PER_BAND)
    if kind == "Q6_K":
        decoded = [decode_q6_k(raw[r : r + _ROWS_PER_BAND], k) for _, raw in parts
                   for r in range(0, raw.shape[0], _ROWS_PER_BAND)]
        codes = torch.from_numpy(np.concatenate([c for c, _ in decoded]))
        scales = torch.from_numpy(np.concatenate([s for _, s in decoded])).to(dtype)
        return GroupedInt8Linear(codes, scales, bias)
    bands: list[Affine4] = []
    for _, raw in parts:
        for r in range(0, raw.shape[0], _ROWS_PER_BAND):
            band = decode_band(kind, np.asarray(raw[r : r + _ROWS_PER_BAND]), k)
            if band is None:
                raise ValueError(f"GGUF type {kind} has no quantized form here")
            bands.append(band)
    return QuantLinear.from_bands(bands, k, dtype, bias, refine_top, spread)


def linear_from_float(w: torch.Tensor, bits: int, dtype: torch.dtype, bias: torch.Tensor | None = None,
                      spread: Sequence[float] = (), vnni: bool = True) -> nn.Module:
    """``--quantize``: a float [N, K] weight, quantized group-wise band by band: in the
    VNNI kernel's blocks where this machine runs it (engine.blockq.BlockLinear.from_float;
    Q4_1's and Q8_0's forms), else (or with ``vnni`` false) for PyTorch's int4 kernel."""
    n, k = w.shape
    if vnni and blockq.takes("Q8_0" if bits == 8 else "Q4_1", (n, k)):
        return blockq.BlockLinear.from_float(w, bits, bias, _ROWS_PER_BAND)
    bands = [quantize_band(w[r : r + _ROWS_PER_BAND], bits) for r in range(0, n, _ROWS_PER_BAND)]
    return QuantLinear.from_bands(bands, k, dtype, bias, spread=spread)


def layer_spread(dtype: torch.dtype) -> tuple[float, ...]:
    """The rounding spread a layer matrix with kernel dtype ``dtype`` gets: `SPREAD`
    below float32 (whose kernel rounds nothing), none in float32."""
    return () if dtype == torch.float32 else SPREAD


def held_bytes(kind: str, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes a [N, K] matrix of ``kind`` holds once loaded here (see swarm_proto.weight_format)."""
    return matrix_bytes(kind, shape, str(dtype).removeprefix("torch."), blockq=blockq.available())


def module_bytes(module: nn.Module) -> int:
    """Bytes of distinct parameter and buffer storage (a tied head counts once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
