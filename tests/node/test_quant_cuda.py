"""Quantized weights on CUDA (engine.quant_cuda): PyTorch's int4 kernel (tinygemm) runs
the same grouped affine 4-bit form as the CPU path. All but the weight-format tests need
a GPU (sm80+) and are skipped without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error

from swarm_node.engine import quant, quant_cuda
from swarm_node.engine.loading import load_slice, model_bytes
from swarm_node.engine.model import SeqChunk
from swarm_proto.model_args import read_args
from swarm_proto.weight_format import GROUP, format_layer_bytes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Shapes whose K' take every inner k-tiling: 4096 (8 tiles of 16), 576 (4), 96 (2).
SHAPES = [(256, 4096), (192, 576), (128, 96)]


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [N, K] from `quant.quantize_groups`'s output (nibble halves summed)."""
    w = (codes.float() - 8) * scale.repeat_interleave(GROUP, 1) + zero.repeat_interleave(GROUP, 1)
    return w.reshape(w.shape[0], -1, k).sum(1)


@pytest.mark.parametrize("bits", [4, 8])
@cuda
def test_quantizer_matches_the_cpu_path(bits: int) -> None:
    w = torch.randn(320, 192, generator=torch.Generator().manual_seed(bits)) * 0.05
    codes, scale, zero, splits = quant.quantize_groups(w.cuda(), bits)
    ref = quant.quantize_band(w, bits)
    assert splits == ref.splits
    assert np.array_equal(codes.cpu().numpy(), ref.codes.astype(np.uint8))
    assert np.allclose(scale.cpu().numpy(), ref.scale, rtol=0, atol=0)
    assert np.allclose(zero.cpu().numpy(), ref.zero, rtol=1e-6, atol=1e-9)


def test_inner_k_tiles() -> None:
    assert [quant_cuda.inner_k_tiles(k) for k in (4096, 576, 96)] == [8, 4, 2]


def test_quantize_flag_on_cuda(llama_dir: Path) -> None:
    """``--quantize int8|int4`` applies on CUDA, with bfloat16 kernels (the only dtype
    tinygemm takes) whatever the activations' dtype; ``auto`` still dequantizes GGUF there."""
    from swarm_proto.weight_format import compute_dtypes, resolve

    assert resolve("int4", llama_dir, "auto", "cuda:0") == "int4"
    with pytest.raises(ValueError, match="CPU or CUDA"):
        resolve("int8", llama_dir, "auto", "mps")
    assert compute_dtypes("auto", "int4", "cuda") == ("bfloat16", "bfloat16")
    assert compute_dtypes("float32", "int8", "cuda") == ("float32", "bfloat16")
    assert compute_dtypes("auto", "int4", "cpu") == ("float32", "bfloat16")


@cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_matmul_matches_dequantized_weights(bits: int, n: int, k: int) -> None:
    """bfloat16 kernel against float32 ``F.linear`` on the dequantized weights: relative
    error < 2e-2 (the issue's bound for bfloat16 compute), batch 1 to 33."""
    g = torch.Generator(device="cuda").manual_seed(n + bits)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    bias = torch.randn(n, device="cuda", generator=g) * 0.1
    codes, scale, zero, splits = quant.quantize_groups(w, bits)
    layer = quant_cuda.CudaQuantLinear.from_codes(codes, scale, zero, k, splits, bias)
    ref_w = _dequantized(codes, scale, zero, k)
    for m in (1, 5, 33):
        x = torch.randn(m, k, device="cuda", generator=g)
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        assert relative_error(got, F.linear(x, ref_w, bias.bfloat16().float())) < 2e-2
    ids = torch.tensor([0, 7, 8, n - 1, 3, 3], device="cuda")
    rows = layer.rows(ids)
    assert rows.dtype == torch.bfloat16
    assert relative_error(rows, ref_w[ids]) < 1e-2
    assert quant.module_bytes(layer) - n * 2 == quant.held_bytes(f"int{bits}", (n, k), torch.bfloat16)


