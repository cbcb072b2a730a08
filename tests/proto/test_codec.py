"""Tensor codec: exact roundtrips, lossy error bounds, and every malformed message."""

from __future__ import annotations

import pytest
import torch

from swarm_proto import swarm_pb2
from swarm_proto.codec import BLOCK_SIZE, decode, encode, normalize_codec
from swarm_proto.errors import WireError

EXACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@pytest.mark.parametrize("shape", [(5, 576), (3,), (), (0, 4), (2, 3, 7)])
def test_exact_roundtrip_is_bit_identical(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _sample(dtype, shape)
    msg = swarm_pb2.Tensor.FromString(encode(x).SerializeToString())
    y = decode(msg)
    assert y.dtype == dtype
    assert y.shape == x.shape
    assert torch.equal(y, x)


def test_exact_keeps_special_float_values() -> None:
    x = torch.tensor([float("inf"), float("-inf"), -0.0, 1e-45, 3.4e38])
    y = decode(encode(x))
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))
    assert torch.isnan(decode(encode(torch.tensor([float("nan")])))).all()


def test_encode_accepts_non_contiguous_input() -> None:
    x = torch.randn(6, 8).t()
    assert torch.equal(decode(encode(x)), x)


def test_exact_decode_is_zero_copy_unless_asked() -> None:
    msg = encode(torch.randn(4, 8))
    data = msg.data  # the bytes object decode will see
    y = decode(swarm_pb2.Tensor(dtype=msg.dtype, shape=msg.shape, data=data))
    assert y.dtype == torch.float32
    z = decode(msg, copy=True)
    z += 1  # a copy is writable and independent
    assert not torch.equal(z, decode(msg))


@pytest.mark.parametrize("codec,wire,tol", [("fp16", "float16", 1e-3), ("bf16", "bfloat16", 8e-3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_codecs_cast_back_within_tolerance(codec: str, wire: str, tol: float, dtype: torch.dtype) -> None:
    x = (torch.randn(7, 576) * 4).to(dtype)
    msg = encode(x, codec)
    assert msg.dtype == wire
    assert len(msg.data) == x.numel() * 2
    y = decode(msg, dtype)
    assert y.dtype == dtype
    rel = ((y.float() - x.float()).abs() / x.float().abs().clamp(min=1e-3)).max().item()
    assert rel <= tol


@pytest.mark.parametrize("shape", [(3, 576), (2, 5, 128), (4, 100), (1, 7), (10,), ()])
def test_int8_blockwise_error_bound(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape) * 5
    if x.dim() >= 1 and x.shape[-1] > 3:
        x[..., 3] = 300.0  # an outlier only hurts its own block
    msg = encode(x, "int8")
    assert msg.dtype == "int8" and msg.block_size == BLOCK_SIZE
    y = decode(swarm_pb2.Tensor.FromString(msg.SerializeToString()), torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    last = shape[-1] if shape else 1
    xf = x.reshape(-1, last)
    yf = y.reshape(-1, last)
    for start in range(0, last, BLOCK_SIZE):
        blk = xf[:, start : start + BLOCK_SIZE]
        absmax = blk.abs().amax(dim=-1, keepdim=True)
        err = (yf[:, start : start + BLOCK_SIZE] - blk).abs()
        assert (err <= absmax / 254 * 1.01 + absmax * 1e-3).all()
    # the bytes really are ~4x smaller than float32
    assert len(msg.data) == x.numel()


def test_int8_zero_and_empty_blocks() -> None:
    x = torch.zeros(2, 130)
    assert torch.equal(decode(encode(x, "int8")), x)
    e = torch.zeros(0, 64)
    assert decode(encode(e, "int8")).shape == (0, 64)


def test_int8_decodes_to_requested_dtype() -> None:
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = decode(encode(x, "int8"), torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert (y.float() - x.float()).abs().max() < 0.1


def test_lossy_codecs_refuse_integer_tensors() -> None:
    for codec in ("fp16", "bf16", "int8"):
        with pytest.raises(WireError, match="floating"):
            encode(torch.arange(4), codec)


def test_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(WireError, match="cannot travel"):
        encode(torch.zeros(2, dtype=torch.float64))


def test_codec_names() -> None:
    assert normalize_codec("") == "exact"
    assert normalize_codec("bfloat16") == "bf16"
    with pytest.raises(WireError, match="unknown wire codec"):
        normalize_codec("fp8")
    with pytest.raises(WireError, match="unknown wire codec"):
        encode(torch.zeros(1), "zip")


def test_expected_shape_and_wildcards() -> None:
    msg = encode(torch.zeros(3, 8))
    assert decode(msg, shape=(None, 8)).shape == (3, 8)
    with pytest.raises(WireError, match="does not match the expected"):
        decode(msg, shape=(3, 16))
    with pytest.raises(WireError, match="does not match the expected"):
        decode(msg, shape=(3,))


def test_device_argument() -> None:
    y = decode(encode(torch.ones(2)), device="cpu", copy=True)
    assert y.device.type == "cpu"


# --- malformed messages -------------------------------------------------------------


def _raw(dtype: str, shape: list[int], nbytes: int, **kw: object) -> swarm_pb2.Tensor:
    return swarm_pb2.Tensor(dtype=dtype, shape=shape, data=b"\0" * nbytes, **kw)


@pytest.mark.parametrize(
    "msg,match",
    [
        (_raw("float64", [2], 16), "unknown tensor dtype 'float64'"),
        (_raw("", [2], 8), "unknown tensor dtype ''"),
        (_raw("float32", [2, 3], 20), "holds 20 bytes; shape \\[2, 3\\] of torch.float32 needs 24"),
        (_raw("float32", [2, 3], 28), "holds 28 bytes"),
        (_raw("bfloat16", [4], 4), "holds 4 bytes"),
        (_raw("float32", [-1, 4], 0), "negative dimension"),
        (_raw("float32", [1] * 9, 4), "9 dimensions"),
        (_raw("float32", [1 << 40, 1 << 40], 0), "elements; at most"),
        (_raw("float32", [4], 16, block_size=64), "only valid for int8"),
        (_raw("float16", [4], 8, scales=b"\0\0"), "only valid for int8"),
        (_raw("int8", [4], 4), "block_size must be"),
        (_raw("int8", [4], 4, block_size=-3), "block_size must be"),
        (_raw("int8", [4], 4, block_size=1 << 20), "block_size must be"),
        (_raw("int8", [2, 100], 200, block_size=64, scales=b"\0" * 6), "needs 4 float16 scales"),
        (_raw("int8", [2, 100], 199, block_size=64, scales=b"\0" * 8), "holds 199 bytes"),
    ],
)
def test_malformed_messages_raise_wire_error(msg: swarm_pb2.Tensor, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(msg)


def test_wire_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode(_raw("complex64", [1], 8))


def test_max_elements_budget() -> None:
    msg = encode(torch.zeros(10, 10))
    assert decode(msg, max_elements=100).numel() == 100
    with pytest.raises(WireError, match="100 elements; at most 99"):
        decode(msg, max_elements=99)


def test_integer_data_is_not_cast_to_float() -> None:
    with pytest.raises(WireError, match="expected a torch.float32 tensor, got 'int64'"):
        decode(encode(torch.arange(3)), torch.float32)
    with pytest.raises(WireError, match="expected a torch.int64 tensor"):
        decode(encode(torch.zeros(3)), torch.int64)
