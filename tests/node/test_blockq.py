"""The VNNI kernel (engine.blockq) against `gguf.quants.dequantize` + `F.linear`: exact
codes, float32-level products, rows independent of the batch and the thread count, and
a bad input row harming no other row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from swarm_node.engine import blockq
from swarm_proto.weight_format import matrix_bytes


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_vnni" in line.split() for line in f)
    except OSError:
        return False


# A CPU without AVX-512 VNNI runs PyTorch's int4 kernel instead (tests/node/test_quant.py);
# on one with it, the kernel must build (make test installs the C compiler).
pytestmark = pytest.mark.skipif(not _cpu_has_vnni(), reason="this CPU has no AVX-512 VNNI")


def _layer(kind: str, n: int, k: int, seed: int = 0) -> tuple[blockq.BlockLinear, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[:, :32] += rng.uniform(-0.1, 0.1, size=(n, 1))  # offsets per group, for Q4_1's min
    raw = quantize(w, GGMLQuantizationType[kind])
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(n, k).astype(np.float32))
    parts = [(kind, raw[:33]), (kind, raw[33:])]  # an odd first part: pairs of rows and bands cross it
    return blockq.BlockLinear.from_gguf(parts, k, band=48), ref


def test_kernel_builds_here() -> None:
    assert blockq.available()


@pytest.mark.parametrize("kind", blockq.KINDS)
@pytest.mark.parametrize("k", [576, 704, 1024])  # blocks: 16 + a lone pair; 16 + 4 + 2; two groups of 16
def test_matches_dequantized_reference(kind: str, k: int) -> None:
    n = 99  # not a multiple of the kernel's 4-row tiles
    layer, ref_w = _layer(kind, n, k)
    assert layer.codes.shape == (n, k if kind == "Q8_0" else k // 2)
    assert torch.equal(layer.rows(torch.arange(n)), ref_w)  # the file's weights, exactly
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    held = layer.codes.nbytes + layer.scales.nbytes + (0 if layer.zeros is None else layer.zeros.nbytes)
    assert held == n * k // block * size  # the file's bytes
    assert matrix_bytes(kind, (128, k), "bfloat16", blockq=True) == 128 * k // block * size  # what a node reports
    x = torch.randn(33, k, generator=torch.Generator().manual_seed(1)) * 3
    ref = F.linear(x.double(), ref_w.double())
    for rows in (1, 2, 5, 33):
        got = layer(x[:rows])
        assert got.dtype == torch.float32
        assert float((got.double() - ref[:rows]).norm() / ref[:rows].norm()) < 1e-4, rows
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    bias = torch.randn(n)
    with_bias = blockq.BlockLinear(layer.bits, layer.codes, layer.scales, layer.zeros, bias)
    assert torch.equal(with_bias(x), layer(x) + bias)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_each_row_is_computed_alone(kind: str) -> None:
    """Bit for bit the same row whatever else is in the batch and however many threads run."""
    layer, _ = _layer(kind, 130, 576, seed=2)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(3))
    whole = layer(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(9)])
        pairs = torch.cat([layer(x[i : i + 2]) for i in range(0, 8, 2)] + [layer(x[8:])])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, alone) and torch.equal(whole, pairs)


def test_a_non_finite_row_spoils_only_itself() -> None:
    layer, _ = _layer("Q4_0", 64, 512, seed=4)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(5))
    good = layer(x)
    x[1, 7] = float("nan")
    got = layer(x)
    assert torch.isnan(got[1]).all()
    assert torch.equal(got[0], good[0]) and torch.equal(got[2], good[2])
    x[1, 7] = float("inf")
    assert torch.isnan(layer(x)[1]).all()
    assert torch.equal(layer(torch.zeros(1, 512)), torch.zeros(1, 64))


def test_shapes_it_cannot_take_stay_with_pytorch() -> None:
    assert not blockq.takes("Q4_0", (64, 96))  # K not a multiple of 64
    assert not blockq.takes("Q4_K", (64, 512))
    assert blockq.takes("Q8_0", (64, 512))


@pytest.mark.parametrize("heads,kv_heads,dim,keys", [(9, 3, 64, 1), (9, 3, 64, 37), (32, 4, 128, 300)])
def test_one_query_attention_matches_sdpa(heads: int, kv_heads: int, dim: int, keys: int) -> None:
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, heads, dim, generator=g)
    k, v = torch.randn(keys, kv_heads, dim, generator=g) * 2, torch.randn(keys, kv_heads, dim, generator=g)
    got = blockq.attend_one(q, k, v)
    assert got is not None
    groups = heads // kv_heads
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.repeat_interleave(groups, 1).transpose(0, 1)[None],
                                         v.repeat_interleave(groups, 1).transpose(0, 1)[None])[0].transpose(0, 1)
    assert float((got - ref).abs().max()) < 1e-5
    k[3 % keys, 0, 0] = float("nan")
    spoilt = blockq.attend_one(q, k, v)
    assert spoilt is not None and torch.isnan(spoilt[0, :groups]).all() and not torch.isnan(spoilt[0, groups:]).any()
    assert blockq.attend_one(q.double(), k.double(), v.double()) is None  # float32 only: SDPA does the rest


@pytest.mark.parametrize("bits,tol", [(8, 1e-2), (4, 0.12)])
def test_float_weights_quantized_into_its_blocks(bits: int, tol: float) -> None:
    """``--quantize int8|int4``: Q8_0's and Q4_1's forms, scales in fp16; the rows read
    back are the codes times those scales, the product is the kernel's."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(130, 1088, generator=g) * 0.02
    w[:, 40] += 0.3  # an outlier column
    layer = blockq.BlockLinear.from_float(w, bits, band=64)
    back = layer.rows(torch.arange(130))
    assert float((back - w).norm() / w.norm()) < tol
    x = torch.randn(3, 1088, generator=g)
    assert float((layer(x) - F.linear(x, back)).norm() / F.linear(x, back).norm()) < 1e-4
    held = layer.codes.nbytes + layer.scales.nbytes + (0 if layer.zeros is None else layer.zeros.nbytes)
    per_row = 1088 * bits // 8 + 1088 // 32 * (4 if bits == 4 else 2)  # codes, fp16 scales (and offsets)
    assert held == 130 * per_row and matrix_bytes(f"int{bits}", (128, 1088), "bfloat16", blockq=True) == 128 * per_row


def test_a_wrong_width_is_refused() -> None:
    layer, _ = _layer("Q8_0", 64, 576)
    with pytest.raises(ValueError, match="1152 features"):
        layer(torch.randn(1, 1152))  # would reshape into two rows of 576 unnoticed


def test_no_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the loader turns into one warning and PyTorch's kernel (blockq._library)."""
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises((RuntimeError, OSError)):
        blockq._build()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
