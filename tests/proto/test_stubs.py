"""The generated stubs carry the protocol over a real loopback gRPC server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import torch

from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.codec import decode, encode
from swarm_proto.wire import code_name, status_code, wire_code


class _EchoNode(swarm_pb2_grpc.NodeServicer):
    """Answers Opened, then answers each step with an in-band error naming it."""

    async def Info(self, request: swarm_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> swarm_pb2.NodeInfo:
        return swarm_pb2.NodeInfo(node_id="n1", start=0, end=4, num_layers=8)

    async def Session(
        self, request_iterator: AsyncIterator[swarm_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swarm_pb2.SessionReply]:
        async for req in request_iterator:
            kind = req.WhichOneof("kind")
            if kind == "open":
                yield swarm_pb2.SessionReply(opened=swarm_pb2.Opened(session_id=req.open.session_id))
            elif kind == "step":
                hidden = decode(req.step.hidden, torch.float32, shape=(len(req.step.tokens), None))
                error = swarm_pb2.Error(code=swarm_pb2.ABORTED, step_id=req.step.step_id + int(hidden.sum()))
                yield swarm_pb2.SessionReply(error=error)
            else:
                return


async def test_session_stream_roundtrip() -> None:
    server = grpc.aio.server()
    swarm_pb2_grpc.add_NodeServicer_to_server(_EchoNode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = swarm_pb2_grpc.NodeStub(channel)
            info = await stub.Info(swarm_pb2.InfoRequest())
            assert (info.start, info.end, info.num_layers) == (0, 4, 8)

            call = stub.Session()
            await call.write(
                swarm_pb2.SessionRequest(
                    open=swarm_pb2.OpenSession(
                        session_id="s1",
                        max_length=32,
                        downstream=[swarm_pb2.Hop(address="127.0.0.1:1", start=4, end=8)],
                        sampling=swarm_pb2.SamplingParams(temperature=0.7, seed=3, stop_token_ids=[2]),
                        wire_dtype="bf16",
                    )
                )
            )
            reply = await call.read()
            assert reply.WhichOneof("kind") == "opened" and reply.opened.session_id == "s1"
            step = swarm_pb2.Step(step_id=1, start_pos=0, tokens=[5, 6], hidden=encode(torch.ones(2, 3)), sample=True)
            await call.write(swarm_pb2.SessionRequest(step=step))
            reply = await call.read()
            assert reply.error.step_id == 1 + 6
            await call.write(swarm_pb2.SessionRequest(close=swarm_pb2.Close()))
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
    finally:
        await server.stop(None)


def test_result_token_presence_is_explicit() -> None:
    r = swarm_pb2.Result(session_id="s", step_id=1, position=4)
    assert not r.HasField("token")
    r.token = 0  # token id 0 is a real token, distinct from "not sampled"
    assert r.HasField("token")


def test_error_codes_mirror_grpc_status_codes() -> None:
    for status in grpc.StatusCode:
        if status is grpc.StatusCode.OK:
            continue
        code, _ = status.value
        assert swarm_pb2.ErrorCode.Name(code) == status.name


def test_status_mapping_round_trips() -> None:
    for status in grpc.StatusCode:
        if status is grpc.StatusCode.OK:
            continue
        assert status_code(wire_code(status)) is status
        assert code_name(wire_code(status)) == status.name
    assert status_code(swarm_pb2.Error(code=swarm_pb2.RESOURCE_EXHAUSTED)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # An error always names a failure: OK and numbers no status has read as UNKNOWN.
    assert status_code(swarm_pb2.Error(code=99)) == grpc.StatusCode.UNKNOWN
    assert status_code(0) == grpc.StatusCode.UNKNOWN
    assert code_name(99) == "99"
