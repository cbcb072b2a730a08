"""Shared test helpers: tiny random-weight models built on the fly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TINY_KINDS = ("llama3", "qwen2", "tied", "linear")


def tiny_config(kind: str) -> Any:
    """A transformers config for a small model of the given flavour."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama3":
        # GQA, Llama 3 rope scaling, untied head
        return LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_theta=50000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0)
    if kind == "tied":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "linear":
        return LlamaConfig(
            **common, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 4.0}
        )
    raise ValueError(kind)


def make_tiny_model(directory: Path, kind: str = "llama3", *, seed: int = 0, shard_size: str | None = None) -> Path:
    """Save a random-weight model of `kind` as a Hugging Face folder and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    # Random init is small; widen it so that layers matter and errors show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0.0, 0.08 if p.dim() > 1 else 0.2).add_(1.0 if p.dim() == 1 else 0.0)
    out = Path(directory) / f"tiny-{kind}"
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def reference_model(path: Path, **kwargs: Any) -> Any:
    """The transformers model that referees correctness."""
    from transformers import AutoModelForCausalLM

    if path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


BYTE_BOS, BYTE_EOS, BYTE_OFFSET = 1, 2, 3


class ByteHF:
    """A byte-level stand-in for a Hugging Face tokenizer: token = byte + 3."""

    bos_token_id = BYTE_BOS
    eos_token_id = BYTE_EOS
    chat_template = "fake"

    def __len__(self) -> int:
        return 256 + BYTE_OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


class Oracle:
    """Drafts the known continuation, wrong at every ``every``-th drafted position, so
    steps see full acceptance, partial acceptance and a first draft refused."""

    cheap = True

    def __init__(self, runs: dict[tuple[int, ...], list[int]], every: int = 3, vocab: int = 320) -> None:
        self.runs = runs
        self.vocab = vocab
        self.every = every
        self.calls = 0

    def start(self, max_length: int) -> _OracleSession:
        return _OracleSession(self)


class _OracleSession:
    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle

    async def propose(self, history: Sequence[int], k: int) -> list[int]:
        o = self.oracle
        for prompt, out in o.runs.items():
            if tuple(history[: len(prompt)]) == prompt:
                full = [*prompt, *out]
                if list(history) == full[: len(history)]:
                    drafts = full[len(history) : len(history) + k]
                    o.calls += 1
                    wrong = o.calls % o.every
                    if wrong < len(drafts):
                        drafts[wrong] = (drafts[wrong] + 1) % o.vocab
                    return drafts
        return []

    def close(self) -> None:
        return None
