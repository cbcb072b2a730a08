"""Read a GGUF file's tensors for a slice, dequantized.

The file is memory-mapped (``swarm_proto.gguf_index``), so only the tensors a
slice asks for are touched. llama.cpp's converter permutes the rows of Q and K
for the llama architecture (interleaved rotary pairs); reading undoes that, so
the weights match the Hugging Face layout the model code expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from swarm_proto.errors import ModelFormatError
from swarm_proto.gguf_index import ARCHS, index
from swarm_proto.model_args import ModelArgs

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

    r = index(path)
    tensors = r.tensors
    permuted = ARCHS.get(args.arch, ("", False))[1]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        t = tensors.get(gguf_name(name))
        if t is None:
            continue
        kind = GGMLQuantizationType(t.tensor_type)
        try:
            raw = r.data(t)
            if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                data = np.array(raw, dtype=np.float32)
            else:
                data = dequantize(raw, kind)
        except (ValueError, NotImplementedError, TypeError) as exc:
            raise ModelFormatError(f"{path}: cannot dequantize {t.name} ({kind.name}): {exc}") from exc
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        data = data.reshape(shape)
        if permuted and ".self_attn.q_proj." in name:
            data = _unpermute(data, args.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            data = _unpermute(data, args.num_kv_heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return out
