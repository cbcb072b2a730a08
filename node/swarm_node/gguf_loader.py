"""Read a GGUF file: hyperparameters from its metadata, tensors dequantized.

The file is memory-mapped, so only the tensors a slice asks for are touched.
llama.cpp's converter permutes the rows of Q and K for the llama architecture
(interleaved rotary pairs); reading undoes that, so the weights match the
Hugging Face layout the model code expects.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from swarm_node.config import ModelArgs, RopeScaling
from swarm_node.errors import ModelFormatError

# GGUF architecture -> (our arch name, are Q/K rows permuted by the converter)
_ARCHS = {"llama": ("llama", True), "mistral": ("mistral", True), "qwen2": ("qwen2", False)}

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@lru_cache(maxsize=8)
def _reader(path: Path, mtime: float) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelFormatError(f"{path}: not a readable GGUF file, truncated or corrupt ({exc})") from exc


def reader(path: Path) -> Any:
    return _reader(path.resolve(), path.stat().st_mtime)


def _field(r: Any, key: str, default: Any = None) -> Any:
    f = r.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_args(path: Path) -> ModelArgs:
    r = reader(path)
    arch_key = _field(r, "general.architecture")
    if arch_key not in _ARCHS:
        raise ModelFormatError(f"{path}: unknown architecture {arch_key!r}: supported are {', '.join(_ARCHS)}")
    a = arch_key

    def need(key: str) -> Any:
        v = _field(r, f"{a}.{key}")
        if v is None:
            raise ModelFormatError(f"{path}: metadata lacks {a}.{key}")
        return v

    tensors = {t.name: t for t in r.tensors}
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
        divisors = tuple(float(x) for x in np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32))
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    bos = _field(r, "tokenizer.ggml.bos_token_id")
    return ModelArgs(
        arch=_ARCHS[a][0],
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
        attention_bias=f"blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        name=str(_field(r, "general.name", path.stem)),
        rope_freq_divisors=divisors,
    )


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
    if parts[:2] != ["model", "layers"]:
        raise KeyError(hf_name)
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.{parts[-1]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K weight (or bias)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_tensors(path: Path, args: ModelArgs, names: Iterable[str]) -> dict[str, torch.Tensor]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    r = reader(path)
    tensors = {t.name: t for t in r.tensors}
    permuted = _ARCHS.get(args.arch, ("", False))[1]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        t = tensors.get(gguf_name(name))
        if t is None:
            continue
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                data = np.array(t.data, dtype=np.float32)
            else:
                data = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise ModelFormatError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {exc}") from exc
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        data = data.reshape(shape)
        if permuted and ".self_attn.q_proj." in name:
            data = _unpermute(data, args.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            data = _unpermute(data, args.num_kv_heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return out
