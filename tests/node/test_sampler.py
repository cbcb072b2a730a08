from __future__ import annotations

import math

import pytest
import torch

from swarm_node.engine.sampler import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    sample,
    uniform,
)
from swarm_proto.wire import SamplingParams

hf = pytest.importorskip("transformers.generation.logits_process")


def _logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=0.0)
    assert SamplingParams().greedy


def test_greedy_is_argmax() -> None:
    logits = _logits(5, 100)
    for row in logits:
        out = sample(row, SamplingParams(), position=3)
        assert out.token == int(row.argmax())
        assert out.logprob == pytest.approx(float(torch.log_softmax(row, -1).max()), abs=1e-6)
    batch = sample(logits, SamplingParams(), position=[0, 1, 2, 3, 4])
    assert torch.equal(batch.tokens, logits.argmax(-1))
    assert batch.tokens.dtype == torch.int64 and batch.logprobs.shape == (5,)


def test_greedy_ignores_seed_top_k_top_p() -> None:
    row = _logits(1, 50)[0]
    for params in (SamplingParams(seed=7), SamplingParams(top_k=3, top_p=0.5, seed=9)):
        assert sample(row, params, position=11).token == int(row.argmax())


def test_uniform_is_pure_and_spread() -> None:
    assert uniform(1, 2) == uniform(1, 2)
    assert uniform(1, 2) != uniform(1, 3) != uniform(2, 2)
    draws = [uniform(123, p) for p in range(20000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01
    assert uniform(-1, 5) == uniform((1 << 64) - 1, 5)


def test_same_seed_and_position_same_token_whatever_the_batch() -> None:
    vocab = 1000
    target = _logits(1, vocab, seed=1)[0] / 3  # a flat-ish distribution, many candidates
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, seed=42)
    alone = [sample(target, params, position=p).token for p in range(40)]
    assert len(set(alone)) > 10  # it does sample
    for trial in range(3):
        others = _logits(7, vocab, seed=100 + trial)
        other_params = [SamplingParams(temperature=0.5 + i / 10, top_k=i, seed=i) for i in range(7)]
        for p in range(40):
            rows = torch.cat([others[:trial], target.unsqueeze(0), others[trial:]])
            prm = other_params[:trial] + [params] + other_params[trial:]
            pos = list(range(100, 100 + trial)) + [p] + list(range(7 - trial))
            out = sample(rows, prm, position=pos)
            assert int(out.tokens[trial]) == alone[p]


def test_different_seed_or_position_changes_draws() -> None:
    row = torch.zeros(1000)
    a = [sample(row, SamplingParams(temperature=1.0, seed=1), position=p).token for p in range(20)]
    b = [sample(row, SamplingParams(temperature=1.0, seed=2), position=p).token for p in range(20)]
    assert a != b
    assert len(set(a)) > 15


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    expected = torch.softmax(logits / temperature, -1)
    n = 20000
    rows = logits.expand(n, 4)
    out = sample(rows, SamplingParams(temperature=temperature, seed=5), position=list(range(n)))
    freq = torch.bincount(out.tokens, minlength=4).double() / n
    for f, e in zip(freq.tolist(), expected.tolist()):
        assert abs(f - e) < 4 * math.sqrt(e * (1 - e) / n) + 1e-3


def test_sampling_never_picks_masked_token() -> None:
    logits = _logits(64, 300, seed=3)
    out = sample(logits, SamplingParams(temperature=1.5, top_k=5, seed=3), position=list(range(64)))
    top5 = logits.topk(5, dim=-1).indices
    assert all(int(t) in top5[i].tolist() for i, t in enumerate(out.tokens))
    out = sample(logits, SamplingParams(temperature=1.0, top_p=0.3, seed=3), position=list(range(64)))
    kept = torch.isfinite(apply_top_p(logits, 0.3))
    assert all(bool(kept[i, t]) for i, t in enumerate(out.tokens.tolist()))


def test_logprob_is_raw_model_logprob() -> None:
    logits = _logits(4, 50, seed=4)
    out = sample(logits, SamplingParams(temperature=0.7, top_k=3, seed=1), position=[0, 1, 2, 3])
    ref = torch.log_softmax(logits, -1).gather(-1, out.tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out.logprobs, ref)


@pytest.mark.parametrize("k", [1, 5, 50, 200])
def test_top_k_matches_hf(k: int) -> None:
    logits = _logits(6, 128, seed=k)
    ours = apply_top_k(logits, k)
    theirs = hf.TopKLogitsWarper(top_k=k)(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_top_k_per_row() -> None:
    logits = _logits(3, 64, seed=8)
    ours = apply_top_k(logits, torch.tensor([0, 3, 10]))
    assert torch.equal(ours[0], logits[0])
    for row, k in ((1, 3), (2, 10)):
        ref = hf.TopKLogitsWarper(top_k=k)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone())
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(ref[0]))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_matches_hf(p: float) -> None:
    logits = _logits(6, 256, seed=int(p * 1000))
    ours = apply_top_p(logits, p)
    theirs = hf.TopPLogitsWarper(top_p=p)(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


def test_top_p_per_row() -> None:
    logits = _logits(3, 64, seed=9)
    ours = apply_top_p(logits, torch.tensor([1.0, 0.5, 0.9]))
    assert torch.equal(ours[0], logits[0])
    for row, p in ((1, 0.5), (2, 0.9)):
        ref = hf.TopPLogitsWarper(top_p=p)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone())
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(ref[0]))


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty: float) -> None:
    logits = _logits(3, 40, seed=2)
    histories = [[1, 5, 5, 7, 39], [0], [2, 3, 4, 2, 3]]
    ours = apply_repetition_penalty(logits, histories, penalty)
    proc = hf.RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for row, hist in enumerate(histories):
        ref = proc(torch.tensor([hist]), logits[row : row + 1].clone())
        assert torch.allclose(ours[row], ref[0])


