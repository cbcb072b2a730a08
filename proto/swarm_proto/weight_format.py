"""How a node holds a model's weights, and what one layer costs it in bytes.

Torch-free, so the coordinator and the node's control plane can size layers
without loading any. A node's *weight format* is one of:

- ``float``: every tensor dequantized (or cast) to the compute dtype -- today's
  exact path, the one the referee matches;
- ``gguf``: a GGUF file's quantized tensors kept in their own precision
  (:data:`KEPT_GGUF_TYPES`; other types are dequantized to the compute dtype);
- ``int8`` / ``int4``: a float checkpoint quantized weight-only, group-wise, at load.

The byte counts are those of the engine's layouts (``swarm_node.engine.quant``):
4-bit codes plus one (scale, offset) pair per 32 columns in the compute dtype;
codes wider than 4 bits as two 4-bit halves (8 bits) with two pairs; Q6_K as int8
codes with one scale per 16 columns. Those layouts need ``K % 32 == 0`` (256 for
K-quants) and ``N % 64 == 0``; other shapes are dequantized.
"""

from __future__ import annotations

import math
from pathlib import Path

from swarm_proto.model_args import DTYPE_BYTES, ModelArgs, is_gguf, layer_bytes

QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")  # --quantize
FORMATS = ("float", "gguf", "int8", "int4")
KEPT_GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
BLOCKQ_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # run by the VNNI kernel where a node has it
GROUP = 32  # columns per scale/offset pair
PACK_ROWS = 64  # rows per block of the packed int4 layout
QK_K = 256  # K-quant super-block


