"""Build a model slice from a model source, reading only that slice's tensors.

Sources: a Hugging Face folder (config.json + safetensors, single file or a
sharded index) or a GGUF file. Both readers hand back tensors under Hugging
Face names; this module maps them onto the slice's fused parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import torch

from swarm_node.engine import gguf_loader, hf_loader
from swarm_node.engine.model import ModelSlice, check_range, inv_freq
from swarm_node.errors import ModelFormatError
from swarm_proto.model_args import ModelArgs, is_gguf, read_args

log = logging.getLogger(__name__)

TensorReader = Callable[[Iterable[str]], dict[str, torch.Tensor]]


def load_slice(
    source: str | Path,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ModelSlice:
    """Layers [start, end) of the model at `source`, with only their tensors read."""
    path = Path(source)
    args = read_args(path)
    check_range(args, start, end)
    names = slice_tensor_names(args, start, end)
    reader: TensorReader = (
        (lambda n: gguf_loader.read_tensors(path, args, n)) if is_gguf(path) else (lambda n: hf_loader.read_tensors(path, n))
    )
    tensors = reader(names)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ModelFormatError(f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model = build_slice(args, start, end, tensors, dtype=dtype, device=device)
    log.info("loaded layers [%d, %d) of %s (%.1f MB)", start, end, path.name, model_bytes(model) / 1e6)
    return model


def build_slice(
    args: ModelArgs,
    start: int,
    end: int,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ModelSlice:
    """Layers [start, end) from tensors under Hugging Face names (a state dict of
    `LlamaForCausalLM`, say). Consumes `tensors`: each is dropped from the dict once
    copied into the slice's layout, so that peak memory stays near the slice's size."""
    check_range(args, start, end)
    if args.tie_word_embeddings and end == args.num_layers:
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    with torch.device("meta"):
        model = ModelSlice(args, start, end)
    state = _fuse(args, start, end, tensors, dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.rotary.inv_freq = inv_freq(args)
    model.eval()
    return model.to(device)  # keeps the column-major strides


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage (a tied head counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += p.untyped_storage().nbytes()
    return total


def slice_tensor_names(args: ModelArgs, start: int, end: int) -> list[str]:
    """Hugging Face names of every tensor layers [start, end) need."""
    names = []
    if start == 0:
        names.append("model.embed_tokens.weight")
    for i in range(start, end):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if args.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    if end == args.num_layers:
        names.append("model.norm.weight")
        if args.tie_word_embeddings:
            names.append("model.embed_tokens.weight")
        else:
            names.append("lm_head.weight")
    return list(dict.fromkeys(names))


def _fuse(args: ModelArgs, start: int, end: int, t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Map Hugging Face tensors onto the slice's parameter names: q/k/v and gate/up
    fused, every matrix stored column-major (see `model.Linear`). Tensors are taken
    out of `t` as they are used, so that each read tensor is freed once copied."""
    def take(name: str) -> torch.Tensor:
        return t.pop(name).to(dtype)

    def matrix(*names: str) -> torch.Tensor:
        """[out, in] pieces stacked along `out`, laid out as a contiguous [in, out]."""
        parts = [take(n) for n in names]
        out = torch.empty(parts[0].shape[1], sum(p.shape[0] for p in parts), dtype=dtype, device=parts[0].device)
        col = 0
        for part in parts:
            out[:, col : col + part.shape[0]] = part.t()
            col += part.shape[0]
        return out.t()

    expect = {
        "q_proj.weight": (args.q_size, args.hidden_size),
        "k_proj.weight": (args.kv_size, args.hidden_size),
        "v_proj.weight": (args.kv_size, args.hidden_size),
        "o_proj.weight": (args.hidden_size, args.q_size),
    }
    state: dict[str, torch.Tensor] = {}
    for i in range(start, end):
        p, q = f"model.layers.{i}.", f"layers.{i - start}."
        for key, shape in expect.items():
            got = tuple(t[p + "self_attn." + key].shape)
            if got != shape:
                raise ModelFormatError(f"tensor {p}self_attn.{key} has shape {got}, expected {shape}")
        state[q + "attention.wqkv.weight"] = matrix(*(p + f"self_attn.{x}_proj.weight" for x in "qkv"))
        if args.attention_bias:
            state[q + "attention.wqkv.bias"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        state[q + "attention.wo.weight"] = matrix(p + "self_attn.o_proj.weight")
        state[q + "feed_forward.w13.weight"] = matrix(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        state[q + "feed_forward.w2.weight"] = matrix(p + "mlp.down_proj.weight")
        state[q + "attention_norm.weight"] = take(p + "input_layernorm.weight")
        state[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    if end == args.num_layers:
        state["norm.weight"] = take("model.norm.weight")
        state["lm_head.weight"] = matrix("lm_head.weight")  # [V, C]
    if start == 0:
        if args.tie_word_embeddings and end == args.num_layers:
            state["embed_tokens.weight"] = state["lm_head.weight"]  # one storage for both
        else:
            state["embed_tokens.weight"] = take("model.embed_tokens.weight")
    for name, x in state.items():
        # A sum is NaN or infinite when any element is (weights never sum to overflow).
        if not torch.isfinite(x.float().sum()):
            raise ModelFormatError(f"tensor for {name} holds NaN or infinite values")
    return state
