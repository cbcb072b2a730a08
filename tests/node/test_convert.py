"""Proto <-> domain conversion and the checks that need no session state."""

from __future__ import annotations

import grpc
import pytest
import torch

from swarm_node.convert import (
    ProtocolError,
    StepResult,
    open_from_proto,
    result_to_proto,
    sampling_from_proto,
    step_from_proto,
)
from swarm_proto import PROTOCOL_VERSION, codec, swarm_pb2
from swarm_proto.wire import Generation, Hop, OpenSpec, SamplingParams, open_to_proto, sampling_to_proto


def _open(**kw: object) -> swarm_pb2.OpenSession:
    base: dict[str, object] = dict(
        session_id="s", max_length=64, start=0, end=2, downstream=[swarm_pb2.Hop(address="b:1", start=2, end=4)],
        protocol_version=PROTOCOL_VERSION,
    )
    base.update(kw)
    return swarm_pb2.OpenSession(**base)  # type: ignore[arg-type]


def test_open_roundtrip_strips_the_next_hop() -> None:
    spec = open_from_proto(
        _open(
            downstream=[swarm_pb2.Hop(address="b:1", start=2, end=3, node_id="b"), swarm_pb2.Hop(address="c:1", start=3, end=4)],
            sampling=swarm_pb2.SamplingParams(temperature=0.7, top_k=5, seed=2**63 + 1, stop_token_ids=[2, 7]),
            wire_dtype="bf16",
            prompt_length=9,
        ),
        start=0,
        end=2,
        num_layers=4,
        max_length=128,
    )
    assert spec.downstream == (Hop("b:1", 2, 3, "b"), Hop("c:1", 3, 4))
    assert spec.generation.sampling == SamplingParams(temperature=0.7, top_k=5, seed=2**63 + 1)
    assert spec.generation.stop_token_ids == (2, 7) and spec.generation.prompt_length == 9
    nxt = open_to_proto(spec, spec.downstream)
    assert (nxt.start, nxt.end, [h.address for h in nxt.downstream]) == (2, 3, ["c:1"])
    assert nxt.sampling.temperature == 0.7  # a double on the wire: exact
    assert nxt.wire_dtype == "bf16" and nxt.prompt_length == 9
    assert nxt.protocol_version == PROTOCOL_VERSION  # every sender says which protocol it speaks


def test_sampling_zero_means_off() -> None:
    gen = sampling_from_proto(swarm_pb2.SamplingParams())
    assert gen.sampling == SamplingParams()
    back = sampling_from_proto(sampling_to_proto(Generation(SamplingParams(temperature=1.5, top_p=0.5, repetition_penalty=1.2, seed=3))))
    assert back.sampling == SamplingParams(temperature=1.5, top_p=0.5, repetition_penalty=1.2, seed=3)


