"""A GGUF file's scalar metadata and tensor table, and the model hyperparameters they
describe; no torch, so every side of the swarm can read a model's shape.

`gguf.GGUFReader` parses every metadata field, the tokenizer's vocabulary and
merges included: seconds for a 50k-token vocabulary, at every node start. What
loading needs of it -- the scalar metadata and the tensor table (name, shape,
type, offset) -- is small, so it is kept as an index in the model cache
(``gguf-index/``, keyed by the file's path, size and modification time) and the
next start reads that instead of parsing the file again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from swarm_proto.errors import ModelFormatError
from swarm_proto.model_args import ModelArgs, RopeScaling

# GGUF architecture -> (our arch name, are Q/K rows permuted by the converter)
ARCHS = {"llama": ("llama", True), "mistral": ("mistral", True), "qwen2": ("qwen2", False)}

log = logging.getLogger(__name__)

_INDEX_VERSION = 1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    tensor_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # of the data, from the start of the file
    n_bytes: int


class GGUFIndex:
    """The scalar metadata and the tensor table of a GGUF file, and its tensors' data
    as views of the memory-mapped file."""

    def __init__(self, path: Path, fields: dict[str, Any], tensors: Iterable[TensorInfo]) -> None:
        self.path = path
        self.fields = fields
        self.tensors = {t.name: t for t in tensors}

    @cached_property
    def _map(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def data(self, t: TensorInfo) -> np.ndarray:
        """float32/float16 values in numpy order, or a quantized tensor's raw blocks."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        if t.offset + t.n_bytes > self._map.size:
            raise ModelFormatError(f"{self.path}: tensor {t.name} runs past the end of the file (truncated?)")
        raw = self._map[t.offset : t.offset + t.n_bytes]
        dims = tuple(reversed(t.shape))
        kind = GGMLQuantizationType(t.tensor_type)
        if kind == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(dims)
        if kind == GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(dims)
        return raw.reshape(quant_shape_to_byte_shape(dims, kind))


def index(path: Path) -> GGUFIndex:
    st = path.stat()
    return _index(path.resolve(), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _index(path: Path, size: int, mtime_ns: int) -> GGUFIndex:
    kept = _index_file(path, size, mtime_ns)
    try:
        doc = json.loads(kept.read_text())
        if doc.get("version") == _INDEX_VERSION:
            return GGUFIndex(path, doc["fields"], (TensorInfo(n, tuple(s), k, o, b) for n, s, k, o, b in doc["tensors"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: parse the file and (re)write it
    built = _parse(path)
    _save(kept, built)
    return built


def _parse(path: Path) -> GGUFIndex:
    from gguf import GGUFReader, GGUFValueType

    try:
        r = GGUFReader(str(path))
        fields = {
            key: _plain(f.contents()) for key, f in r.fields.items() if f.types and f.types[0] != GGUFValueType.ARRAY
        }
        tensors = [
            TensorInfo(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
            for t in r.tensors
        ]
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelFormatError(f"{path}: not a readable GGUF file, truncated or corrupt ({exc})") from exc
    return GGUFIndex(path, fields, tensors)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _index_file(path: Path, size: int, mtime_ns: int) -> Path:
    """Where the index of this version of the file is kept."""
    from swarm_proto.store import cache_dir

    key = hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()[:32]
    return cache_dir() / "gguf-index" / f"{path.stem}-{key}.json"


def _save(target: Path, idx: GGUFIndex) -> None:
    doc = {
        "version": _INDEX_VERSION,
        "source": str(idx.path),
        "fields": idx.fields,
        "tensors": [[t.name, list(t.shape), t.tensor_type, t.offset, t.n_bytes] for t in idx.tensors.values()],
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, target)
    except (OSError, TypeError, ValueError) as exc:  # a read-only cache, a field json cannot hold
        log.debug("could not keep the GGUF index at %s: %s", target, exc)


def _field(r: GGUFIndex, key: str, default: Any = None) -> Any:
    return r.fields.get(key, default)


def read_args(path: Path) -> ModelArgs:
    r = index(path)
    arch_key = _field(r, "general.architecture")
    if arch_key not in ARCHS:
        raise ModelFormatError(f"{path}: unknown architecture {arch_key!r}: supported are {', '.join(ARCHS)}")
    a = arch_key

    def need(key: str) -> Any:
        v = _field(r, f"{a}.{key}")
        if v is None:
            raise ModelFormatError(f"{path}: metadata lacks {a}.{key}")
        return v

    tensors = r.tensors
    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path}: missing tensor token_embd.weight")
    vocab = _field(r, f"{a}.vocab_size") or int(tensors["token_embd.weight"].shape[1])
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    scaling = None
    kind = _field(r, f"{a}.rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling("linear", float(_field(r, f"{a}.rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise ModelFormatError(f"{path}: unsupported rope scaling {kind!r}")
    divisors = None
    if "rope_freqs.weight" in tensors:
        divisors = tuple(float(x) for x in np.asarray(r.data(tensors["rope_freqs.weight"]), dtype=np.float32))
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    bos = _field(r, "tokenizer.ggml.bos_token_id")
    return ModelArgs(
        arch=ARCHS[a][0],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(r, f"{a}.attention.head_count_kv", heads)),
        head_dim=int(_field(r, f"{a}.attention.key_length", 0) or 0),
        rms_norm_eps=float(_field(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(r, f"{a}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(r, f"{a}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        name=str(_field(r, "general.name", path.stem)),
        rope_freq_divisors=divisors,
    )
