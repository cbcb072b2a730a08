"""Block-quantized products on AVX-512 VNNI: GGUF's Q4_0, Q4_1 and Q8_0 blocks (their codes
and scales as the file has them, re-laid once at load for the kernel, `kernel_layout`),
run by a small C kernel (``blockq.c``) built once per machine.

PyTorch's int4 kernel (engine.quant) rounds its input and output to bfloat16 and takes
8-bit codes only as two 4-bit halves; llama.cpp's speed comes from integer dot products
on the codes as they are. This kernel does the same, keeping more precision: each row of
the input is quantized per block of 32 to 16 bits (two int8 halves, two ``vpdpbusd``),
the block's dot product is exact in int32, and the rest is float32 (the C file's header
has the arithmetic). Held per row and block of 32: the codes, an fp16 scale and, for
Q4_1, an fp16 offset (``W = q s + z``; Q4_0's ``z = -8 s`` and Q8_0's ``-128 s`` are
implied): exactly the file's bytes.

The kernel is compiled with the machine's C compiler (``-march=native -fopenmp``, sharing
PyTorch's OpenMP runtime and thread count) into the cache directory the first time a
node needs it. A machine without AVX-512 VNNI or without a compiler keeps PyTorch's
int4 kernel (one log line says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from swarm_proto.store import cache_dir
from swarm_proto.weight_format import BLOCKQ_TYPES

if TYPE_CHECKING:
    from swarm_node.engine.model import RMSNorm

log = logging.getLogger(__name__)

KINDS = BLOCKQ_TYPES
_SOURCE = Path(__file__).with_name("blockq.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _build() -> Path:
    """The kernel's shared library, compiled into the cache on first use (keyed by the
    source, the flags and the CPU's features)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"blockq-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        res = subprocess.run([cc, *_FLAGS, "-o", str(built), str(_SOURCE)], check=False, capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
        os.replace(built, out)  # atomic: nodes building at once each get a whole file
    return out


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SWARM_BLOCKQ", "1") == "0":
        log.info("blockq kernel off (SWARM_BLOCKQ=0): quantized weights run PyTorch's int4 kernel")
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("blockq kernel unavailable (%s): quantized weights run PyTorch's int4 kernel", e)
        return None
    if not lib.blockq_supported():
        log.info("this CPU has no AVX-512 VNNI: quantized weights run PyTorch's int4 kernel")
        return None
    log.info("blockq kernel (AVX-512 VNNI) loaded from %s", lib._name)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.blockq_linear.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, i64, p, p, ctypes.c_float]
    lib.blockq_linear.restype = ctypes.c_int
    lib.blockq_attend1.argtypes = [p, p, p, i64, i64, i64, i64, ctypes.c_float, p]
    lib.blockq_attend1.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether this machine runs the kernel (compiled, and the CPU has AVX-512 VNNI)."""
    return _library() is not None


def takes(kind: str, shape: tuple[int, int]) -> bool:
    """Whether a [N, K] GGUF matrix of ``kind`` runs this kernel here."""
    return kind in KINDS and shape[1] % 64 == 0 and available()


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """One query's attention, q [1, H, D] over k, v [P, Hkv, D] (float32 on the CPU,
    heads grouped), in the kernel: the batch-invariant slices' per-position attention
    (engine.model._attend_each), 2-2.5x faster than SDPA at one query. None where the
    kernel is unavailable or does not take these tensors."""
    lib = _library()
    if lib is None or q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32 \
            or q.device.type != "cpu" or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return None
    _, h, d = q.shape
    p, hkv, _ = k.shape
    out = torch.empty_like(q)
    if lib.blockq_attend1(q.data_ptr(), k.data_ptr(), v.data_ptr(), p, h, hkv, d, d**-0.5, out.data_ptr()) != 0:
        return None
    return out


GROUP_BLOCKS = 16  # blocks of 32 columns per group of the kernel's layout (blockq.c)


def _pack4(q: np.ndarray) -> np.ndarray:
    """4-bit codes [n, K] in column order (uint8, 0..15), K < 512 -> the kernel's tail
    bytes [n, K/2]: each 4 blocks of 32 as 64 bytes, low nibbles blocks 0-1, high nibbles
    blocks 2-3; a last lone pair of blocks as 32 bytes, low nibbles its first 32 columns."""
    n, k = q.shape
    full = k // 128 * 128
    g = q[:, :full].reshape(n, -1, 2, 64)
    out = [(g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, -1)]
    if full < k:
        t = q[:, full:]
        out.append(t[:, :32] | (t[:, 32:] << 4))
    return np.concatenate(out, axis=1)


def _unpack4(b: torch.Tensor) -> torch.Tensor:
    """The inverse of `_pack4`: bytes [R, K/2] -> codes [R, K] in column order."""
    r, half = b.shape
    full = half // 64 * 64
    g = b[:, :full].reshape(r, -1, 1, 64)
    out = [torch.cat([g & 15, g >> 4], dim=2).reshape(r, -1)]
    if full < half:
        t = b[:, full:]
        out.append(torch.cat([t & 15, t >> 4], dim=1))
    return torch.cat(out, dim=1)


def kernel_layout(bits: int, blocks: np.ndarray) -> np.ndarray:
    """A band's code bytes [n, K/32, 16 or 32] as GGUF holds them (Q4: byte j's low nibble
    is column j, its high nibble column j + 16; 8-bit: one byte a column) -> the kernel's
    row bytes (blockq.c): the groups of 16 blocks with 4 columns of each block side by
    side, then the tail."""
    n, nb, per = blocks.shape
    g = nb // GROUP_BLOCKS * GROUP_BLOCKS
    head = blocks[:, :g].reshape(n, -1, GROUP_BLOCKS, per // 4, 4).transpose(0, 1, 3, 2, 4).reshape(n, -1)
    tail = blocks[:, g:]
    if bits == 4:
        tail = _pack4(np.concatenate([tail & 15, tail >> 4], axis=-1).reshape(n, -1))
    return np.concatenate([head, tail.reshape(n, -1)], axis=1)


def column_codes(bits: int, row_bytes: torch.Tensor) -> torch.Tensor:
    """The inverse of `kernel_layout`, as codes: rows [R, bytes] -> [R, K] in column order."""
    r = row_bytes.shape[0]
    per = 16 if bits == 4 else 32
    nb = row_bytes.shape[1] // per
    g = nb // GROUP_BLOCKS * GROUP_BLOCKS
    head = row_bytes[:, : g * per].reshape(r, -1, per // 4, GROUP_BLOCKS, 4).permute(0, 1, 3, 2, 4)  # [R, G, 16, per/4, 4]
    head = head.reshape(r, g, per)
    tail = row_bytes[:, g * per :]
    if bits == 8:
        return torch.cat([head.reshape(r, -1), tail], dim=1)
    head = torch.cat([head & 15, head >> 4], dim=-1).reshape(r, -1)
    return torch.cat([head, _unpack4(tail)], dim=1)


def _split(bits: int, row_bytes: int) -> tuple[int, int]:
    """(bytes of a row's groups, bytes of one group) in the kernel's layout."""
    group = 16 * (16 if bits == 4 else 32)
    return row_bytes // group * group, group


def pair_rows(bits: int, rows: np.ndarray) -> np.ndarray:
    """Rows [n, bytes] in `kernel_layout` -> each pair of rows (2i, 2i + 1) interleaved
    group by group, then the two tails (a last odd row stays as it is): the kernel reads
    a pair as one stream (blockq.c)."""
    n, rb = rows.shape
    p = n // 2
    head, group = _split(bits, rb)
    out = rows.copy()
    pairs = rows[: 2 * p].reshape(p, 2, rb)
    heads = pairs[:, :, :head].reshape(p, 2, -1, group).transpose(0, 2, 1, 3).reshape(p, -1)
    out[: 2 * p] = np.concatenate([heads, pairs[:, :, head:].reshape(p, -1)], axis=1).reshape(2 * p, rb)
    return out


def unpair_rows(bits: int, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a matrix laid out by `pair_rows`, each as `kernel_layout` made it."""
    n, rb = codes.shape
    p = n // 2
    head, group = _split(bits, rb)
    out = torch.empty(len(ids), rb, dtype=codes.dtype)
    lone = ids == 2 * p  # the last row of an odd count
    if lone.any():
        out[lone] = codes[2 * p]
    paired = ~lone
    if paired.any():
        pair, j = ids[paired] // 2, ids[paired] % 2
        rows = codes[: 2 * p].reshape(p, 2 * rb)
        heads = rows[:, : 2 * head].reshape(p, -1, 2, group)[pair, :, j]  # [R, groups, group]
        tails = rows[:, 2 * head :].reshape(p, 2, -1)[pair, j]
        out[paired] = torch.cat([heads.reshape(len(pair), -1), tails], dim=1)
    return out


class BlockLinear(nn.Module):
    """``F.linear`` of block-quantized weights with the VNNI kernel (module doc).

    Buffers: ``codes`` uint8 [N, K/2] (4-bit) or [N, K] (8-bit, sign bit flipped), each row
    in the kernel's layout (`kernel_layout`);
    ``scales`` float16 [N, K/32]; ``zeros`` float16 [N, K/32] (Q4_1 only). Any input
    dtype; the product is computed in float32 and returned in the input's dtype."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    def __init__(self, bits: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * 32
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        # an RMSNorm's (weight, eps) applied to the input in the kernel (`fuse_norm`); not
        # a submodule: the weight stays the norm's, in its place in the state dict
        self.norm: tuple[torch.Tensor, float] | None = None
        self._cached: tuple[tuple[torch.Tensor | None, ...], tuple[int, int, int, int, float]] | None = None

    def fuse_norm(self, norm: RMSNorm) -> bool:
        """Normalize the input with ``norm`` (an engine.model.RMSNorm whose output feeds
        only this product) inside the kernel: one call instead of the norm's six ops, and
        the norm passes its input through (``norm.fused``). Only a float32 weight is taken
        (the kernel's input is float32); returns whether it was."""
        weight = norm.weight
        if weight.dtype != torch.float32 or weight.shape != (self.in_features,) or not weight.is_contiguous():
            return False
        self.norm = (weight, float(norm.eps))
        norm.fused = True
        return True

    @staticmethod
    def from_gguf(parts: list[tuple[str, np.ndarray]], k: int, bias: torch.Tensor | None = None,
                  band: int = 256) -> BlockLinear:
        """GGUF row blocks of one kind in ``KINDS``, stacked along the output; converted a
        band of rows at a time into preallocated buffers."""
        kind = parts[0][0]
        bits = 8 if kind == "Q8_0" else 4
        n = sum(raw.shape[0] for _, raw in parts)
        codes = np.empty((n, k * bits // 8), np.uint8)
        scales = np.empty((n, k // 32), np.float16)
        zeros = np.empty((n, k // 32), np.float16) if kind == "Q4_1" else None  # else -8 s, -128 s
        starts = np.cumsum([0] + [raw.shape[0] for _, raw in parts])
        band += band % 2  # bands start at even rows: the pairs of rows stay within one
        for r in range(0, n, band):
            end = min(r + band, n)
            b = np.concatenate([np.asarray(raw[max(r - lo, 0) : max(min(end - lo, raw.shape[0]), 0)])
                                for (_, raw), lo in zip(parts, starts[:-1])])
            blocks = b.reshape(b.shape[0], k // 32, -1)
            scales[r:end] = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
            codes[r:end] = pair_rows(bits, kernel_layout(bits, blocks[..., 2:] ^ np.uint8(0x80) if bits == 8
                                                         else blocks[..., -16:]))
            if zeros is not None:
                zeros[r:end] = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        return BlockLinear(bits, torch.from_numpy(codes), torch.from_numpy(scales),
                           None if zeros is None else torch.from_numpy(zeros), bias)

    def _weights(self) -> tuple[int, int, int, int, float]:
        """(codes, scales, zeros, norm weight) addresses and the norm's eps, as the kernel
        takes them; kept until one of those tensors is replaced (a decode step makes ~100
        products, and reading four addresses costs as much as a small product)."""
        b = self._buffers
        held = (b["codes"], b["scales"], b["zeros"], None if self.norm is None else self.norm[0])
        cached = self._cached
        if cached is None or any(t is not c for t, c in zip(held, cached[0])):
            codes, scales, zeros, norm = held
            assert codes is not None and scales is not None
            ptrs = (codes.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(),
                    0 if norm is None else norm.data_ptr(), 0.0 if self.norm is None else self.norm[1])
            cached = self._cached = (held, ptrs)
        return cached[1]

    @staticmethod
    def from_float(w: torch.Tensor, bits: int, bias: torch.Tensor | None = None, band: int = 256) -> BlockLinear:
        """``--quantize int8|int4`` of a float [N, K] weight, per group of 32 columns, a band
        of rows at a time: int4 as Q4_1 (``W = q s + z`` from the group's min and max,
        q in 0..15), int8 as Q8_0 (``W = q s`` from its absolute max, q in -127..127), the
        scales rounded to fp16 before the codes are chosen against them."""
        if bits not in (4, 8):
            raise ValueError(f"cannot quantize to {bits} bits: int8 and int4 are supported")
        n, k = w.shape
        codes = np.empty((n, k * bits // 8), np.uint8)
        scales = torch.empty(n, k // 32, dtype=torch.float16)
        zeros = torch.empty(n, k // 32, dtype=torch.float16) if bits == 4 else None
        tiny = float(torch.finfo(torch.float16).tiny)
        band += band % 2
        for r in range(0, n, band):
            g = w[r : r + band].float().reshape(-1, k // 32, 32)
            if bits == 4:
                lo = g.amin(-1).to(torch.float16)
                s = ((g.amax(-1) - lo.float()) / 15).clamp(tiny, 65504).to(torch.float16)
                q = torch.round((g - lo.float()[..., None]) / s.float()[..., None]).clamp_(0, 15).to(torch.uint8)
                zeros[r : r + band] = lo  # type: ignore[index]
                raw = (q[..., :16] | (q[..., 16:] << 4)).numpy()  # GGUF's byte order
            else:
                s = (g.abs().amax(-1) / 127).clamp(tiny, 65504).to(torch.float16)
                q = torch.round(g / s.float()[..., None]).clamp_(-127, 127)
                raw = (q + 128).to(torch.uint8).numpy()
            scales[r : r + band] = s
            codes[r : r + band] = pair_rows(bits, kernel_layout(bits, raw))
        return BlockLinear(bits, torch.from_numpy(codes), scales, zeros, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = _library()
        assert lib is not None, "BlockLinear built where the kernel is unavailable"
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"input of {x.shape[-1]} features to a product that takes {k}")
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        m = x2.shape[0]
        y = torch.empty(m, n)
        codes, scales, zeros, norm, eps = self._weights()
        if lib.blockq_linear(self.bits, x2.data_ptr(), m, k, codes, scales, zeros, n, y.data_ptr(), norm, eps) != 0:
            raise MemoryError(f"blockq kernel failed on a [{m}, {k}] input")
        if self.bias is not None:
            y += self.bias
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def rows(self, ids: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Dequantized rows ``ids`` [R] -> float32 [R, in_features], exactly the file's
        weights (``exact`` is accepted for the other modules' signature)."""
        q = column_codes(self.bits, unpair_rows(self.bits, self.codes, ids)).view(len(ids), -1, 32).float()
        s = self.scales[ids].float()[..., None]  # [R, K/32, 1]
        if self.bits == 8:
            return ((q - 128) * s).reshape(len(ids), -1)
        z = -8 * s if self.zeros is None else self.zeros[ids].float()[..., None]
        return (q * s + z).reshape(len(ids), -1)
