"""Batch invariance of the quantized engine: a position's logits are bitwise the same
however the forward that computed it was shaped (one decode step, a chunk of a prefill,
the whole history replayed after a failover, several drafted tokens, other sessions
beside it). That is what makes a failover's replay and batching exact on the default
path (docs/engine.md, *Batch invariance*)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from swarm_node.engine import quant
from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import ModelSlice, SeqChunk

TOKENS = 56
PROMPT = 19


@pytest.fixture(scope="module")
def smol(default_model: Path) -> ModelSlice:
    """The default model as `swarm-node` runs it by default: GGUF blocks, bfloat16 kernels."""
    model = load_slice(default_model, 0, 30, weights="gguf", kernel_dtype=torch.bfloat16)
    assert model.batch_invariant
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 49152, (TOKENS,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def stepped(smol: ModelSlice, ids: torch.Tensor) -> torch.Tensor:
    """Logits [TOKENS, V] as a generation computes them: the prompt as one prefill, then
    one position per step."""
    cache = smol.new_cache(TOKENS)
    out = [smol(ids[:PROMPT], [SeqChunk(cache, 0, PROMPT)], all_logits=True)]
    out += [smol(ids[p : p + 1], [SeqChunk(cache, p, 1)], all_logits=True) for p in range(PROMPT, TOKENS)]
    return torch.cat(out)


def _chunks(model: ModelSlice, ids: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    cache = model.new_cache(len(ids))
    return torch.cat([model(ids[a:b], [SeqChunk(cache, a, b - a)], all_logits=True) for a, b in itertools.pairwise(bounds)])


def test_a_replay_of_the_history_gives_the_steps_logits_bit_for_bit(smol: ModelSlice, ids: torch.Tensor,
                                                                      stepped: torch.Tensor) -> None:
    """A failover's replay (the history as one prefill), other prefill chunkings and
    drafted blocks of several positions all give what the steps gave."""
    assert torch.equal(_chunks(smol, ids, [0, TOKENS]), stepped)
    assert torch.equal(_chunks(smol, ids, [0, 7, 8, 30, 31, 45, TOKENS]), stepped)
    assert torch.equal(_chunks(smol, ids, [0, PROMPT, *range(PROMPT + 5, TOKENS, 5), TOKENS]), stepped)


def test_batched_sessions_equal_solo(smol: ModelSlice, ids: torch.Tensor, stepped: torch.Tensor) -> None:
    """Three sessions at different positions in one forward (a prefill chunk beside two
    decode steps, then decode steps together) compute what each computes alone."""
    lengths = [10, 23, 31]
    caches = [smol.new_cache(TOKENS) for _ in lengths]
    for cache, n in zip(caches[1:], lengths[1:]):
        smol(ids[:n], [SeqChunk(cache, 0, n)])
    mixed = smol(torch.cat([ids[:10], ids[23:24], ids[31:32]]),
                 [SeqChunk(caches[0], 0, 10), SeqChunk(caches[1], 23, 1), SeqChunk(caches[2], 31, 1)], all_logits=True)
    assert torch.equal(mixed[9], stepped[9]) and torch.equal(mixed[10], stepped[23]) and torch.equal(mixed[11], stepped[31])
    for step in range(11):
        pos = [n + step for n in (10, 24, 32)]
        got = smol(ids[pos], [SeqChunk(c, p, 1) for c, p in zip(caches, pos)])
        assert torch.equal(got, stepped[pos]), step


def test_a_route_of_slices_equals_the_whole(default_model: Path, ids: torch.Tensor, stepped: torch.Tensor) -> None:
    """Three nodes' slices, the hidden states passed on in float32 as on the wire."""
    parts = [load_slice(default_model, a, b, weights="gguf", kernel_dtype=torch.bfloat16) for a, b in ((0, 9), (9, 21), (21, 30))]
    assert all(p.batch_invariant for p in parts)
    caches = [p.new_cache(TOKENS) for p in parts]
    x: torch.Tensor = ids[:PROMPT]
    for part, cache in zip(parts, caches):
        x = part(x, [SeqChunk(cache, 0, PROMPT)], all_logits=True)
    assert torch.equal(x, stepped[:PROMPT])


@pytest.mark.parametrize("bits,spread", [(4, ()), (8, ()), (4, quant.SPREAD), (8, quant.SPREAD)])
def test_the_int4_kernel_computes_each_row_on_its_own(bits: int, spread: tuple[float, ...]) -> None:
    """The premise: PyTorch's int4 kernel gives a row the same bits alone or among others
    (with the rounding spread too: its rows lie R times in one call)."""
    gen = torch.Generator().manual_seed(bits)
    lin = quant.linear_from_float(torch.randn(192, 320, generator=gen) * 0.05, bits, torch.bfloat16, spread=spread)
    x = torch.randn(70, 320, generator=gen)
    alone = torch.cat([lin(x[i : i + 1].clone()) for i in range(len(x))])
    for m in (2, 3, 5, 8, 17, 70):
        assert torch.equal(lin(x[:m]), alone[:m]), m
    assert quant.rows_independent(lin)


def _gguf(path: Path, kinds: dict[str, str]) -> Path:
    """A two-layer GGUF Llama with the given GGUF types per tensor."""
    import gguf
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    c, f, heads, kv, vocab = 256, 512, 4, 2, 256
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(c)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    rng = np.random.default_rng(0)

    def add(name: str, kind: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if kind == "F32":
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, GGMLQuantizationType[kind]), raw_dtype=GGMLQuantizationType[kind])

    add("token_embd.weight", "Q8_0", vocab, c)
    add("output.weight", kinds["output"], vocab, c)
    w.add_tensor("output_norm.weight", np.ones(c, dtype=np.float32))
    shapes = {"attn_q": (c, c), "attn_k": (kv * 64, c), "attn_v": (kv * 64, c), "attn_output": (c, c),
              "ffn_gate": (f, c), "ffn_up": (f, c), "ffn_down": (c, f)}
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(c, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(c, dtype=np.float32))
        for name, (rows, cols) in shapes.items():
            add(f"blk.{i}.{name}.weight", kinds.get(name, "Q4_0"), rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_dense_head_runs_row_by_row_and_dense_layers_lose_the_guarantee(tmp_path: Path) -> None:
    """A float head (as Q4_0 files often have a Q6_K or F16 one) on int4-kernel layers
    runs one row per call, so batches stay exact; a layer matrix the int4 kernel cannot
    run (here F32, dequantized) makes the slice an ordinary, batch-dependent one."""
    head_f32 = load_slice(_gguf(tmp_path / "a.gguf", {"output": "F32"}), 0, 2, weights="gguf", kernel_dtype=torch.bfloat16)
    assert head_f32.batch_invariant and isinstance(head_f32.lm_head, quant.EachRow)
    ids = torch.arange(3, 40)
    cache = head_f32.new_cache(len(ids))
    whole = head_f32(ids, [SeqChunk(cache, 0, len(ids))], all_logits=True)
    cache = head_f32.new_cache(len(ids))
    steps = [head_f32(ids[p : p + 1], [SeqChunk(cache, p, 1)], all_logits=True) for p in range(len(ids))]
    assert torch.equal(whole, torch.cat(steps))
    dense_layer = load_slice(_gguf(tmp_path / "b.gguf", {"output": "Q8_0", "ffn_down": "F32"}), 0, 2,
                             weights="gguf", kernel_dtype=torch.bfloat16)
    assert not dense_layer.batch_invariant
