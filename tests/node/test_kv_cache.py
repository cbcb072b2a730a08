"""The KV pool: slots that keep their contents while the pool grows, freed with
their caches, and batched decode over slots in any order."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from helpers import relative_error

from swarm_node.engine import kv_cache
from swarm_node.engine.kv_cache import KVCache, KVPool
from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import SeqChunk


def _fill(cache: KVCache, value: float, n: int) -> None:
    k = torch.full((n, 2, 4), value)
    for layer in range(cache.k.shape[0]):
        cache.write(layer, 0, k, -k)
    cache.length = n


def test_growing_pool_keeps_every_cache_contents() -> None:
    pool = KVPool(3, 2, 4)
    a = pool.allocate(10)
    _fill(a, 1.0, 10)
    b, c = pool.allocate(10), pool.allocate(10)  # 1 -> 2 -> 4 slots
    _fill(b, 2.0, 5)
    d = pool.allocate(300)  # longer slots: a reallocation
    assert pool.slots == 4 and pool.slot_length >= 300
    assert {x.slot for x in (a, b, c, d)} == {0, 1, 2, 3}
    assert torch.equal(a.k, torch.full((3, 10, 2, 4), 1.0)) and torch.equal(a.v, -a.k)
    assert torch.equal(b.k[:, :5], torch.full((3, 5, 2, 4), 2.0))
    assert a.k.data_ptr() == pool.k[:, a.slot].data_ptr()  # a view of the new tensors
    assert a.max_length == 10 and d.max_length == 300 and d.k.shape[1] == 300


def test_slots_are_freed_with_their_caches_and_reused() -> None:
    pool = KVPool(2, 1, 4)
    caches = [pool.allocate(8) for _ in range(3)]
    freed = caches.pop(1).slot
    gc.collect()
    assert pool.live == 2
    assert pool.allocate(8).slot == freed  # the new cache is dropped at once too
    caches.clear()
    gc.collect()
    assert pool.live == 0 and pool.slots == 0  # the memory went with the last cache


def test_batched_decode_over_scattered_slots_matches_single(tiny_models: dict[str, Path]) -> None:
    """Sequences whose slots are not consecutive (a freed slot reused, the batch in
    another order) take the gathered path; each still decodes as it would alone."""
    model = load_slice(tiny_models["llama3"], 0, 6)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=gen) for n in (7, 3, 12)]

    def decode(caches: list[KVCache], steps: int = 4) -> list[torch.Tensor]:
        logits = model(torch.cat(prompts), [SeqChunk(c, 0, len(p)) for c, p in zip(caches, prompts)])
        out = [logits]
        for _ in range(steps):
            logits = model(logits.argmax(-1), [SeqChunk(c, c.length, 1) for c in caches])
            out.append(logits)
        return out

    alone: list[torch.Tensor] = []
    for p in prompts:
        cache = model.new_cache(32)
        rows = [model(p, [SeqChunk(cache, 0, len(p))])]
        for _ in range(4):
            rows.append(model(rows[-1].argmax(-1), [SeqChunk(cache, cache.length, 1)]))
        alone.append(torch.cat(rows))

    spare = [model.new_cache(32) for _ in range(4)]
    del spare[1], spare[2]  # free two slots in the middle
    gc.collect()
    caches = [model.new_cache(32), model.new_cache(32), model.new_cache(48)]
    caches = caches[::-1]
    prompts.reverse()
    alone.reverse()
    assert [c.slot for c in caches] != sorted(c.slot for c in caches)
    together = torch.stack(decode(caches))  # [steps + 1, 3, V]
    for i in range(3):
        assert relative_error(together[:, i], alone[i]) < 1e-5


def test_fresh_pool_memory_never_reaches_a_result(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """New pool memory is left uninitialized (NaN here): a batch reads past shorter
    sequences' ends (masked), so every slot must be clean before it is read."""
    monkeypatch.setattr(
        kv_cache, "_uninitialized", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    model = load_slice(tiny_models["llama3"], 0, 6)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=gen) for n in (3, 9, 80)]

    def run(caches: list[KVCache], ps: list[torch.Tensor]) -> torch.Tensor:
        logits = model(torch.cat(ps), [SeqChunk(c, 0, len(p)) for c, p in zip(caches, ps)])
        rows = [logits]
        for _ in range(4):
            logits = model(logits.argmax(-1), [SeqChunk(c, c.length, 1) for c in caches])
            rows.append(logits)
        return torch.stack(rows)  # [steps + 1, B, V]

    alone = [run([model.new_cache(100)], [p])[:, 0] for p in prompts]
    # The third cache lengthens every slot (the first two get new positions, which the
    # batch reads, masked, once the third sequence is longer than the old slots).
    caches = [model.new_cache(16), model.new_cache(32), model.new_cache(200)]
    together = run(caches, prompts)
    assert torch.isfinite(together).all()
    for i in range(3):
        assert relative_error(together[:, i], alone[i]) < 1e-5
