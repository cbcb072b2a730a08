"""The in-process backend: tiny random models against transformers, then the default model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from swarm_client import ModelUnavailableError, SamplingOptions, SwarmClient
from swarm_client.local import LocalBackend
from swarm_node.engine.loading import load_slice
from swarm_node.engine.sampler import sample
from swarm_proto.wire import SamplingParams

PROMPT = [1, 17, 42, 99, 7, 250, 3]


def _reference_tokens(ref: Any, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    """Tokens from transformers' logits, sampled with our sampler (full forward per step)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = ref(torch.tensor([ids])).logits[0, -1]
            ids.append(sample(logits, params, len(ids), ids).token)
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def tiny(tiny_models: dict[str, Path]) -> tuple[LocalBackend, Any]:
    from helpers import reference_model

    path = tiny_models["llama3"]
    backend = LocalBackend.load(path)
    return backend, reference_model(path)


def test_greedy_matches_transformers(tiny: tuple[LocalBackend, Any]) -> None:
    backend, ref = tiny
    ours = [t.token_id for t in backend.tokens(PROMPT, SamplingParams(), 24)]
    assert ours == _reference_tokens(ref, PROMPT, SamplingParams(), 24)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=11),
    ],
)
def test_sampling_matches_transformers_logits(tiny: tuple[LocalBackend, Any], params: SamplingParams) -> None:
    backend, ref = tiny
    ours = [t.token_id for t in backend.tokens(PROMPT, params, 16)]
    assert ours == _reference_tokens(ref, PROMPT, params, 16)
    assert ours == [t.token_id for t in backend.tokens(PROMPT, params, 16)]  # and again


def test_logprobs_and_limits(tiny: tuple[LocalBackend, Any]) -> None:
    backend, _ = tiny
    toks = list(backend.tokens(PROMPT, SamplingParams(), 5))
    assert len(toks) == 5 and all(t.logprob <= 0 for t in toks)
    assert list(backend.tokens(PROMPT, SamplingParams(), 0)) == []
    assert backend.max_context == 512 and backend.eos_token_ids == (2,)


def test_early_close(tiny: tuple[LocalBackend, Any]) -> None:
    backend, _ = tiny
    gen: Iterator[Any] = backend.tokens(PROMPT, SamplingParams(), 100)
    next(gen)
    gen.close()  # type: ignore[attr-defined]


def test_needs_the_whole_model(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="whole model"):
        LocalBackend(load_slice(tiny_models["tied"], 0, 3))


def test_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="swarm model pull"):
        SwarmClient.local()
    with pytest.raises(ModelUnavailableError):
        LocalBackend.load(tmp_path / "nope.gguf")


# -- the default model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(default_model: Path) -> SwarmClient:
    return SwarmClient.local(default_model)


def test_default_model_greedy_paris(smol: SwarmClient) -> None:
    r = smol.generate("The capital of France is", max_tokens=8)
    assert "Paris" in r.text
    assert r.text.startswith(" Paris")
    assert r.finish_reason == "length" and len(r.token_ids) == 8
    assert r.timing.prompt_tokens == 5 and r.timing.time_to_first_token_s > 0


def test_default_model_matches_transformers_greedy(smol: SwarmClient, default_reference: Any) -> None:
    prompt = smol.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        ref = default_reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    r = smol.generate(prompt, max_tokens=10, ignore_eos=True)
    assert list(r.token_ids) == ref[0, len(prompt) :].tolist()


def test_default_model_stop_string_and_max_tokens(smol: SwarmClient) -> None:
    r = smol.generate("The capital of France is", stop=["."], max_tokens=20)
    assert r.text == " Paris" and r.finish_reason == "stop" and r.stop_reason == "."
    r = smol.generate("The capital of France is", max_tokens=1)
    assert r.text == " Paris" and r.finish_reason == "length"


def test_default_model_chat_stops_at_eos(smol: SwarmClient) -> None:
    r = smol.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}], max_tokens=30)
    assert "Paris" in r.text and r.finish_reason == "stop" and r.token_ids[-1] == 2


def test_default_model_seeded_sampling_is_reproducible(smol: SwarmClient) -> None:
    opts = SamplingOptions(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    a = smol.generate("Once upon a time", opts)
    b = smol.generate("Once upon a time", opts)
    streamed = "".join(e.text for e in smol.stream("Once upon a time", opts))
    assert a.token_ids == b.token_ids and a.text == b.text == streamed and a.seed == 1234