def resolve(quantize: str, source: str | Path, dtype: str, device: str) -> str:
    """The weight format a node uses for ``--quantize``: ``auto`` keeps a GGUF file's
    quantization unless the dtype is float32 (the exact path) or the device is not the
    CPU (the CUDA path for GGUF exists, engine.quant_cuda, but is not the default until
    measured: docs/engine.md); ``none`` dequantizes; int8/int4 quantize a float
    checkpoint, on the CPU or CUDA."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    gguf = is_gguf(Path(source))
    if quantize == "none":
        return "float"
    if quantize == "auto":
        return "gguf" if gguf and dtype != "float32" and device.split(":")[0] == "cpu" else "float"
    if gguf:
        raise ValueError(f"--quantize {quantize} applies to float checkpoints; {Path(source).name} is GGUF, "
                         "whose weights stay in their own quantization (--quantize auto) or are dequantized (none)")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--quantize {quantize} runs on the CPU or CUDA, not on {device}")
    return quantize


def compute_dtypes(dtype: str, fmt: str, device: str) -> tuple[str, str]:
    """(activation dtype, kernel dtype) for a configured ``dtype`` (``auto`` or a name)
    and weight format. ``auto`` is the fastest correct choice measured (docs/engine.md):
    quantized weights on the CPU run bfloat16 kernels around float32 activations (the
    residual stream, norms, attention and KV cache stay float32); float weights run in
    bfloat16 on CUDA and in float32 elsewhere (dense bfloat16 decode measured slower than
    float32 on the CPU here). An explicit dtype is used throughout, except by quantized
    kernels on CUDA, which take bfloat16 only (engine.quant_cuda); activations there are
    bfloat16 by default."""
    cuda = device.split(":")[0] == "cuda"
    if fmt != "float" and cuda:
        return ("bfloat16" if dtype == "auto" else dtype), "bfloat16"
    if dtype != "auto":
        return dtype, dtype
    if fmt != "float":
        return "float32", "bfloat16"
    return ("bfloat16", "bfloat16") if device.split(":")[0] == "cuda" else ("float32", "float32")


def kept_quantized(kind: str, shape: tuple[int, int]) -> bool:
    """Whether a [N, K] matrix of ``kind`` (a GGUF type name, or int8/int4) stays quantized."""
    n, k = shape
    if kind == "Q6_K":
        return k % QK_K == 0
    if kind in ("int8", "int4"):
        return k % GROUP == 0 and n % PACK_ROWS == 0
    return kind in KEPT_GGUF_TYPES and k % (QK_K if kind.endswith("_K") else GROUP) == 0 and n % PACK_ROWS == 0


def matrix_bytes(kind: str, shape: tuple[int, int], dtype: str, blockq: bool = False) -> int:
    """Bytes a [N, K] matrix of ``kind`` holds once loaded with compute dtype ``dtype``;
    ``blockq``: on a node running the VNNI kernel (engine.blockq), whose Q4_0, Q4_1 and
    Q8_0 hold the file's codes and fp16 scales (and Q4_1's fp16 offsets), int4 as Q4_1
    and int8 as Q8_0."""
    n, k = shape
    e = DTYPE_BYTES[dtype]
    if not kept_quantized(kind, shape):
        return n * k * e
    if blockq and kind in (*BLOCKQ_TYPES, "int4", "int8") and k % 64 == 0:  # int4 as Q4_1, int8 as Q8_0
        wide = kind in ("Q8_0", "int8")
        return n * k // (1 if wide else 2) + n * (k // GROUP) * (4 if kind in ("Q4_1", "int4") else 2)
    if kind in ("Q4_0", "Q4_1", "Q4_K", "int4"):
        return n * k // 2 + (k // GROUP) * n * 2 * e
    if kind in ("Q8_0", "Q5_K", "int8"):
        return n * k + (2 * k // GROUP) * n * 2 * e
    return n * k + n * (k // 16) * e  # Q6_K


def format_layer_bytes(args: ModelArgs, dtype: str, fmt: str, source: str | Path | None = None,
                       blockq: bool = False) -> int:
    """Bytes one decoder layer holds in format ``fmt`` (for ``gguf``, the mean over the
    file's layers, rounded up: K-quant mixes give some layers wider types; ``blockq`` as
    in `matrix_bytes`)."""
    if fmt == "float":
        return layer_bytes(args, dtype)
    c, i, e = args.hidden_size, args.intermediate_size, DTYPE_BYTES[dtype]
    norms = 2 * c * e + ((args.q_size + 2 * args.kv_size) * e if args.attention_bias else 0)
    if fmt in ("int8", "int4"):
        shapes = [(args.q_size + 2 * args.kv_size, c), (c, args.q_size), (2 * i, c), (c, i)]
        return norms + sum(matrix_bytes(fmt, s, dtype, blockq) for s in shapes)
    if fmt != "gguf" or source is None:
        raise ValueError(f"unknown weight format {fmt!r} (or no GGUF file given)")
    from gguf import GGMLQuantizationType

    from swarm_proto.gguf_index import index  # numpy, only for GGUF files

    total = 0
    for t in index(Path(source)).tensors.values():
        if not t.name.startswith("blk.") or t.name.endswith(".bias") or len(t.shape) != 2:
            continue
        kind = GGMLQuantizationType(t.tensor_type).name
        total += matrix_bytes(kind, (int(t.shape[1]), int(t.shape[0])), dtype, blockq)  # GGUF: innermost first
    return norms + math.ceil(total / args.num_layers)


def gguf_types(source: str | Path) -> list[str]:
    """The types of a GGUF file's layer matrices, most bytes first."""
    from gguf import GGMLQuantizationType

    from swarm_proto.gguf_index import index

    sizes: dict[str, int] = {}
    for t in index(Path(source)).tensors.values():
        if t.name.startswith("blk.") and len(t.shape) == 2:
            kind = GGMLQuantizationType(t.tensor_type).name
            sizes[kind] = sizes.get(kind, 0) + t.n_bytes
    return sorted(sizes, key=lambda k: -sizes[k])


def describe(fmt: str, dtype: str, source: str | Path | None = None) -> str:
    """How the dashboard and logs name a format: ``bfloat16``, ``int4``, ``Q4_1`` ..."""
    if fmt == "float":
        return dtype
    if fmt == "gguf" and source is not None:
        return "+".join(gguf_types(source)) or "gguf"
    return fmt
