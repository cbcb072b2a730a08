"""The engine computes what transformers computes, whole or cut into slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from helpers import reference_model, relative_error

from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import ModelSlice, SeqChunk, inv_freq

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
]


def run_chain(slices: Sequence[ModelSlice], ids: torch.Tensor, max_length: int = 256) -> torch.Tensor:
    """All-position logits of `ids` through slices run one after another."""
    x: torch.Tensor = ids
    for s in slices:
        x = s(x, [SeqChunk(s.new_cache(max_length), 0, len(ids))], all_logits=True)
    return x


def greedy(model: ModelSlice, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation, ending at EOS as transformers' generate does."""
    cache = model.new_cache(len(ids) + new_tokens)
    logits = model(torch.tensor(ids), [SeqChunk(cache, 0, len(ids))])
    out: list[int] = []
    for _ in range(new_tokens):
        tok = int(logits[-1].argmax())
        out.append(tok)
        if tok in model.args.eos_token_ids:
            break
        logits = model(torch.tensor([tok]), [SeqChunk(cache, cache.length, 1)])
    return out


def reference_greedy(ref: Any, ids: list[int], new_tokens: int) -> list[int]:
    out = ref.generate(
        torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def smol(default_model: Path) -> ModelSlice:
    return load_slice(default_model, 0, 30)


def test_default_model_logits_match_transformers(smol: ModelSlice, default_reference: Any, default_tokenizer: Any) -> None:
    text = "The swarm hosts the model's layers on many small machines. " * 8
    ids = default_tokenizer(text, return_tensors="pt").input_ids[0, :64]
    assert len(ids) == 64
    with torch.no_grad():
        ref = default_reference(ids[None]).logits[0]
    ours = run_chain([smol], ids)
    assert relative_error(ours, ref) < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS + ["chat"])
def test_default_model_greedy_tokens_match_transformers(
    prompt: str, smol: ModelSlice, default_reference: Any, default_tokenizer: Any
) -> None:
    if prompt == "chat":
        ids = default_tokenizer.apply_chat_template(
            [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = default_tokenizer(prompt).input_ids
    assert greedy(smol, ids, 32) == reference_greedy(default_reference, ids, 32)


def test_default_model_slices_compose(smol: ModelSlice, default_model: Path, default_tokenizer: Any) -> None:
    ids = default_tokenizer("Slices of a model, one after another, are the model.", return_tensors="pt").input_ids[0]
    parts = [load_slice(default_model, a, b) for a, b in [(0, 10), (10, 20), (20, 30)]]
    assert relative_error(run_chain(parts, ids), run_chain([smol], ids)) < 1e-6


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "tied", "linear"])
def test_tiny_models_match_transformers(kind: str, tiny_models: dict[str, Path]) -> None:
    path = tiny_models[kind]
    ref = reference_model(path)
    ids = torch.randint(3, ref.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    model = load_slice(path, 0, ref.config.num_hidden_layers)
    assert relative_error(run_chain([model], ids), expected) < 1e-4
    prompt = ids[:20].tolist()
    assert greedy(model, prompt, 24) == reference_greedy(ref, prompt, 24)


def test_rope_scaling_is_applied(tiny_models: dict[str, Path]) -> None:
    """The llama3 model's long-position logits depend on its rope scaling (so the match above means something)."""
    from dataclasses import replace

    model = load_slice(tiny_models["llama3"], 0, 6)
    ids = torch.randint(3, 320, (150,), generator=torch.Generator().manual_seed(2))
    scaled = run_chain([model], ids)
    model.rotary.inv_freq = inv_freq(replace(model.args, rope_scaling=None))
    assert relative_error(run_chain([model], ids), scaled) > 1e-3


@pytest.mark.parametrize("cuts", [(1,), (3,), (5,), (2, 4), (1, 2, 3, 4, 5)])
def test_any_cut_points_compose(cuts: tuple[int, ...], tiny_models: dict[str, Path]) -> None:
    path = tiny_models["tied"]
    bounds = [0, *cuts, 6]
    parts = [load_slice(path, a, b) for a, b in zip(bounds, bounds[1:])]
    whole = load_slice(path, 0, 6)
    ids = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(3))
    assert relative_error(run_chain(parts, ids), run_chain([whole], ids)) < 1e-6


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    from helpers import make_tiny_model

    sharded = make_tiny_model(tmp_path, "qwen2", shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ref = reference_model(sharded)
    ids = torch.arange(3, 40)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    parts = [load_slice(sharded, 0, 2), load_slice(sharded, 2, 6)]
    assert relative_error(run_chain(parts, ids), expected) < 1e-4
