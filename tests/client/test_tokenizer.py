"""The client tokenizer against transformers on the default model (SmolLM2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swarm_client import ModelUnavailableError, TokenizerError
from swarm_client import tokenizer as tokmod
from swarm_client.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "héllo wörld — naïve café",
    "日本語のテキストと中文",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|> looks special",
]


@pytest.fixture(scope="module")
def tok(default_model: Path) -> Tokenizer:
    return load_tokenizer(default_model)


def test_loaded_once_per_source(default_model: Path, tok: Tokenizer) -> None:
    assert load_tokenizer(default_model) is tok
    assert load_tokenizer(str(default_model)) is tok
    assert load_tokenizer("smollm2-135m") is tok
    assert load_tokenizer(None) is tok
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.vocab_size == 49152


def test_matches_transformers(tok: Tokenizer, default_tokenizer: Any) -> None:
    for text in TEXTS:
        assert tok.encode(text) == default_tokenizer.encode(text)
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_bos_control(tok: Tokenizer) -> None:
    plain = tok.encode("hi")
    assert plain[0] != 1  # SmolLM2 adds no BOS of its own
    assert tok.encode("hi", add_bos=True) == [1, *plain]
    assert tok.encode("hi", add_bos=False) == plain


def test_decode_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS[:-1]:  # the last one spells a special token, which decode skips
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([1, *tok.encode("x"), 2]) == "x"
    assert tok.decode([1, 2], skip_special_tokens=False) == "<|im_start|><|im_end|>"


def test_chat_template(tok: Tokenizer, default_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat(messages)
    ref = default_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(ref)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text


def test_incremental_detokenizer_matches_full_decode(tok: Tokenizer) -> None:
    prompt = tok.encode("Say something:")
    for text in TEXTS[:-1]:
        ids = tok.encode(text)
        detok = tok.detokenizer(prompt)
        pieces = [detok.push(i) for i in ids]
        pieces.append(detok.flush())
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_holds_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1  # byte-level pieces
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🎉"
    assert detok.flush() == ""


def test_incremental_detokenizer_skips_special_tokens(tok: Tokenizer) -> None:
    detok = tok.detokenizer()
    out = "".join(detok.push(i) for i in [1, *tok.encode("Hello there"), 2])
    assert out == "Hello there"


def test_disk_cache(default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    monkeypatch.setattr(tokmod, "_loaded", {})
    first = load_tokenizer(default_model)
    saved = list((tmp_path / "tokenizers").iterdir())
    assert len(saved) == 1 and (saved[0] / "tokenizer.json").is_file()
    monkeypatch.setattr(tokmod, "_loaded", {})
    second = load_tokenizer(default_model)
    assert second is not first
    assert second.encode(TEXTS[4]) == first.encode(TEXTS[4])
    assert second.apply_chat([{"role": "user", "content": "x"}]) == first.apply_chat([{"role": "user", "content": "x"}])


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="swarm model pull"):
        load_tokenizer(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path / "empty")


def test_no_chat_template(tok: Tokenizer) -> None:
    class NoTemplate:
        chat_template = None

    with pytest.raises(TokenizerError, match="chat template"):
        Tokenizer(NoTemplate(), "x").apply_chat([{"role": "user", "content": "hi"}])  # type: ignore[arg-type]


def test_gguf_conversion_without_torch_matches_transformers(default_model: Path, default_tokenizer: Any) -> None:
    """The torch-free conversion (what a client without torch uses) builds the very
    tokenizer AutoTokenizer builds from the GGUF; tests/e2e/test_without_torch.py runs
    it with torch's import blocked."""
    ours = tokmod._from_gguf_without_torch(default_model)
    assert ours.backend_tokenizer.to_str() == default_tokenizer.backend_tokenizer.to_str()  # type: ignore[attr-defined]
    assert ours.chat_template == default_tokenizer.chat_template
    assert ours.special_tokens_map == default_tokenizer.special_tokens_map
    for text in TEXTS:
        assert ours.encode(text) == default_tokenizer.encode(text)
