"""torch.Tensor <-> ``swarm.Tensor`` message.

Wire format: ``dtype`` names the element type of ``data`` (little-endian, row-major),
``shape`` the logical shape. Codecs chosen by the sender:

- ``exact`` (default): the tensor's own dtype travels unchanged (float32, float16,
  bfloat16, int64, int32). Decoding is bit-exact.
- ``fp16`` / ``bf16``: floating tensors are cast on the wire and cast back to the
  dtype the receiver asks for. fp16 keeps more mantissa, bf16 keeps float32's range.
- ``int8``: blockwise absmax along the last dimension, ``BLOCK_SIZE`` elements per
  block, one float16 scale per block in ``scales``. Error per element is at most
  about half a quantization step: ``absmax(block) / 254``.

``decode`` trusts nothing: it checks the dtype, the shape, the byte counts and an
element budget before touching the bytes, and raises ``WireError`` with a message that
says what was wrong. It builds the tensor on the message's bytes without copying when
no cast is needed; such a tensor must be treated as read-only (pass ``copy=True`` for
a writable one).
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from collections.abc import Sequence

import torch

from swarm_proto import swarm_pb2
from swarm_proto.errors import WireError

__all__ = [
    "BLOCK_SIZE",
    "CODECS",
    "DEFAULT_MAX_ELEMENTS",
    "MAX_DIMS",
    "decode",
    "encode",
    "normalize_codec",
]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("swarm_proto.codec assumes a little-endian host")

CODECS = ("exact", "fp16", "bf16", "int8")
BLOCK_SIZE = 64
MAX_DIMS = 8
# A hidden-state chunk of 8192 positions x 16384 channels; callers pass a tighter bound.
DEFAULT_MAX_ELEMENTS = 1 << 27
_MAX_BLOCK_SIZE = 1 << 16

# Wire name -> torch dtype. int8 only appears as the payload of the int8 codec.
_WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
}
_EXACT_NAMES = {dt: name for name, dt in _WIRE_DTYPES.items() if name != "int8"}
_CODEC_ALIASES = {
    "": "exact",
    "exact": "exact",
    "fp16": "fp16",
    "float16": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "int8": "int8",
}


def normalize_codec(name: str) -> str:
    """Map a codec name (``""`` meaning exact, dtype spellings accepted) to one of CODECS."""
    try:
        return _CODEC_ALIASES[name]
    except KeyError:
        raise WireError(f"unknown wire codec {name!r}; expected one of {', '.join(CODECS)}") from None


def encode(tensor: torch.Tensor, codec: str = "exact") -> swarm_pb2.Tensor:
    """Serialize ``tensor`` (any device, any layout) with the given codec."""
    codec = normalize_codec(codec)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if codec != "exact" and not t.is_floating_point():
        raise WireError(f"codec {codec!r} needs a floating tensor, got {t.dtype}")
    if codec == "fp16":
        t = t.to(torch.float16)
    elif codec == "bf16":
        t = t.to(torch.bfloat16)
    elif codec == "int8":
        return _encode_int8(t)
    name = _EXACT_NAMES.get(t.dtype)
    if name is None:
        raise WireError(f"dtype {t.dtype} cannot travel on the wire; supported: {', '.join(_EXACT_NAMES.values())}")
    return swarm_pb2.Tensor(dtype=name, shape=t.shape, data=_to_bytes(t))


def decode(
    msg: swarm_pb2.Tensor,
    dtype: torch.dtype | None = None,
    *,
    shape: Sequence[int | None] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    device: torch.device | str | None = None,
    copy: bool = False,
) -> torch.Tensor:
    """Rebuild a tensor from ``msg``, validating it first.

    dtype: the dtype the caller wants back (lossy codecs are cast to it). ``None``
        keeps the wire dtype, or float32 for int8-quantized data. Only float <-> float
        casts are allowed: integer data stays integer.
    shape: the expected shape; ``None`` entries match any size.
    max_elements: refuse messages holding more elements than this.
    """
    name = msg.dtype
    wire_dtype = _WIRE_DTYPES.get(name)
    if wire_dtype is None:
        raise WireError(f"unknown tensor dtype {name!r}; expected one of {', '.join(_WIRE_DTYPES)}")
    dims = list(msg.shape)
    numel = _check_shape(dims, shape, max_elements)

    if name == "int8":
        out = _decode_int8(msg, dims, numel)
        wire_dtype = torch.float32
    else:
        if msg.scales or msg.block_size:
            raise WireError(f"scales/block_size are only valid for int8 data, got dtype {name!r}")
        out = _from_bytes(msg.data, wire_dtype, dims, numel)

    if dtype is not None and dtype != out.dtype:
        if not (dtype.is_floating_point and out.dtype.is_floating_point):
            raise WireError(f"expected a {dtype} tensor, got {name!r} on the wire")
        out = out.to(dtype)
        copy = False  # the cast already made a fresh tensor
    if device is not None:
        moved = out.to(device)
        copy = copy and moved.data_ptr() == out.data_ptr()
        out = moved
    return out.clone() if copy else out


def _check_shape(dims: list[int], expected: Sequence[int | None] | None, max_elements: int) -> int:
    if len(dims) > MAX_DIMS:
        raise WireError(f"tensor has {len(dims)} dimensions; at most {MAX_DIMS} allowed")
    for d in dims:
        if d < 0:
            raise WireError(f"negative dimension in shape {dims}")
    if expected is not None:
        ok = len(expected) == len(dims) and all(e is None or e == d for e, d in zip(expected, dims))
        if not ok:
            want = ["*" if e is None else e for e in expected]
            raise WireError(f"tensor shape {dims} does not match the expected {want}")
    numel = math.prod(dims)  # exact Python ints: no overflow before the check
    if numel > max_elements:
        raise WireError(f"tensor of shape {dims} has {numel} elements; at most {max_elements} allowed")
    if numel == 0 and max(dims, default=0) > max(max_elements, 1):  # empty, but torch's strides would overflow
        raise WireError(f"empty tensor of shape {dims}: a dimension is over the {max_elements} elements allowed")
    return numel


def _to_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


_frombuffer_lock = threading.Lock()
_frombuffer_warned = False


def _from_bytes(data: bytes, dtype: torch.dtype, dims: list[int], numel: int) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise WireError(
            f"tensor data holds {len(data)} bytes; shape {dims} of {dtype} needs {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(dims, dtype=dtype)
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    flat = _frombuffer(data, raw_dtype)
    if raw_dtype != dtype:
        flat = flat.view(dtype)
    return flat.view(dims)


def _frombuffer(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    # torch warns once per process that `bytes` is not writable; we document the
    # read-only contract instead, so silence that one warning without touching global
    # filters on every call.
    global _frombuffer_warned
    if _frombuffer_warned:
        return torch.frombuffer(data, dtype=dtype)
    with _frombuffer_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        out = torch.frombuffer(data, dtype=dtype)
        _frombuffer_warned = True
    return out


def _blocks(last: int, block_size: int) -> int:
    return -(-last // block_size)


def _encode_int8(t: torch.Tensor, block_size: int = BLOCK_SIZE) -> swarm_pb2.Tensor:
    shape = list(t.shape)
    last = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if shape else 1
    nb = _blocks(last, block_size)
    x = t.to(torch.float32).reshape(rows, last)  # [R, N]
    pad = nb * block_size - last
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    xb = x.view(rows, nb, block_size)  # [R, B, S]
    absmax = xb.abs().amax(dim=-1, keepdim=True)  # [R, B, 1]
    # Quantize with the scale as the receiver will see it (after the fp16 round trip).
    scales = (absmax / 127.0).clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
    s = scales.to(torch.float32)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(xb / s).clamp_(-127, 127).to(torch.int8)
    q = q.view(rows, nb * block_size)[:, :last].contiguous()
    return swarm_pb2.Tensor(
        dtype="int8",
        shape=shape,
        data=_to_bytes(q),
        scales=_to_bytes(scales.reshape(-1)),
        block_size=block_size,
    )


def _decode_int8(msg: swarm_pb2.Tensor, dims: list[int], numel: int) -> torch.Tensor:
    block_size = msg.block_size
    if not 0 < block_size <= _MAX_BLOCK_SIZE:
        raise WireError(f"int8 block_size must be in 1..{_MAX_BLOCK_SIZE}, got {block_size}")
    q = _from_bytes(msg.data, torch.int8, dims, numel)
    last = dims[-1] if dims else 1
    rows = math.prod(dims[:-1]) if dims else 1
    nb = _blocks(last, block_size)
    if len(msg.scales) != rows * nb * 2:
        raise WireError(
            f"int8 tensor of shape {dims} with block_size {block_size} needs {rows * nb} "
            f"float16 scales ({rows * nb * 2} bytes), got {len(msg.scales)} bytes"
        )
    if numel == 0:
        return torch.empty(dims, dtype=torch.float32)
    scales = _from_bytes(msg.scales, torch.float16, [rows, nb, 1], rows * nb).to(torch.float32)
    x = q.reshape(rows, last).to(torch.float32)  # [R, N]
    pad = nb * block_size - last
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = (x.view(rows, nb, block_size) * scales).view(rows, nb * block_size)[:, :last]
    return x.reshape(dims)
