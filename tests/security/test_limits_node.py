"""Attacks on a node's data plane, written as an attacker would (raw gRPC against real
NodeServers on loopback), each now refused with a clear status while another user's
generation on the same nodes completes with the tokens a single process produces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from swarm_client.failover import blame
from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_node.admission import Admission
from swarm_node.config import NodeConfig
from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import ModelSlice, SeqChunk
from swarm_node.engine.sampler import sample
from swarm_node.server import NodeServer
from swarm_proto import PROTOCOL_VERSION, swarm_pb2, swarm_pb2_grpc
from swarm_proto.transport import ChannelPool
from swarm_proto.wire import SamplingParams

pytestmark = pytest.mark.timeout(120)

Route = Callable[..., Any]
PROMPT = [5, 17, 33, 2, 90, 101, 7, 250, 12, 44, 3, 8]


@pytest.fixture
async def route(tiny_models: dict[str, Path]) -> AsyncIterator[Route]:
    """route(spans, **config) -> (servers, hops) of in-process NodeServers (real gRPC)."""
    async with AsyncExitStack() as stack:

        async def make(spans: Sequence[tuple[int, int]], **config: Any) -> tuple[list[NodeServer], list[Hop]]:
            servers = []
            for start, end in spans:
                cfg = NodeConfig(model=str(tiny_models["llama3"]), start=start, end=end, node_id=f"n{start}", **config)
                servers.append(await stack.enter_async_context(NodeServer(cfg)))
            return servers, [Hop(s.address, s.config.start, s.config.end, s.config.node_id) for s in servers]

        yield make


def reference(tiny_models: dict[str, Path], n: int) -> list[int]:
    model: ModelSlice = load_slice(tiny_models["llama3"], 0, 6)
    cache = model.new_cache(len(PROMPT) + n + 1)
    history, out = list(PROMPT), []
    logits = model(torch.tensor(PROMPT), [SeqChunk(cache, 0, len(PROMPT))])[0]
    for _ in range(n):
        token, _ = sample(logits, SamplingParams(), len(history), history)
        out.append(token)
        history.append(token)
        logits = model(torch.tensor([token]), [SeqChunk(cache, len(history) - 1, 1)])[0]
    return out


async def victim(hops: Sequence[Hop], n: int = 6) -> list[int]:
    async with RouteSession(hops, max_length=64) as s:
        out = await s.prefill(PROMPT)
        tokens = [out.token]
        for _ in range(n - 1):
            out = await s.decode(tokens[-1])
            tokens.append(out.token)
    return [t for t in tokens if t is not None]


def open_msg(sid: str, hops: Sequence[Hop], max_length: int = 64, **kw: Any) -> swarm_pb2.SessionRequest:
    head = hops[0]
    downstream = [swarm_pb2.Hop(address=h.address, start=h.start, end=h.end) for h in hops[1:]]
    return swarm_pb2.SessionRequest(
        open=swarm_pb2.OpenSession(
            session_id=sid, max_length=max_length, start=head.start, end=head.end, downstream=downstream,
            protocol_version=PROTOCOL_VERSION, **kw,
        )
    )


def step_msg(step_id: int, start_pos: int, tokens: list[int], **kw: Any) -> swarm_pb2.SessionRequest:
    return swarm_pb2.SessionRequest(step=swarm_pb2.Step(step_id=step_id, start_pos=start_pos, tokens=tokens, **kw))


async def released(server: NodeServer, sid: str) -> bool:
    """Whether ``server`` lets go of ``sid`` (it does right after answering the error)."""
    assert server.service is not None
    for _ in range(500):
        if sid not in server.service.sessions:
            return True
        await asyncio.sleep(0.01)
    return False


async def until_error(call: Any) -> swarm_pb2.Error:
    """Read a raw Session stream until its in-band Error."""
    while True:
        reply = await asyncio.wait_for(call.read(), 60)
        assert reply is not grpc.aio.EOF, "the stream ended without an error"
        if reply.WhichOneof("kind") == "error":
            return reply.error


async def test_results_nobody_reads_end_that_session_only(route: Route, tiny_models: dict[str, Path]) -> None:
    servers, hops = await route([(0, 3), (3, 6)], max_pending_results=4)
    async with grpc.aio.insecure_channel(hops[0].address) as ch:
        call = swarm_pb2_grpc.NodeStub(ch).Session()
        await call.write(open_msg("hoarder", hops))
        assert (await call.read()).WhichOneof("kind") == "opened"
        for i in range(12):  # results pile up at the tail: nobody opened Results
            try:
                await call.write(step_msg(i + 1, i, [5], sample=True))
            except grpc.aio.AioRpcError:
                break
        error = await until_error(call)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "unread" in error.message
        call.cancel()
    assert await victim(hops) == reference(tiny_models, 6)
    assert await released(servers[1], "hoarder")


async def test_logits_beyond_the_result_bound_are_refused(route: Route) -> None:
    _, hops = await route([(0, 6)], max_pending_result_bytes=4096)
    async with grpc.aio.insecure_channel(hops[0].address) as ch:
        call = swarm_pb2_grpc.NodeStub(ch).Session()
        await call.write(open_msg("big-logits", hops))
        await call.read()
        await call.write(step_msg(1, 0, PROMPT, return_logits=True))
        error = await until_error(call)
        assert error.code == grpc.StatusCode.OUT_OF_RANGE.value[0] and "shorter steps" in error.message
        call.cancel()


async def test_idle_sessions_give_way_when_the_node_is_full(route: Route, tiny_models: dict[str, Path]) -> None:
    _, hops = await route([(0, 6)], max_sessions=2, idle_evict_after=0.3)
    holders = [RouteSession(hops, max_length=64) for _ in range(2)]
    for h in holders:  # open and step once, then sit on the sessions
        await h.open()
        await h.prefill(PROMPT[:3])
    with pytest.raises(RouteError) as full:  # a third is refused busy while they are fresh
        async with RouteSession(hops, max_length=64):
            pass
    assert full.value.busy
    await asyncio.sleep(0.5)  # longer than --idle-evict-after
    assert await victim(hops) == reference(tiny_models, 6)
    with pytest.raises(RouteError) as evicted:
        await holders[0].decode(3)
    assert evicted.value.code == grpc.StatusCode.ABORTED and "evicted" in evicted.value.message
    for h in holders:
        await h.close()


async def test_sessions_never_stepped_expire_early(route: Route) -> None:
    servers, hops = await route([(0, 6)], open_idle_timeout=0.3, idle_timeout=300.0)
    async with grpc.aio.insecure_channel(hops[0].address) as ch:
        call = swarm_pb2_grpc.NodeStub(ch).Session()
        await call.write(open_msg("squatter", hops))
        await call.read()
        error = await until_error(call)
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "idle" in error.message
        call.cancel()
    assert await released(servers[0], "squatter")


def test_parked_caches_count_against_max_sessions() -> None:
    admission = Admission(budget_bytes=1 << 30, max_sessions=3)
    admission.reserve("open", 1)
    assert admission.refusal(1, parked_bytes=2, parked=1) is None
    busy = admission.refusal(1, parked_bytes=2, parked=2)
    assert busy is not None and "2 parked" in busy.message


@pytest.mark.parametrize("address", ["unix:/tmp/swarm-attack.sock", "unix:80", "dns:///attacker:53", "ipv4:10.0.0.1:22"])
async def test_a_client_cannot_point_a_node_at_any_target(route: Route, address: str) -> None:
    servers, hops = await route([(0, 3)])
    evil = [hops[0], Hop(address, 3, 6)]
    async with grpc.aio.insecure_channel(hops[0].address) as ch:
        call = swarm_pb2_grpc.NodeStub(ch).Session()
        await call.write(open_msg("redirect", evil))
        error = await until_error(call)
        call.cancel()
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "downstream hop" in error.message
    assert len(servers[0].service._channels) == 0  # type: ignore[union-attr]  # never dialed


async def test_channel_pool_keeps_only_a_few_idle_channels() -> None:
    pool = ChannelPool(max_idle=2, idle_timeout_s=60.0)
    held = pool.acquire("127.0.0.1:1")
    for port in range(2, 12):  # caller-named addresses, used once each
        pool.acquire(f"127.0.0.1:{port}")
        pool.release(f"127.0.0.1:{port}")
    assert len(pool) == 3  # the held one and the 2 most recent idle ones
    assert pool.acquire("127.0.0.1:1") is held
    pool.release("127.0.0.1:1")
    pool.release("127.0.0.1:1")  # now unused too: still at most 2 idle
    assert len(pool) == 2
    assert pool.prune(now=1e12) == 2  # idle past the timeout: all closed
    assert len(pool) == 0
    await pool.close()


async def test_a_forged_error_does_not_back_off_an_honest_node(route: Route) -> None:
    _, hops = await route([(0, 3), (3, 6)])
    forged = RouteError(grpc.StatusCode.UNAVAILABLE, "successor died", address=hops[1].address, node_id=hops[1].node_id)
    assert await blame(forged, hops, probe_timeout=2.0) == []  # it answers Info: not believed
    dead = Hop("127.0.0.1:9", 3, 6, "gone")
    real = RouteError(grpc.StatusCode.UNAVAILABLE, "successor died", address=dead.address, node_id=dead.node_id)
    assert await blame(real, [hops[0], dead], probe_timeout=2.0) == [dead]


class _HugeTail(swarm_pb2_grpc.NodeServicer):
    """A hostile tail: opens any session and answers with a 96 MB result."""

    async def Session(self, request_iterator: Any, context: Any) -> AsyncIterator[swarm_pb2.SessionReply]:
        async for req in request_iterator:
            if req.WhichOneof("kind") == "open":
                yield swarm_pb2.SessionReply(opened=swarm_pb2.Opened(session_id=req.open.session_id, max_length=64))

    async def Results(self, request: Any, context: Any) -> AsyncIterator[swarm_pb2.Result]:
        big = swarm_pb2.Tensor(dtype="float32", shape=[24 << 20], data=bytes(96 << 20))
        yield swarm_pb2.Result(session_id=request.session_id, step_id=1, token=3, logits=big)


async def test_a_client_refuses_oversized_replies_from_a_tail() -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 30)])
    swarm_pb2_grpc.add_NodeServicer_to_server(_HugeTail(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with RouteSession([Hop(f"127.0.0.1:{port}", 0, 6)], max_length=64, timeout=30) as s:
            with pytest.raises(RouteError) as err:
                await s.prefill(PROMPT)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)


def test_the_node_counts_evicted_and_unread_sessions() -> None:
    from swarm_node.metrics import outcome

    assert outcome("failed: evicted: idle for 40 s while the node was full (--idle-evict-after 30 s)") == "evicted"
    assert outcome("refused: 256 results (1.0 MB) wait unread at the tail (at most 256 and 67.1 MB): read ...") == "unread"
    assert outcome("refused: step 3 carries no tokens") == "invalid"
