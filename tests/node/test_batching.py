"""One packed forward over several sequences equals each sequence run alone."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import relative_error

from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import SeqChunk


def test_batched_decode_matches_single(tiny_models: dict[str, Path]) -> None:
    model = load_slice(tiny_models["llama3"], 0, 6)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 320, (n,), generator=gen) for n in (5, 17, 1, 40)]

    # Alone: prefill, then 6 decode steps each, recording every step's logits.
    alone: list[list[torch.Tensor]] = []
    for p in prompts:
        cache = model.new_cache(64)
        steps = [model(p, [SeqChunk(cache, 0, len(p))])[0]]
        for _ in range(6):
            tok = steps[-1].argmax().view(1)
            steps.append(model(tok, [SeqChunk(cache, cache.length, 1)])[0])
        alone.append(steps)

    # Together: one packed prefill of all four, then packed decode steps.
    caches = [model.new_cache(64) for _ in prompts]
    logits = model(torch.cat(prompts), [SeqChunk(c, 0, len(p)) for c, p in zip(caches, prompts)])
    together = [[logits[i]] for i in range(len(prompts))]
    for _ in range(6):
        toks = torch.stack([t[-1].argmax() for t in together])
        logits = model(toks, [SeqChunk(c, c.length, 1) for c in caches])
        for i in range(len(prompts)):
            together[i].append(logits[i])

    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            assert relative_error(y, x) < 1e-5


def test_mixed_prefill_and_decode_in_one_forward(tiny_models: dict[str, Path]) -> None:
    """A decode step of one session and a prefill chunk of another share a forward."""
    model = load_slice(tiny_models["qwen2"], 0, 6)
    a, b = torch.arange(3, 23), torch.arange(50, 80)
    ca, cb = model.new_cache(64), model.new_cache(64)
    model(a[:-1], [SeqChunk(ca, 0, 19)])
    mixed = model(torch.cat([a[-1:], b]), [SeqChunk(ca, 19, 1), SeqChunk(cb, 0, 30)])
    alone_a = model(a, [SeqChunk(model.new_cache(64), 0, 20)])
    alone_b = model(b, [SeqChunk(model.new_cache(64), 0, 30)])
    assert relative_error(mixed[0], alone_a[0]) < 1e-5
    assert relative_error(mixed[1], alone_b[0]) < 1e-5


def test_chunked_prefill_matches_whole(tiny_models: dict[str, Path]) -> None:
    model = load_slice(tiny_models["tied"], 0, 6)
    ids = torch.randint(3, 320, (70,), generator=torch.Generator().manual_seed(5))
    whole = model(ids, [SeqChunk(model.new_cache(128), 0, 70)], all_logits=True)
    cache = model.new_cache(128)
    parts = [model(ids[i:i + 16], [SeqChunk(cache, i, len(ids[i:i + 16]))], all_logits=True) for i in range(0, 70, 16)]
    assert relative_error(torch.cat(parts), whole) < 1e-5
