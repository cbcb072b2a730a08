"""Honest spread of commitments: nodes that compute the same span differently (float32
or bfloat16, the GGUF blocks' quantized kernel or dequantized weights, prefill chunks of
any size, batched with another session or alone, decode one position at a time) are
never flagged, over more than 1,000 compared positions of the default model's output
after all 30 layers (where the spread is largest); the test liar's slight perturbation
is flagged on every position it touches. docs/verification.md has the figures.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import ModelSlice, SeqChunk
from swarm_node.verify import Lie, commit_rows
from swarm_proto.commit import DEFAULT_K, Commit, Tolerance, compare_at, compare_row

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N = 160


def _prefill(model: ModelSlice, tokens: torch.Tensor, chunk: int, other: torch.Tensor | None = None) -> torch.Tensor:
    """Output hidden states [N, C] of ``tokens``, in chunks, optionally packed with
    another session's chunks in the same forwards (a batch mix)."""
    cache = model.new_cache(len(tokens))
    cache2 = model.new_cache(len(tokens)) if other is not None else None
    outs = []
    for p in range(0, len(tokens), chunk):
        n = min(chunk, len(tokens) - p)
        if other is None or cache2 is None:
            h, _ = model.run(tokens[p : p + n], [SeqChunk(cache, p, n)])
        else:
            h, _ = model.run(torch.cat([other[p : p + n], tokens[p : p + n]]), [SeqChunk(cache2, p, n), SeqChunk(cache, p, n)])
            h = h[n:]
        outs.append(h.float())
    return torch.cat(outs)


def _commit(hidden: torch.Tensor) -> Commit:
    idx, values = commit_rows(hidden, DEFAULT_K)
    return Commit("n", "a", 0, 30, 0, DEFAULT_K, tuple(idx), tuple(values))


def _worst(a: Commit, b: Commit) -> tuple[float, float]:
    errs, overlaps = zip(*(compare_row(a.row(p), b.row(p)) for p in range(a.positions)))  # type: ignore[arg-type]
    return max(errs), min(overlaps)


def test_honest_nodes_are_never_flagged(default_model: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49152, (N,), generator=gen)
    other = torch.randint(0, 49152, (N,), generator=gen)
    f32 = load_slice(default_model, 0, 30, dtype=torch.float32)
    runs = {"float32 prefill 80": _prefill(f32, tokens, 80)}
    decoded = _prefill(f32, tokens[:32], 1)  # one position at a time, alone
    del f32
    runs["bfloat16 batched with another session, chunks of 32"] = _prefill(
        load_slice(default_model, 0, 30, dtype=torch.bfloat16), tokens, 32, other
    )
    q = load_slice(default_model, 0, 30, dtype=torch.bfloat16, weights="gguf")
    runs["GGUF kernel bfloat16 prefill 160"] = _prefill(q, tokens, 160)
    runs["GGUF kernel bfloat16 batched, chunks of 40"] = _prefill(q, tokens, 40, other)
    del q
    commits = {name: _commit(h) for name, h in runs.items()}
    tol = Tolerance()
    compared = 0
    for (na, a), (nb, b) in itertools.combinations(commits.items(), 2):
        err, overlap = _worst(a, b)
        assert compare_at(a, b, range(N), tol) is None, f"{na} vs {nb}: worst {err:.3g}, overlap {overlap:.2f}"
        compared += N
    dec = _commit(decoded)
    for name, c in commits.items():
        assert compare_at(dec, c, range(32), tol) is None, f"decode vs {name}"
        compared += 32
    assert compared >= 1000

    # The test liar's slight lie (every entry x1.3) is flagged wherever it lies.
    lie = Lie("slight", 4)
    lied = _commit(lie.perturb(runs["float32 prefill 80"], 0))
    flagged = [p for p in range(N) if compare_at(lied, commits["bfloat16 batched with another session, chunks of 32"], [p], tol) is not None]
    assert flagged == [p for p in range(N) if lie.hits(p)]