@pytest.mark.parametrize(
    "kw,code,match",
    [
        (dict(protocol_version=PROTOCOL_VERSION + 1), grpc.StatusCode.FAILED_PRECONDITION,
         f"wire protocol {PROTOCOL_VERSION + 1}, this node speaks wire protocol {PROTOCOL_VERSION}"),
        (dict(session_id=""), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (dict(session_id="x" * 200), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (dict(session_id="a\nb"), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (dict(max_length=0), grpc.StatusCode.INVALID_ARGUMENT, "max_length"),
        (dict(max_length=129), grpc.StatusCode.OUT_OF_RANGE, "max_length must be in 1..128"),
        (dict(end=3), grpc.StatusCode.FAILED_PRECONDITION, "this node hosts \\[0, 2\\)"),
        (dict(downstream=[]), grpc.StatusCode.INVALID_ARGUMENT, "route ends at layer 2, the model has 4"),
        (dict(downstream=[swarm_pb2.Hop(address="b:1", start=3, end=4)]), grpc.StatusCode.INVALID_ARGUMENT, "consecutive"),
        (dict(downstream=[swarm_pb2.Hop(address="", start=2, end=4)]), grpc.StatusCode.INVALID_ARGUMENT, "without an address"),
        (dict(downstream=[swarm_pb2.Hop(address="b:1", start=2, end=2), swarm_pb2.Hop(address="c:1", start=2, end=4)]), grpc.StatusCode.INVALID_ARGUMENT, "consecutive"),
        (dict(downstream=[swarm_pb2.Hop(address="unix:/tmp/sock", start=2, end=4)]), grpc.StatusCode.INVALID_ARGUMENT, "host:port"),
        (dict(downstream=[swarm_pb2.Hop(address="dns:///evil:53", start=2, end=4)]), grpc.StatusCode.INVALID_ARGUMENT, "host name"),
        (dict(downstream=[swarm_pb2.Hop(address="unix:80", start=2, end=4)]), grpc.StatusCode.INVALID_ARGUMENT, "resolver"),
        (dict(resume=True), grpc.StatusCode.PERMISSION_DENIED, "capability"),
        (dict(capability="x" * 200), grpc.StatusCode.INVALID_ARGUMENT, "capability"),
        (dict(wire_dtype="fp4"), grpc.StatusCode.INVALID_ARGUMENT, "unknown wire codec"),
        (dict(prompt_length=-1), grpc.StatusCode.INVALID_ARGUMENT, "prompt_length"),
        (dict(sampling=swarm_pb2.SamplingParams(temperature=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (dict(sampling=swarm_pb2.SamplingParams(top_k=-1)), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (dict(sampling=swarm_pb2.SamplingParams(repetition_penalty=-2)), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
    ],
)
def test_bad_opens(kw: dict[str, object], code: grpc.StatusCode, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as err:
        open_from_proto(_open(**kw), start=0, end=2, num_layers=4, max_length=128)
    assert err.value.code == code


def _step(**kw: object) -> swarm_pb2.Step:
    return swarm_pb2.Step(step_id=1, start_pos=0, **kw)  # type: ignore[arg-type]


def test_step_decodes_to_the_compute_dtype() -> None:
    msg = _step(tokens=[1, 2], hidden=codec.encode(torch.randn(2, 8), "bf16"))
    step = step_from_proto(msg, is_head=False, hidden_size=8, vocab_size=10, dtype=torch.float16, max_tokens=16)
    assert step.hidden is not None and step.hidden.dtype == torch.float16 and step.length == 2
    head = step_from_proto(_step(tokens=[3]), is_head=True, hidden_size=8, vocab_size=10, dtype=torch.float32, max_tokens=16)
    assert head.hidden is None and head.tokens.tolist() == [3]


def test_result_keeps_token_zero_distinct_from_no_token() -> None:
    with_zero = result_to_proto(StepResult("s", 1, 5, token=0))
    without = result_to_proto(StepResult("s", 1, 5, logits=torch.zeros(1, 4)))
    assert with_zero.HasField("token") and not without.HasField("token")
    assert codec.decode(without.logits).shape == (1, 4)


def test_spec_is_frozen() -> None:
    spec = OpenSpec("s", 4, 0, 1, (), Generation(), "exact")
    with pytest.raises(AttributeError):
        spec.max_length = 5  # type: ignore[misc]


def test_drafts_are_checked_and_travel_on() -> None:
    from swarm_node.convert import step_to_proto

    def decode(**kw: object) -> object:
        msg = swarm_pb2.Step(**{"step_id": 1, "tokens": [3, 4, 5], "sample": True, **kw})  # type: ignore[arg-type]
        return step_from_proto(msg, is_head=True, hidden_size=8, vocab_size=10, dtype=torch.float32, max_tokens=128)

    step = decode(draft=2)
    assert step.draft == 2  # type: ignore[attr-defined]
    assert step_to_proto(step, torch.zeros(3, 8), "exact").draft == 2  # type: ignore[arg-type]
    for bad in ({"draft": 3}, {"draft": -1}, {"draft": 1, "sample": False}, {"draft": 1, "replay": True}):
        with pytest.raises(ProtocolError, match="draft") as err:
            decode(**bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ProtocolError, match="draft"):
        step_from_proto(swarm_pb2.Step(step_id=1, tokens=[3] * 100, sample=True, draft=99), is_head=True,
                        hidden_size=8, vocab_size=10, dtype=torch.float32, max_tokens=128)  # fmt: skip
    r = result_to_proto(StepResult("s", 1, 12, 7, -0.1, (), False, None, ((4, -0.2), (5, -0.3))))
    assert list(r.accepted) == [4, 5] and [round(x, 3) for x in r.accepted_logprobs] == [-0.2, -0.3]
