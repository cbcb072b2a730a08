"""Build a model slice from a model source, reading only that slice's tensors.

Sources: a Hugging Face folder (config.json + safetensors, single file or a
sharded index) or a GGUF file. Both readers hand back tensors under Hugging
Face names; this module maps them onto the slice's fused parameters.

Weight formats (``swarm_proto.weight_format``): ``float`` dequantizes everything to
the compute dtype; ``gguf`` keeps a GGUF file's quantized matrices quantized and
``int8``/``int4`` quantize a float checkpoint's layer matrices (embedding and head
stay in the compute dtype), both through ``engine.quant``, one matrix at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from swarm_node.engine import blockq, gguf_loader, hf_loader, quant, quant_cuda
from swarm_node.engine.model import Block, Linear, ModelSlice, check_range, inv_freq
from swarm_node.errors import ModelFormatError
from swarm_proto.model_args import ModelArgs, is_gguf, read_args
from swarm_proto.weight_format import kept_quantized

log = logging.getLogger(__name__)

# An int4-kernel LM head in bfloat16 recomputes each position's top logits exactly
# (quant.QuantLinear._refine): near-ties at the argmax are decided in float32. It and a
# quantized embedding keep their scales' rounding residual, so embedding rows are exact
# on a head node and through a tied head alike.
HEAD_REFINE_TOP = 16

TensorReader = Callable[[Iterable[str]], dict[str, torch.Tensor]]


def load_slice(
    source: str | Path,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights: str = "float",
    kernel_dtype: torch.dtype | None = None,
) -> ModelSlice:
    """Layers [start, end) of the model at `source`, with only their tensors read,
    held in weight format `weights` (see swarm_proto.weight_format.resolve).
    Quantized matrices run their kernels in `kernel_dtype` (default: `dtype`), the
    rest of the model (activations, norms, attention, KV cache) in `dtype`."""
    path = Path(source)
    args = read_args(path)
    check_range(args, start, end)
    if weights != "float":
        cuda = quant_cuda.on_cuda(device)
        if torch.device(device).type != "cpu" and not cuda:
            raise ValueError(f"quantized weights ({weights}) run on the CPU or CUDA, not on {device}")
        if cuda and kernel_dtype not in (None, quant_cuda.KERNEL_DTYPE):
            raise ValueError(f"quantized weights on CUDA run bfloat16 kernels, not {kernel_dtype}")
        if (weights == "gguf") != is_gguf(path):
            raise ValueError(f"weight format {weights} does not apply to {path.name}")
        kdtype = quant_cuda.KERNEL_DTYPE if cuda else kernel_dtype or dtype
        model = _build_quantized(path, args, start, end, dtype, kdtype, weights, device if cuda else None)
        if cuda:
            model = model.to(device)  # the float parts (norms, a dense head); packed matrices are there already
        _return_freed_memory()
        log.info("loaded layers [%d, %d) of %s as %s (%.1f MB)", start, end, path.name, weights, model_bytes(model) / 1e6)
        return model
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
    """Bytes of distinct parameter and buffer storage (a tied head counts once; the
    rotary table is a few hundred bytes)."""
    return quant.module_bytes(model)


_warned_types: set[str] = set()


def _return_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc keeps them otherwise): a
    quantized load frees as much in block buffers as it keeps."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _build_quantized(
    path: Path, args: ModelArgs, start: int, end: int, dtype: torch.dtype, kdtype: torch.dtype, fmt: str,
    cuda: torch.device | str | None = None,
) -> ModelSlice:
    """Layers [start, end) with quantized matrices, built one matrix at a time (on the
    GPU `cuda` when given: engine.quant_cuda; the float parts stay on the CPU)."""
    gguf = fmt == "gguf"
    floats: dict[str, torch.Tensor] = {}
    if not gguf:
        bits = {"int8": 8, "int4": 4}[fmt]
        names = slice_tensor_names(args, start, end)
        floats = hf_loader.read_tensors(path, names)
        missing = [n for n in names if n not in floats]
        if missing:
            raise ModelFormatError(f"{path}: missing tensor {missing[0]}")

    def dense(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        with torch.device("meta"):
            m = Linear(w.shape[1], w.shape[0], bias=bias is not None)
        w = w.to(dtype)
        m.weight = nn.Parameter(w.t().contiguous().t() if dtype == torch.float32 else w.contiguous(), requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return m

    def read(name: str) -> tuple[str, np.ndarray]:
        got = gguf_loader.read_blocks(path, args, name)
        if got is None:
            raise ModelFormatError(f"{path}: missing tensor {name}")
        return got

    def dequantized(name: str) -> torch.Tensor:
        return gguf_loader.read_tensors(path, args, [name])[name]

    def make(names: list[str], bias_names: Sequence[str] = (), refine_top: int = 0, spread_in: bool = False
             ) -> nn.Module:
        """One linear layer over the matrices `names` stacked along the output (with
        `spread_in`, a layer matrix fed by a norm gets the rounding spread, see
        engine.quant; the head refines instead)."""
        spread = quant.layer_spread(kdtype) if spread_in and not refine_top else ()
        bias = torch.cat([floats.pop(b) if not gguf else dequantized(b) for b in bias_names]) if bias_names else None
        if not gguf:
            w = torch.cat([floats.pop(n) for n in names])
            if not kept_quantized(fmt, (w.shape[0], w.shape[1])):
                _warn_once(f"{fmt} for shape {tuple(w.shape)}")
                return dense(w, bias)
            if cuda is not None:
                return quant_cuda.linear_from_float(w, bits, cuda, bias)
            return quant.linear_from_float(w, bits, kdtype, None if bias is None else bias.to(kdtype), spread)
        parts = [read(n) for n in names]
        k = int(parts[0][1].shape[1]) if parts[0][0] in ("F32", "F16") else _gguf_cols(path, names[0])
        mods: list[nn.Module] = []
        kept = [p for p in parts if kept_quantized(p[0], (p[1].shape[0], k))]
        if len(kept) == len(parts):
            if cuda is not None:
                mod = quant_cuda.linear_from_gguf(parts, k, cuda, bias)
            else:
                mod = quant.linear_from_gguf(parts, k, kdtype, None if bias is None else bias.to(kdtype), refine_top,
                                             spread)
            _check_finite(mod, names[0])
            return mod
        col = 0
        for (kind, raw), name in zip(parts, names):
            b = None if bias is None else bias[col : col + raw.shape[0]]
            col += raw.shape[0]
            if kept_quantized(kind, (raw.shape[0], k)) and cuda is not None:
                mods.append(quant_cuda.linear_from_gguf([(kind, raw)], k, cuda, b))
            elif kept_quantized(kind, (raw.shape[0], k)):
                mods.append(quant.linear_from_gguf([(kind, raw)], k, kdtype, None if b is None else b.to(kdtype),
                                                   spread=spread))
            else:
                if kind not in ("F32", "F16"):
                    _warn_once(kind)
                mods.append(dense(dequantized(name), b))
        return mods[0] if len(mods) == 1 else quant.ConcatLinear(mods)

    with torch.device("meta"):
        model = ModelSlice(args, start, end)
    state: dict[str, torch.Tensor] = {}

    def norm(name: str) -> torch.Tensor:
        return (floats.pop(name) if not gguf else dequantized(name)).to(dtype)

    for i in range(start, end):
        p, block = f"model.layers.{i}.", model.layers[i - start]
        assert isinstance(block, Block)
        attn_bias = [p + f"self_attn.{x}_proj.bias" for x in "qkv"] if args.attention_bias else []
        block.attention.wqkv = make([p + f"self_attn.{x}_proj.weight" for x in "qkv"], attn_bias, spread_in=True)
        block.attention.wo = make([p + "self_attn.o_proj.weight"])
        block.feed_forward.w13 = make([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], spread_in=True)
        block.feed_forward.w2 = make([p + "mlp.down_proj.weight"])
        state[f"layers.{i - start}.attention_norm.weight"] = norm(p + "input_layernorm.weight")
        state[f"layers.{i - start}.ffn_norm.weight"] = norm(p + "post_attention_layernorm.weight")
    head_name = "model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    if end == args.num_layers:
        state["norm.weight"] = norm("model.norm.weight")
        if gguf:
            model.lm_head = make([head_name], refine_top=HEAD_REFINE_TOP)
        else:
            model.lm_head = dense(floats.pop(head_name) if not (start == 0 and args.tie_word_embeddings)
                                  else floats["model.embed_tokens.weight"], None)
    if start == 0:
        model.embed_tokens = _embedding(model, args, gguf, end == args.num_layers, make, dequantized, floats, dtype)
    mark_batch_invariant(model)
    model.load_state_dict(state, assign=True, strict=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n != "rotary.inv_freq"]
    if left:
        raise ModelFormatError(f"{path}: no weights for {left[0]}")
    model.rotary.inv_freq = inv_freq(args)
    fuse_norms(model)
    model.eval()
    return model


def fuse_norms(model: ModelSlice) -> None:
    """Each layer's two RMSNorms into the VNNI products they feed (q/k/v, gate/up), where
    those run it (engine.blockq.BlockLinear.fuse_norm)."""
    for block in model.layers:
        if isinstance(block, Block):
            for norm, product in ((block.attention_norm, block.attention.wqkv), (block.ffn_norm, block.feed_forward.w13)):
                if isinstance(product, blockq.BlockLinear):
                    product.fuse_norm(norm)


def mark_batch_invariant(model: ModelSlice) -> None:
    """Mark the slice batch-invariant (swarm_node.engine.model) when every layer matrix runs
    the VNNI kernel or PyTorch's int4 kernel, whose rows are computed independently; a head
    that is not such a matrix then runs row by row (one row per sequence at decode, so the
    cost is small)."""
    layers = [m for b in model.layers if isinstance(b, Block)
              for m in (b.attention.wqkv, b.attention.wo, b.feed_forward.w13, b.feed_forward.w2)]
    if not all(quant.rows_independent(m) for m in layers):
        return
    if model.lm_head is not None and not quant.rows_independent(model.lm_head):
        model.lm_head = quant.EachRow(model.lm_head)
    model.batch_invariant = True


def _embedding(model: ModelSlice, args: ModelArgs, gguf: bool, tail: bool, make: Callable[[list[str]], nn.Module],
               dequantized: Callable[[str], torch.Tensor], floats: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """The token embedding: the tied LM head's own quantized rows when this slice holds
    the head, else the table's quantized form, else floats."""
    name = "model.embed_tokens.weight"
    table: nn.Module | None = None
    if gguf and args.tie_word_embeddings and tail:
        table = model.lm_head
    elif gguf:
        table = make([name], refine_top=HEAD_REFINE_TOP)  # its residual: the rows are exact, as the tied head's
    if isinstance(table, (quant.GroupedInt8Linear, quant_cuda.CudaQuantLinear, blockq.BlockLinear)) or (
        isinstance(table, quant.QuantLinear) and quant.packed_layout_known()
    ):
        return quant.QuantEmbedding(table, dtype)
    if not gguf and args.tie_word_embeddings and tail:
        head = model.lm_head
        assert isinstance(head, Linear)
        emb = nn.Embedding(args.vocab_size, args.hidden_size, device="meta")
        emb.weight = head.weight  # one storage for both
        return emb
    w = floats.pop(name) if not gguf else dequantized(name)
    emb = nn.Embedding(args.vocab_size, args.hidden_size, device="meta")
    emb.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    return emb


def _gguf_cols(path: Path, name: str) -> int:
    from swarm_proto.gguf_index import index

    t = index(path).tensors[gguf_loader.gguf_name(name)]
    return int(t.shape[0])


def _check_finite(mod: nn.Module, name: str) -> None:
    for t in mod.buffers():
        if t.is_floating_point() and not torch.isfinite(t.float().sum()):
            raise ModelFormatError(f"tensor for {name} holds NaN or infinite scales")


def _warn_once(kind: str) -> None:
    if kind not in _warned_types:
        _warned_types.add(kind)
        log.warning("weights of type %s are not kept quantized: dequantized to the compute dtype", kind)


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
        """[out, in] pieces stacked along `out`, laid out as a contiguous [in, out]
        (float32; bfloat16 and float16 stay row-major, see `model.Linear`)."""
        parts = [take(n) for n in names]
        if dtype != torch.float32:
            return torch.cat(parts)
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
