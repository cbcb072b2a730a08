from __future__ import annotations

import pytest

from swarm_client import InvalidRequestError, SamplingOptions
from swarm_proto.wire import SamplingParams


def test_defaults_are_greedy() -> None:
    o = SamplingOptions()
    assert o.temperature == 0.0 and o.max_tokens == 256 and o.seed is None and o.stop == ()
    assert o.with_seed().to_sampling_params().greedy


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"stop": [""]},
    ],
)
def test_validation(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingOptions(**bad)  # type: ignore[arg-type]


def test_stop_normalisation() -> None:
    assert SamplingOptions(stop="\n").stop == ("\n",)  # type: ignore[arg-type]
    assert SamplingOptions(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert SamplingOptions(stop_token_ids=[5]).stop_token_ids == (5,)  # type: ignore[arg-type]
    assert hash(SamplingOptions(stop=["a"])) == hash(SamplingOptions(stop=("a",)))  # type: ignore[arg-type]


def test_merged_and_from_kwargs() -> None:
    o = SamplingOptions(temperature=0.5).merged(top_k=3, seed=None, max_tokens=None)
    assert o == SamplingOptions(temperature=0.5, top_k=3)
    with pytest.raises(InvalidRequestError, match="unknown sampling option"):
        SamplingOptions().merged(temp=1.0)
    with pytest.raises(InvalidRequestError, match="unknown sampling option"):
        SamplingOptions.from_kwargs(topk=1)
    assert SamplingOptions.from_kwargs(top_p=0.5).top_p == 0.5


def test_seed() -> None:
    assert SamplingOptions(seed=7).with_seed().seed == 7
    seeds = {SamplingOptions().with_seed().seed for _ in range(20)}
    assert len(seeds) == 20 and all(s is not None and 0 <= s < 2**63 for s in seeds)
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingOptions().to_sampling_params()
    p = SamplingOptions(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=5).to_sampling_params()
    assert p == SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=5)


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, swarm_client; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env())
    assert out.stdout.split() == ["False", "False"]


def _env() -> dict[str, str]:
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    paths = [str(root / p) for p in ("proto", "node", "client", "coordinator")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
