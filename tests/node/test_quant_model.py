"""A tiny GGUF Llama whose matrices mix every kept type and one that is not: the
quantized slice computes what the dequantized float32 slice computes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from swarm_node.engine import quant
from swarm_node.engine.loading import load_slice, model_bytes
from swarm_node.engine.model import SeqChunk

C, F, H, KV, V, L = 256, 512, 4, 2, 256, 2
D = C // H
# bytes per 256-value block and where its fp16 scales lie, for random K-quant blocks
_K = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,)), "Q2_K": (84, (80, 82))}
TYPES = {  # GGUF tensor -> type
    "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q8_0",
    "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q2_K",
}


def _blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if kind in _K:
        size, scales = _K[kind]
        raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
        for at in scales:
            raw[..., at : at + 2] = rng.uniform(2e-4, 1e-3, size=(rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(rows, -1)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return quantize(w, GGMLQuantizationType[kind])


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gguf
    from gguf import GGMLQuantizationType

    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    rng = np.random.default_rng(0)

    def add(name: str, kind: str, rows: int, cols: int) -> None:
        w.add_tensor(name, _blocks(kind, rows, cols, rng), raw_dtype=GGMLQuantizationType[kind])

    add("token_embd.weight", "Q8_0", V, C)  # tied: no output.weight
    w.add_tensor("output_norm.weight", np.ones(C, dtype=np.float32))
    shapes = {"attn_q": (C, C), "attn_k": (KV * D, C), "attn_v": (KV * D, C), "attn_output": (C, C),
              "ffn_gate": (F, C), "ffn_up": (F, C), "ffn_down": (C, F)}
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(C)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(C)).astype(np.float32))
        for name, (rows, cols) in shapes.items():
            add(f"blk.{i}.{name}.weight", TYPES[name], rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, [SeqChunk(model.new_cache(len(ids)), 0, len(ids))], all_logits=True)


def test_mixed_types_match_the_dequantized_model(mixed_gguf: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = torch.arange(5, 45)
    exact = load_slice(mixed_gguf, 0, L)  # float32, dequantized
    with caplog.at_level(logging.WARNING):
        q32 = load_slice(mixed_gguf, 0, L, weights="gguf")  # float32 kernels
    warned = [r.getMessage() for r in caplog.records if "not kept quantized" in r.getMessage()]
    assert len(warned) == 1 and "Q2_K" in warned[0]  # once, naming the type
    ref = _logits(exact, ids)
    rel = float((_logits(q32, ids) - ref).norm() / ref.norm())
    assert rel < 1e-3
    # the default, bfloat16 kernels around float32 activations: no further from the exact
    # logits than the dequantized weights run in bfloat16 (random weights this large
    # amplify bfloat16's rounding to a few percent: each product alone is within 4e-3)
    qbf = load_slice(mixed_gguf, 0, L, weights="gguf", kernel_dtype=torch.bfloat16)
    dense_bf16 = load_slice(mixed_gguf, 0, L, dtype=torch.bfloat16)
    err_q = float((_logits(qbf, ids) - ref).norm() / ref.norm())
    err_bf16 = float((_logits(dense_bf16, ids).float() - ref).norm() / ref.norm())
    assert err_q <= 1.5 * err_bf16, (err_q, err_bf16)
    # one storage for the tied embedding and head
    assert isinstance(qbf.embed_tokens, quant.QuantEmbedding) and qbf.embed_tokens.table is qbf.lm_head
    assert model_bytes(qbf) < 0.45 * model_bytes(exact)


def test_quantized_slices_compose(mixed_gguf: Path) -> None:
    ids = torch.arange(7, 30)
    whole = load_slice(mixed_gguf, 0, L, weights="gguf", kernel_dtype=torch.bfloat16)
    head = load_slice(mixed_gguf, 0, 1, weights="gguf", kernel_dtype=torch.bfloat16)
    tail = load_slice(mixed_gguf, 1, L, weights="gguf", kernel_dtype=torch.bfloat16)
    hidden = head(ids, [SeqChunk(head.new_cache(len(ids)), 0, len(ids))])
    got = tail(hidden, [SeqChunk(tail.new_cache(len(ids)), 0, len(ids))], all_logits=True)
    assert torch.equal(got, _logits(whole, ids))


def test_quantize_flag_applies_to_float_checkpoints_only(mixed_gguf: Path, tiny_models: dict[str, Path]) -> None:
    from swarm_proto.weight_format import resolve

    assert resolve("auto", mixed_gguf, "auto", "cpu") == "gguf"
    assert resolve("auto", mixed_gguf, "float32", "cpu") == "float"
    assert resolve("auto", mixed_gguf, "auto", "cuda") == "float"
    assert resolve("int4", tiny_models["llama3"], "auto", "cpu") == "int4"
    with pytest.raises(ValueError, match="float checkpoints"):
        resolve("int8", mixed_gguf, "auto", "cpu")
