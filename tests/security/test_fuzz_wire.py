"""Property-based fuzzing of what peers send: the tensor codec, the node's checks of
Open and Step messages, and the msgpack presence payloads.

Each property runs at least 500 generated examples in process. A malformed input must
be refused with the module's own error (WireError / ProtocolError / PayloadError),
never crash with anything else, and never build a tensor bigger than its bounds.
"""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_node import convert
from swarm_node.convert import ProtocolError
from swarm_proto import PROTOCOL_VERSION, codec, presence, swarm_pb2
from swarm_proto.errors import WireError
from swarm_proto.presence import PayloadError, Topics

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HIDDEN, VOCAB, MAX_T = 8, 32, 16

dtypes = st.sampled_from(["float32", "float16", "bfloat16", "int64", "int32", "int8", "", "float64", "x" * 40])
shapes = st.lists(st.integers(min_value=-3, max_value=2**40), max_size=6)
raw = st.binary(max_size=512)


@st.composite
def tensors(draw: st.DrawFn) -> swarm_pb2.Tensor:
    return swarm_pb2.Tensor(
        dtype=draw(dtypes),
        shape=draw(shapes),
        data=draw(raw),
        scales=draw(st.binary(max_size=64)),
        block_size=draw(st.integers(min_value=-5, max_value=2**31 - 1)),
    )


@FUZZ
@given(msg=tensors(), want=st.sampled_from([None, torch.float32, torch.bfloat16, torch.int64]))
def test_codec_decode_refuses_or_respects_bounds(msg: swarm_pb2.Tensor, want: torch.dtype | None) -> None:
    try:
        out = codec.decode(msg, want, max_elements=4096)
    except WireError:
        return
    assert out.numel() <= 4096
    assert list(out.shape) == list(msg.shape)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_codec_of_arbitrary_bytes(data: bytes) -> None:
    try:
        msg = swarm_pb2.Tensor.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError: gRPC refuses such bytes before us
        return
    try:
        codec.decode(msg, torch.float32, shape=(None, HIDDEN), max_elements=MAX_T * HIDDEN)
    except WireError:
        pass


hops = st.builds(
    swarm_pb2.Hop,
    address=st.one_of(st.text(max_size=40), st.sampled_from(["b:1", "unix:/x", "dns:///a:1", "[::1]:7", "c:2"])),
    start=st.integers(-2, 10),
    end=st.integers(-2, 10),
    node_id=st.text(max_size=20),
)


@st.composite
def opens(draw: st.DrawFn) -> swarm_pb2.OpenSession:
    return swarm_pb2.OpenSession(
        session_id=draw(st.text(max_size=150)),
        max_length=draw(st.integers(-(2**31), 2**31 - 1)),
        downstream=draw(st.lists(hops, max_size=4)),
        sampling=swarm_pb2.SamplingParams(
            temperature=draw(st.floats(allow_nan=True, width=32)),
            top_k=draw(st.integers(-(2**31), 2**31 - 1)),
            top_p=draw(st.floats(allow_nan=True, width=32)),
            repetition_penalty=draw(st.floats(allow_nan=True, width=32)),
            seed=draw(st.integers(0, 2**64 - 1)),
            stop_token_ids=draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)),
            max_new_tokens=draw(st.integers(-(2**31), 2**31 - 1)),
            top_logprobs=draw(st.integers(-(2**31), 2**31 - 1)),
        ),
        wire_dtype=draw(st.sampled_from(["", "exact", "fp16", "bf16", "int8", "nope"])),
        prompt_length=draw(st.integers(-(2**31), 2**31 - 1)),
        start=draw(st.integers(-2, 10)),
        end=draw(st.integers(-2, 10)),
        resumable=draw(st.booleans()),
        resume=draw(st.booleans()),
        protocol_version=draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 99])),
        capability=draw(st.text(max_size=140)),
    )


@FUZZ
@given(msg=opens())
def test_open_is_refused_or_valid(msg: swarm_pb2.OpenSession) -> None:
    try:
        spec = convert.open_from_proto(msg, start=0, end=4, num_layers=8, max_length=64)
    except ProtocolError as exc:
        assert exc.message
        return
    assert 0 < spec.max_length <= 64 and 0 <= spec.start < spec.end <= 4
    assert all(":" in h.address and not h.address.startswith(("unix:", "dns:")) for h in spec.downstream)
    assert not spec.resume or spec.capability


@st.composite
def steps(draw: st.DrawFn) -> swarm_pb2.Step:
    msg = swarm_pb2.Step(
        step_id=draw(st.integers(0, 2**64 - 1)),
        start_pos=draw(st.integers(-(2**31), 2**31 - 1)),
        tokens=draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=MAX_T + 4)),
        sample=draw(st.booleans()),
        return_logits=draw(st.booleans()),
        replay=draw(st.booleans()),
    )
    if draw(st.booleans()):
        msg.hidden.CopyFrom(draw(tensors()))
    return msg


@FUZZ
@given(msg=steps(), head=st.booleans())
def test_step_is_refused_or_valid(msg: swarm_pb2.Step, head: bool) -> None:
    try:
        step = convert.step_from_proto(
            msg, is_head=head, hidden_size=HIDDEN, vocab_size=VOCAB, dtype=torch.float32, max_tokens=MAX_T
        )
    except ProtocolError as exc:
        assert exc.message
        return
    assert 0 < step.length <= MAX_T and step.start_pos >= 0
    assert int(step.tokens.min()) >= 0 and int(step.tokens.max()) < VOCAB
    assert (step.hidden is None) == head
    if step.hidden is not None:
        assert tuple(step.hidden.shape) == (step.length, HIDDEN)


TOPICS = Topics("fuzz")
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
keys = st.sampled_from(
    ["v", "node_id", "address", "model", "state", "hosted", "device", "memory_bytes", "speed", "active_sessions",
     "queued_steps", "free_kv_tokens", "sessions", "epoch", "start", "end", "kind", "detail", "ts"]
)
payloads = st.one_of(
    st.binary(max_size=256),
    st.dictionaries(st.one_of(keys, st.text(max_size=8)), values, max_size=12).map(
        lambda d: msgpack.packb(d, use_bin_type=True) if _packable(d) else b"\xc1"
    ),
)


def _packable(obj: object) -> bool:
    try:
        msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


@FUZZ
@given(
    data=payloads,
    topic=st.sampled_from([TOPICS.status("n1"), TOPICS.load("n1"), TOPICS.assign("n1"), TOPICS.events, "swarm/fuzz/x/y"]),
)
def test_presence_payloads_are_refused_or_valid(data: bytes, topic: str) -> None:
    try:
        presence.decode(TOPICS, topic, data)
    except PayloadError:
        pass


@pytest.mark.parametrize("topic", [TOPICS.status("n1"), TOPICS.load("n1"), TOPICS.assign("n1"), TOPICS.events])
def test_an_oversized_payload_is_refused(topic: str) -> None:
    bomb = msgpack.packb({"v": 1, "node_id": "n1", "sessions": [[0] * 8] * 100_000})
    with pytest.raises(PayloadError):
        presence.decode(TOPICS, topic, bomb)


def test_an_empty_tensor_with_huge_dimensions_is_refused() -> None:
    # found by the fuzzer above: 0 elements, but torch's strides overflow on the rest
    msg = swarm_pb2.Tensor(dtype="float32", shape=[0, 2**40, 2**40], data=b"")
    with pytest.raises(WireError, match="dimension"):
        codec.decode(msg, max_elements=4096)
