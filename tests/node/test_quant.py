"""Quantized linear layers against `gguf.quants.dequantize` + `F.linear` (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from swarm_node.engine import quant

N, K = 128, 512  # K a multiple of 256 for the K-quants

# bytes per block and where the fp16 super-scales lie (random bytes elsewhere are valid codes)
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def _random_blocks(kind: str, rng: np.random.Generator) -> np.ndarray:
    """GGUF rows [N, bytes] of `kind`: quantized random weights, or for K-quants random
    valid bytes with sane fp16 scales."""
    if kind in _K_BLOCKS:
        size, scale_at = _K_BLOCKS[kind]
        raw = rng.integers(0, 256, size=(N, K // 256, size), dtype=np.uint8)
        for at in scale_at:
            raw[..., at : at + 2] = (rng.uniform(0.001, 0.01, size=(N, K // 256, 1))).astype(np.float16).view(np.uint8)
        return raw.reshape(N, -1)
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    w[:, :32] += rng.uniform(-0.1, 0.1, size=(N, 1))  # offsets per group, for Q4_1's min
    return quantize(w, GGMLQuantizationType[kind])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("vnni", [True, False], ids=["vnni", "aten"])
@pytest.mark.parametrize("kind", quant.KEPT_GGUF_TYPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_matmul_matches_dequantized_reference(kind: str, dtype: torch.dtype, tol: float, vnni: bool) -> None:
    """Each type through the kernel it runs here (engine.blockq's where this CPU has it),
    and through PyTorch's int4 kernel."""
    rng = np.random.default_rng(0)
    raw = _random_blocks(kind, rng)
    ref_w = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(N, K).astype(np.float32))
    layer = quant.linear_from_gguf([(kind, raw)], K, dtype, vnni=vnni)
    assert not isinstance(layer, quant.ConcatLinear)
    x = torch.from_numpy(rng.standard_normal((5, K)).astype(np.float32))
    ref = F.linear(x, ref_w)
    got = layer(x.to(dtype))
    assert got.dtype == dtype and got.shape == (5, N)
    assert _rel(got, ref) < tol, kind
    # the rows an embedding reads are the same weights
    ids = torch.tensor([0, 5, 63, 64, 100, 127])
    assert _rel(layer.rows(ids), ref_w[ids]) < tol
    on_vnni = isinstance(layer, quant.blockq.BlockLinear)
    assert on_vnni == (vnni and kind in quant.blockq.KINDS and quant.blockq.available())
    assert quant.module_bytes(layer) == quant.matrix_bytes(kind, (N, K), str(dtype).removeprefix("torch."), on_vnni)


def test_mixed_types_in_one_fused_matrix() -> None:
    rng = np.random.default_rng(1)
    parts = [("Q4_K", _random_blocks("Q4_K", rng)), ("Q6_K", _random_blocks("Q6_K", rng))]
    ref = torch.cat([torch.from_numpy(dequantize(r, GGMLQuantizationType[k]).reshape(N, K)) for k, r in parts])
    layer = quant.linear_from_gguf(parts, K, torch.float32)
    x = torch.randn(3, K)
    assert _rel(layer(x), F.linear(x, ref)) < 1e-3


def test_quantize_float_weights_groupwise() -> None:
    w = torch.randn(192, 256) * 0.02
    x = torch.randn(4, 256)
    for bits, tol in ((8, 1e-2), (4, 0.15)):
        layer = quant.linear_from_float(w, bits, torch.float32)
        assert _rel(layer(x), F.linear(x, w)) < tol
    # int8 is the finer of the two
    e8 = _rel(quant.linear_from_float(w, 8, torch.float32)(x), F.linear(x, w))
    e4 = _rel(quant.linear_from_float(w, 4, torch.float32)(x), F.linear(x, w))
    assert e8 < e4 / 4


def test_packed_layout_is_read_back() -> None:
    assert quant.packed_layout_known()


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_rounding_spread_brings_bfloat16_kernels_closer_to_exact(kind: str) -> None:
    """Three scaled input rows per call, summed in float32 (quant.SPREAD): the bfloat16
    roundings of input and output average out (expected error ratio ~0.6)."""
    rng = np.random.default_rng(1)
    raw = _random_blocks(kind, rng)
    ref_w = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(N, K).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((64, K)).astype(np.float32))
    ref = F.linear(x.double(), ref_w.double())
    plain = quant.linear_from_gguf([(kind, raw)], K, torch.bfloat16, vnni=False)
    spread = quant.linear_from_gguf([(kind, raw)], K, torch.bfloat16, spread=quant.SPREAD, vnni=False)
    assert quant.module_bytes(spread) == quant.module_bytes(plain)  # settings, not weights
    e_plain = float((plain(x).double() - ref).norm())
    e_spread = float((spread(x).double() - ref).norm())
    assert spread(x).dtype == torch.float32
    assert e_spread < 0.85 * e_plain, (e_spread, e_plain)
    assert quant.layer_spread(torch.float32) == () and quant.layer_spread(torch.bfloat16) == quant.SPREAD
