"""Session capabilities: knowing a session's id (it used to be published on the
dashboard feed) no longer lets anyone read its results or take it over with a resume;
and what the swarm publishes names sessions by a label, never by their id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_coordinator.rpc import check_report, failover_detail
from swarm_node.config import NodeConfig
from swarm_node.server import NodeServer
from swarm_proto import PROTOCOL_VERSION, swarm_pb2, swarm_pb2_grpc
from swarm_proto.wire import session_label

pytestmark = pytest.mark.timeout(120)
PROMPT = [5, 17, 33, 2, 90, 101, 7, 250]


@pytest.fixture
async def node(tiny_models: dict[str, Path]) -> AsyncIterator[NodeServer]:
    async with NodeServer(NodeConfig(model=str(tiny_models["llama3"]), start=0, end=6, node_id="n0")) as server:
        yield server


async def _results(address: str, sid: str, capability: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            async for _ in swarm_pb2_grpc.NodeStub(ch).Results(swarm_pb2.ResultsRequest(session_id=sid, capability=capability)):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_a_session_id_alone_opens_nothing(node: NodeServer) -> None:
    hop = Hop(node.address, 0, 6, "n0")
    async with RouteSession([hop], max_length=64, resumable=True) as s:
        first = await s.prefill(PROMPT)
        sid = s.session_id  # what an eavesdropper of the old dashboard feed knew
        for guess in ("", "guess", s.capability[:-1]):
            assert await _results(node.address, sid, guess) == grpc.StatusCode.PERMISSION_DENIED
        # A resume names the session too: without its capability it is refused, and the
        # victim's session is neither ended nor parked.
        async with grpc.aio.insecure_channel(node.address) as ch:
            call = swarm_pb2_grpc.NodeStub(ch).Session()
            takeover = swarm_pb2.OpenSession(
                session_id=sid, max_length=64, start=0, end=6, resume=True, resumable=True,
                protocol_version=PROTOCOL_VERSION, capability="stolen",
            )
            await call.write(swarm_pb2.SessionRequest(open=takeover))
            reply = await call.read()
            assert reply.WhichOneof("kind") == "error" and reply.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            call.cancel()
        # The victim goes on, with the tokens it would have had anyway.
        out = await s.decode(first.token or 0)
        assert out.token is not None and out.position == len(PROMPT) + 1
    assert node.service is not None and sid not in node.service.sessions


def test_published_session_names_are_labels() -> None:
    sid = "0123456789abcdef0123456789abcdef"
    label = session_label(sid)
    assert label == session_label(sid) and sid not in label and sid[:8] not in label
    report = swarm_pb2.FailureReport(
        session_id=sid, node_id="n1", code=14, message="x" * 5000, recovered=True, mode="span"
    )
    assert check_report(report)  # 4 MB strings are refused, 5000 characters too
    report.message = "bad\x1b[2Jnews\n" + "y" * 300
    assert not check_report(report)
    detail = failover_detail(report)
    assert sid not in detail and label in detail
    assert "\x1b" not in detail and "\n" not in detail and len(detail) < 400
    report.node_id = "n" * 300
    assert "node_id" in check_report(report)


async def test_a_parked_cache_is_adopted_only_with_its_capability(node: NodeServer) -> None:
    hop = Hop(node.address, 0, 6, "n0")
    s = RouteSession([hop], max_length=64, resumable=True)
    await s.open()
    await s.prefill(PROMPT)
    assert s._head is not None
    s._head.cancel()  # the client vanishes: the node parks the session's cache for a resume
    await s.close()
    assert node.service is not None
    for _ in range(200):
        if len(node.service.parking):
            break
        await asyncio.sleep(0.01)
    assert len(node.service.parking) == 1
    with pytest.raises(RouteError) as denied:  # a thief who knows the id
        async with RouteSession([hop], max_length=64, session_id=s.session_id, resume=True, capability="stolen"):
            pass
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert len(node.service.parking) == 1  # still held for its owner
    async with RouteSession([hop], max_length=64, session_id=s.session_id, resume=True, capability=s.capability) as owner:
        assert owner.kept == (len(PROMPT),)
        out = await owner.replay(PROMPT)
        assert out.token is not None
