"""Continuous batching, without the network: merging rules, isolation, sampling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import ModelSlice, SeqChunk
from swarm_node.engine.sampler import sample
from swarm_node.errors import PositionError
from swarm_node.scheduler import Job, SampleRequest, Scheduler
from swarm_proto.wire import SamplingParams

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def whole(tiny_models: dict[str, Path]) -> ModelSlice:
    return load_slice(tiny_models["llama3"], 0, 6)


@pytest.fixture
async def scheduler(whole: ModelSlice) -> AsyncIterator[Scheduler]:
    s = Scheduler(whole, max_batch_tokens=64)
    s.start()
    yield s
    await s.stop()


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


async def test_waiting_jobs_share_one_forward(scheduler: Scheduler, whole: ModelSlice) -> None:
    prompts = [_prompt(n, i) for i, n in enumerate((3, 9, 1, 12))]
    caches = [whole.new_cache(32) for _ in prompts]
    params = SamplingParams(temperature=0.8, seed=5)
    jobs = [
        Job(c, 0, p, sample=SampleRequest(params, len(p), p.tolist()), return_logits=True)
        for c, p in zip(caches, prompts)
    ]
    outs = await asyncio.gather(*(scheduler.submit(j) for j in jobs))
    assert scheduler.stats.batches == 1 and scheduler.stats.max_batch == 4
    assert scheduler.stats.tokens == 25
    for p, out in zip(prompts, outs):
        ref = whole(p, [SeqChunk(whole.new_cache(32), 0, len(p))], all_logits=True)
        assert out.logits is not None and out.logits.shape == (len(p), 320)
        torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
        assert out.token == sample(ref[-1], params, len(p), p.tolist()).token
    assert all(c.length == len(p) for c, p in zip(caches, prompts))


async def test_one_chunk_per_session_per_forward(scheduler: Scheduler, whole: ModelSlice) -> None:
    cache = whole.new_cache(32)
    p = _prompt(10, 0)
    first = Job(cache, 0, p[:6])
    second = Job(cache, 6, p[6:])  # needs the cache the first chunk writes
    a, b = await asyncio.gather(scheduler.submit(first), scheduler.submit(second))
    assert scheduler.stats.batches == 2 and scheduler.stats.max_batch == 1
    assert cache.length == 10 and a.logits is None and b.token is None


async def test_token_budget_splits_batches(scheduler: Scheduler, whole: ModelSlice) -> None:
    jobs = [Job(whole.new_cache(64), 0, _prompt(40, i)) for i in range(3)]  # 40 + 40 > 64
    await asyncio.gather(*(scheduler.submit(j) for j in jobs))
    assert scheduler.stats.batches == 3
    # A job bigger than the budget still runs, alone.
    await scheduler.submit(Job(whole.new_cache(128), 0, _prompt(100, 9)))
    assert scheduler.stats.batches == 4


async def test_a_faulty_job_fails_alone(scheduler: Scheduler, whole: ModelSlice) -> None:
    good = Job(whole.new_cache(32), 0, _prompt(5, 1))
    bad = Job(whole.new_cache(32), 4, _prompt(2, 2))  # a gap: nothing cached before position 4
    results = await asyncio.gather(scheduler.submit(good), scheduler.submit(bad), return_exceptions=True)
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], PositionError)
    assert good.cache.length == 5 and bad.cache.length == 0


async def test_cancelled_job_is_dropped(scheduler: Scheduler, whole: ModelSlice) -> None:
    blocker = asyncio.ensure_future(scheduler.submit(Job(whole.new_cache(64), 0, _prompt(60, 0))))
    await asyncio.sleep(0)
    cache = whole.new_cache(8)
    waiting = asyncio.ensure_future(scheduler.submit(Job(cache, 0, _prompt(3, 1))))
    await asyncio.sleep(0)
    waiting.cancel()
    await blocker
    assert await scheduler.drain(5.0)
    assert cache.length == 0 and scheduler.queued == 0


async def test_hidden_states_out_of_a_middle_slice(tiny_models: dict[str, Path], whole: ModelSlice) -> None:
    head, middle = load_slice(tiny_models["llama3"], 0, 2), load_slice(tiny_models["llama3"], 2, 4)
    s = Scheduler(middle)
    s.start()
    try:
        p = _prompt(7, 3)
        h = head(p, [SeqChunk(head.new_cache(16), 0, 7)])
        out = await s.submit(Job(middle.new_cache(16), 0, h))
        assert out.hidden is not None and out.hidden.shape == (7, 64)
        torch.testing.assert_close(out.hidden, middle(h, [SeqChunk(middle.new_cache(16), 0, 7)]))
    finally:
        await s.stop()