def _q4_0(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Random valid Q4_0 rows (fp16 scale + 16 bytes of nibbles per 32 values)."""
    raw = rng.integers(0, 256, size=(n, k // 32, 18), dtype=np.uint8)
    raw[..., 0:2] = rng.uniform(1e-3, 1e-2, size=(n, k // 32, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def _q8_0(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    raw = rng.integers(0, 256, size=(n, k // 32, 34), dtype=np.uint8)
    raw[..., 0:2] = rng.uniform(1e-4, 1e-3, size=(n, k // 32, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


@cuda
@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "mixed"])
def test_gguf_blocks_on_cuda_match_the_cpu_layout(kind: str) -> None:
    """GGUF blocks decoded for the GPU compute what the CPU layer's exact rows give."""
    rng = np.random.default_rng(1)
    k = 512
    parts = {"Q4_0": [("Q4_0", _q4_0(rng, 128, k))], "Q8_0": [("Q8_0", _q8_0(rng, 128, k))],
             "mixed": [("Q4_0", _q4_0(rng, 64, k)), ("Q8_0", _q8_0(rng, 128, k))]}[kind]
    cpu = quant.linear_from_gguf(parts, k, torch.float32)
    gpu = quant_cuda.linear_from_gguf(parts, k, "cuda")
    n = sum(raw.shape[0] for _, raw in parts)
    ids = torch.arange(n)
    if isinstance(cpu, quant.ConcatLinear):
        ref_w = torch.cat([p.rows(torch.arange(p.out_features), exact=True) for p in cpu.parts])
    else:
        ref_w = cpu.rows(ids, exact=True)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(2))
    assert relative_error(gpu(x.cuda()).cpu(), F.linear(x, ref_w.float())) < 2e-2
    if not isinstance(gpu, quant.ConcatLinear):
        assert relative_error(gpu.rows(ids.cuda()).cpu(), ref_w) < 1e-2


C, FF, H, KV, V, L = 256, 512, 4, 2, 512, 2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama whose every layer matrix the int4 layouts keep."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=KV, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() > 1 else 0.2).add_(1.0 if p.dim() == 1 else 0.0)
    out = tmp_path_factory.mktemp("cudaq") / "llama"
    model.save_pretrained(out)
    return out


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(model.device), [SeqChunk(model.new_cache(len(ids)), 0, len(ids))], all_logits=True).float().cpu()


@cuda
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_cuda_slice_follows_the_cpu_slice(llama_dir: Path, weights: str) -> None:
    """The whole model quantized on CUDA (bfloat16) against the same quantization on the
    CPU in float32. Asserted: logits within 5e-2 relative error; every greedy token the GPU
    picks is the CPU's top-1 at that position unless the CPU's own top-2 margin there is
    under 0.1 (a near-tie that bfloat16 rounding may decide either way: the two runs differ
    by the compute dtype, not the weights, so bit equality is not expected)."""
    cpu = load_slice(llama_dir, 0, L, dtype=torch.float32, weights=weights, kernel_dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16 kernels"):
        load_slice(llama_dir, 0, 1, weights=weights, device="cuda", kernel_dtype=torch.float32)
    before = torch.cuda.memory_allocated()
    gpu = load_slice(llama_dir, 0, L, dtype=torch.bfloat16, weights=weights, device="cuda")
    held = model_bytes(gpu)
    assert abs(torch.cuda.memory_allocated() - before - held) <= 0.02 * held + (1 << 20)
    assert held == model_bytes(load_slice(llama_dir, 0, L, dtype=torch.bfloat16, weights=weights))
    layer = gpu.layers[0].feed_forward.w13
    assert isinstance(layer, quant_cuda.CudaQuantLinear)
    assert quant.module_bytes(layer) == quant.held_bytes(weights, (2 * FF, C), torch.bfloat16)
    # what the node budgets and reports per layer (agent: format_layer_bytes at the kernel dtype)
    assert quant.module_bytes(gpu.layers[0]) == format_layer_bytes(read_args(llama_dir), "bfloat16", weights)

    ids = torch.randint(3, V, (24,), generator=torch.Generator().manual_seed(5))
    assert relative_error(_logits(gpu, ids), _logits(cpu, ids)) < 5e-2
    # greedy on the GPU, 24 steps
    cache = gpu.new_cache(64)
    seq = ids[:8].tolist()
    logits = gpu(ids[:8].cuda(), [SeqChunk(cache, 0, 8)])
    for _ in range(24):
        seq.append(int(logits.argmax(-1)[0]))
        logits = gpu(torch.tensor(seq[-1:], device="cuda"), [SeqChunk(cache, cache.length, 1)])
    ref = _logits(cpu, torch.tensor(seq))[7:-1]  # the CPU's logits where each greedy token was chosen
    top2 = ref.topk(2, dim=-1).values
    chosen = torch.tensor(seq[8:])
    agree = ref.argmax(-1) == chosen
    assert bool((agree | (top2[:, 0] - top2[:, 1] < 0.1)).all()), (agree, top2)
    assert agree.float().mean() >= 0.75