def test_full_pipeline_matches_hf_warpers() -> None:
    """The distribution we draw from is HF's processors applied in HF's order."""
    logits = _logits(1, 200, seed=11)
    history = [3, 4, 5, 100, 150]
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=1)
    ids = torch.tensor([history])
    ref = logits.clone()
    for proc in (
        hf.RepetitionPenaltyLogitsProcessor(1.2),
        hf.TemperatureLogitsWarper(0.7),
        hf.TopKLogitsWarper(40),
        hf.TopPLogitsWarper(0.9),
    ):
        ref = proc(ids, ref)
    allowed = set(torch.nonzero(torch.isfinite(ref[0])).flatten().tolist())
    probs = torch.softmax(ref[0].double(), -1)
    n = 6000
    out = sample(logits.expand(n, 200), params, position=list(range(n)), history=[history] * n)
    assert set(out.tokens.tolist()) <= allowed
    freq = torch.bincount(out.tokens, minlength=200).double() / n
    assert (freq - probs).abs().max() < 0.03


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([0.0, 2.0, 1.9, -1.0])
    assert sample(logits, SamplingParams(), position=4, history=[1]).token == 1
    assert sample(logits, SamplingParams(repetition_penalty=1.5), position=4, history=[1]).token == 2


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 3, 4), SamplingParams(), position=[0, 1])
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 4), SamplingParams(), position=[0])
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 4), [SamplingParams()], position=[0, 1])
    with pytest.raises(TypeError):
        sample(torch.zeros(4), SamplingParams(), position=[0])  # type: ignore[call-overload]


def test_half_precision_logits() -> None:
    logits = _logits(4, 300, seed=12)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=2)
    a = sample(logits.half(), params, position=[0, 1, 2, 3])
    assert a.tokens.dtype == torch.int64 and a.logprobs.dtype == torch.float32
    assert torch.equal(sample(logits.half(), params, position=[0, 1, 2, 3]).tokens, a.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_match_cpu() -> None:
    """A tail on a GPU picks the same tokens as one on a CPU."""
    logits = _logits(32, 4096, seed=13)
    params = [SamplingParams(temperature=0.5 + i % 4 / 4, top_k=i % 3 * 50, top_p=0.9, seed=i) for i in range(32)]
    histories = [[i, i + 1, 7] for i in range(32)]
    cpu = sample(logits, params, position=list(range(32)), history=histories)
    gpu = sample(logits.cuda(), params, position=list(range(32)), history=histories)
    assert gpu.tokens.device.type == "cuda"
    assert torch.equal(cpu.tokens, gpu.tokens.cpu())
    assert torch.allclose(cpu.logprobs, gpu.logprobs.cpu(), atol=1e-5)
