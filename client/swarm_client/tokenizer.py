"""Tokenizers for the client: text <-> token ids, chat templates, streaming text.

``load_tokenizer(source)`` accepts a Hugging Face folder, a GGUF file, a known
model name (``"smollm2-135m"``) or None for the default model. Building a
tokenizer out of a GGUF's metadata takes seconds, so the converted tokenizer is
saved once under ``<cache>/tokenizers/`` (keyed by the file's path, size and
mtime) and reloaded from there in well under a second; within a process each
source is loaded once. ``transformers`` is imported only when a tokenizer is
loaded, so ``import swarm_client`` stays light.

Nothing here needs torch. transformers loads a saved tokenizer without it, but its
GGUF reader imports torch; without torch the GGUF's vocabulary is read with the
``gguf`` package (numpy only) and handed to the same transformers converter, which
gives the same ``tokenizer.json`` (a test compares the two).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from swarm_client.errors import ModelUnavailableError, TokenizerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Tokenizer", "IncrementalDetokenizer", "load_tokenizer"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[str, Tokenizer] = {}

# How many tokens before the unread tail are decoded with it, so that merges and
# leading-space rules at the boundary come out as they do in a full decode.
_CONTEXT_TOKENS = 5


class Tokenizer:
    """A thin, typed face over a Hugging Face tokenizer."""

    def __init__(self, hf: PreTrainedTokenizerBase, source: str = "") -> None:
        self.hf = hf
        self.source = source

    @property
    def bos_token_id(self) -> int | None:
        bos = self.hf.bos_token_id
        return None if bos is None else int(bos)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.hf.eos_token_id
        return None if eos is None else int(eos)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. ``add_bos=None`` follows the tokenizer's own
        rule; True makes sure the sequence starts with BOS; False makes sure it
        does not."""
        ids: list[int] = list(self.hf.encode(text, add_special_tokens=add_bos is not False))
        bos = self.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        elif add_bos is False and bos is not None and ids and ids[0] == bos:
            ids.pop(0)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's own chat template."""
        if not self.has_chat_template:
            raise TokenizerError(f"the tokenizer of {self.source or 'this model'} has no chat template")
        ids = self.hf.apply_chat_template(
            [dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
        return [int(i) for i in cast("list[int]", ids)]

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    Each new token is decoded together with a few tokens before it, and only the
    text beyond what those tokens alone decode to is emitted; a piece ending in
    U+FFFD (an incomplete UTF-8 sequence split across byte tokens) is held back
    until the following tokens complete it. The concatenated pieces equal
    ``decode(generated_ids)`` (plus whatever ``flush()`` returns at the end).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        # Keep a little of the prompt as left context so the first generated token
        # decodes as it would in the middle of the text (leading spaces).
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix = 0  # start of the context window
        self._read = len(context)  # end of what has been emitted

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (often "", never partial)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith("\ufffd")):
            if not full_text.startswith(prefix_text):
                # A decode of the longer window changed earlier text (a rare
                # normaliser effect); emit only what lies past the common length.
                logger.debug("detokenizer window changed its prefix: %r -> %r", prefix_text, full_text)
            piece = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""


def _source_key(source: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """(cache key, resolved path) for a tokenizer source."""
    from swarm_proto.store import resolve_model

    try:
        path = resolve_model(None if source is None else os.fspath(source)).resolve()
    except FileNotFoundError as exc:
        raise ModelUnavailableError(str(exc)) from exc
    return str(path), path


def _disk_cache_dir(gguf: Path) -> Path:
    from swarm_proto.store import cache_dir

    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{gguf.stem}-{digest}"


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _import_transformers() -> None:
    """Import transformers without its warning that, torch missing, "models won't be
    available": true, and beside the point for a tokenizer."""
    if "transformers" in sys.modules:
        return
    hush = _Drop("PyTorch was not found")
    root = logging.getLogger("transformers")
    root.addFilter(hush)
    try:
        import transformers  # noqa: F401
    finally:
        root.removeFilter(hush)


def _load_hf(path: Path) -> PreTrainedTokenizerBase:
    _import_transformers()
    from transformers import AutoTokenizer

    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    saved = _disk_cache_dir(path)
    if (saved / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the unreadable tokenizer cache %s: %s", saved, exc)
    logger.info("building the tokenizer from %s (once; cached in %s)", path, saved)
    hf = _from_gguf(path)
    tmp = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
    try:
        hf.save_pretrained(str(tmp))
        os.replace(tmp, saved)
    except OSError as exc:  # a read-only cache, or another process won the race
        logger.debug("could not cache the tokenizer in %s: %s", saved, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return hf


def _from_gguf(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file describes, as ``AutoTokenizer`` builds it."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _from_gguf_without_torch(path)


def _from_gguf_without_torch(path: Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(gguf_file=...)`` minus transformers' torch-bound
    GGUF reader: the metadata comes from ``gguf.GGUFReader`` and goes through the
    converter transformers itself uses."""
    try:
        from gguf import GGUFReader
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS,
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError as exc:
        raise TokenizerError(
            f"this transformers cannot convert a GGUF tokenizer without torch ({exc}); "
            'install transformers>=5.24 or "llama-swarm[node]"'
        ) from exc
    reader = GGUFReader(str(path))
    meta = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    spec, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if spec.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # as transformers: llama.cpp adds BOS to such vocabularies
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = spec["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(str(meta["general.architecture"]), spec)
    return cast("PreTrainedTokenizerBase", TokenizersBackend(tokenizer_object=backend, **config, **extra))


def load_tokenizer(source: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer of a model folder, GGUF file or known model name (cached per source)."""
    key, path = _source_key(source)
    with _lock:
        tok = _loaded.get(key)
        if tok is None:
            try:
                hf = _load_hf(path)
            except (OSError, ValueError, KeyError) as exc:
                raise TokenizerError(f"cannot load a tokenizer from {path}: {exc}") from exc
            tok = _loaded[key] = Tokenizer(hf, source=key)
        return tok
