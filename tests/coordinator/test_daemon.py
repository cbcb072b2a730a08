"""The coordinator daemon in-process (embedded broker on loopback, real gRPC), with
stand-in nodes: presence clients that host whatever they are assigned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from swarm_coordinator.config import CoordinatorConfig
from swarm_coordinator.planner import decide
from swarm_coordinator.server import CoordinatorServer
from swarm_coordinator.state import SwarmState
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.presence import Assign, LayerRange, NodeLoad, NodeState, NodeStatus
from swarm_proto.presence_client import BrokerAddress, PresenceClient

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20


class FakeNode:
    """Announces itself and 'loads' every assignment at once (no model)."""

    def __init__(self, broker: str, swarm_id: str, status: NodeStatus) -> None:
        self.assigned: list[LayerRange | None] = []
        self.presence = PresenceClient(
            BrokerAddress.parse(broker), swarm_id, status, on_assign=self._on_assign, load_interval=0.3, keepalive=2,
            load=lambda: NodeLoad(free_kv_tokens=4096),
        )

    async def _on_assign(self, assign: Assign) -> None:
        self.assigned.append(assign.layers)
        status = self.presence.status
        state = NodeState.READY if assign.layers else NodeState.STARTING
        await self.presence.set_status(replace(status, hosted=assign.layers, state=state))


Join = Callable[..., Awaitable[FakeNode]]


@pytest.fixture
async def coordinator(default_model: Path) -> AsyncIterator[tuple[CoordinatorServer, Join]]:
    config = CoordinatorConfig(model=str(default_model), port=0, mqtt_port=0, swarm_id="unit", settle=0.2, keepalive=2)
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(CoordinatorServer(config))

        async def join(node_id: str, speed: float, layers_budget: int, **kw: object) -> FakeNode:
            bpl = server.state.bytes_per_layer
            status = NodeStatus(node_id, address=f"127.0.0.1:{1000 + ord(node_id[0])}", model=server.state.model,
                                speed=speed, memory_budget=layers_budget * bpl, **kw)  # type: ignore[arg-type]
            node = FakeNode(server.broker_url, "unit", status)
            await stack.enter_async_context(node.presence)
            return node

        yield server, join


async def until(server: CoordinatorServer, predicate: Callable[[SwarmState], bool], timeout: float = 10.0) -> SwarmState:
    return await server.registry.wait_until(predicate, timeout)


def ready_cover(state: SwarmState) -> bool:
    ranges = [v.serving for v in state.online() if v.serving is not None]
    return all(any(r.start <= layer < r.end for r in ranges) for layer in range(state.num_layers))


async def test_join_assign_route_and_list(coordinator: tuple[CoordinatorServer, Join]) -> None:
    server, join = coordinator
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = swarm_pb2_grpc.CoordinatorStub(channel)
        info = await stub.GetSwarmInfo(swarm_pb2.SwarmInfoRequest())
        assert info.swarm_id == "unit" and info.num_layers == 30 and info.mqtt_url == server.advertised_mqtt_url
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRoute(swarm_pb2.RouteRequest(max_length=8))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        nodes = [await join("a", 300.0, 30), await join("b", 200.0, 30), await join("c", 100.0, 8)]
        state = await until(server, ready_cover)
        assignment = state.current_assignment()
        assert assignment == decide(state)  # what the nodes were told is the plan for what they announced
        sizes = {n: len(r) for n, r in assignment.items()}
        assert sizes["a"] > sizes["b"] > 0 and 0 < sizes["c"] <= 8
        assert all(n.assigned for n in nodes)

        route = await stub.GetRoute(swarm_pb2.RouteRequest(max_length=8))
        assert [h.start for h in route.hops][0] == 0 and route.hops[-1].end == 30 and route.session_id
        assert all(h.end == nxt.start for h, nxt in zip(route.hops, route.hops[1:]))
        listed = await stub.ListNodes(swarm_pb2.ListNodesRequest())
        assert {(n.node_id, n.start, n.end) for n in listed.nodes} == {(n, r.start, r.end) for n, r in assignment.items()}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRoute(swarm_pb2.RouteRequest(model="other"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # the client's round trips: bounded, finite, and used
        near = await stub.GetRoute(swarm_pb2.RouteRequest(client_rtt_s={"a": 0.01, "b": 0.3, "c": 0.3}))
        assert near.expected_step_s > route.expected_step_s
        for bad in ({"a": -1.0}, {"a": float("nan")}, {"a": 1e9}, {f"n{i}": 0.1 for i in range(65)}):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetRoute(swarm_pb2.RouteRequest(client_rtt_s=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_failures_steer_routes_and_joiners_do_not_reshuffle(coordinator: tuple[CoordinatorServer, Join]) -> None:
    server, join = coordinator
    for name in ("a", "b", "c"):
        await join(name, 100.0, 30)
    state = await until(server, ready_cover)
    before = state.current_assignment()
    plans = server.planner.plans if server.planner else 0

    # A pinned node serving everything: routing may use it, planning leaves it alone.
    whole = LayerRange(0, 30)
    pinned = await join("p", 1000.0, 30, hosted=whole, state=NodeState.READY, pinned=True)
    await until(server, lambda s: "p" in s.nodes and s.nodes["p"].serving == whole)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = swarm_pb2_grpc.CoordinatorStub(channel)
        assert [h.node_id for h in (await stub.GetRoute(swarm_pb2.RouteRequest())).hops] == ["p"]
        await stub.ReportFailure(swarm_pb2.FailureReport(node_id="p", code=swarm_pb2.UNAVAILABLE, message="gone"))
        avoid = await stub.GetRoute(swarm_pb2.RouteRequest())
        assert "p" not in [h.node_id for h in avoid.hops]
        # reported by address only, and excluded by the client: still routed around
        a_address = server.state.nodes["a"].address
        await stub.ReportFailure(swarm_pb2.FailureReport(address=a_address))
        assert server.service is not None and server.service.failures.count("a") == 1
        asked = await stub.GetRoute(swarm_pb2.RouteRequest(exclude_node_ids=["b"]))
        assert "b" not in [h.node_id for h in asked.hops]  # p and a are backed off, but nothing else covers b's layers
    assert pinned.assigned == []

    # A slow joiner into a covered swarm becomes a partial replica; nobody else moves.
    await join("d", 20.0, 30)
    await until(server, lambda s: "d" in s.current_assignment())
    await asyncio.sleep(0.5)
    after = server.state.current_assignment()
    assert {n: after[n] for n in "abc"} == {n: before[n] for n in "abc"}
    assert server.planner is not None and server.planner.plans == plans + 1


async def test_swarm_token_guards_the_coordinator(default_model: Path) -> None:
    """With a swarm token every gRPC call must carry it; the client library sends it."""
    from swarm_client.routed import CoordinatorRoutes

    config = CoordinatorConfig(model=str(default_model), port=0, mqtt_port=0, swarm_id="locked", settle=0.2, token="s3cret")
    async with CoordinatorServer(config) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = swarm_pb2_grpc.CoordinatorStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetSwarmInfo(swarm_pb2.SwarmInfoRequest(), metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = await stub.GetSwarmInfo(swarm_pb2.SwarmInfoRequest(), metadata=(("authorization", "Bearer s3cret"),))
            assert info.swarm_id == "locked"
        routes = CoordinatorRoutes(server.address, token="s3cret")
        assert await routes.list_nodes() == []
        await routes.aclose()
        assert "s3cret" not in repr(config)


async def test_evidence_quarantines_a_node_for_good(coordinator: tuple[CoordinatorServer, Join]) -> None:
    server, join = coordinator
    whole = LayerRange(0, 30)
    for name, speed in (("p", 1000.0), ("q", 100.0), ("r", 100.0)):
        await join(name, speed, 30, hosted=whole, state=NodeState.READY, pinned=True)
    await until(server, lambda s: all(n in s.nodes and s.nodes[n].serving == whole for n in "pqr"))
    observer_events = server.registry.events
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = swarm_pb2_grpc.CoordinatorStub(channel)
        assert [h.node_id for h in (await stub.GetRoute(swarm_pb2.RouteRequest())).hops] == ["p"]
        evidence = swarm_pb2.Evidence(position=7, start=0, end=30, detail="values differ", claimed=[1.3], recomputed=[1.0])
        # One known witness is not enough (a single client's word, or an unknown node's).
        weak = swarm_pb2.Evidence()
        weak.CopyFrom(evidence)
        weak.witnesses.extend(["q", "nobody"])
        await stub.ReportFailure(swarm_pb2.FailureReport(node_id="p", code=swarm_pb2.DATA_LOSS, evidence=weak))
        assert server.service is not None and not server.service.quarantined
        evidence.witnesses.extend(["q", "r"])
        await stub.ReportFailure(swarm_pb2.FailureReport(node_id="p", code=swarm_pb2.DATA_LOSS, evidence=evidence))
        assert set(server.service.quarantined) == {"p"}
        for _ in range(3):  # unlike a failure's backoff, never used again, even when asked without exclusions
            assert "p" not in [h.node_id for h in (await stub.GetRoute(swarm_pb2.RouteRequest())).hops]
        assert "p" not in {n.node_id for n in (await stub.ListNodes(swarm_pb2.ListNodesRequest())).nodes}
        deadline = asyncio.get_running_loop().time() + 5
        while not any(e.kind.value == "quarantine" for e in observer_events):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        event = next(e for e in observer_events if e.kind.value == "quarantine")
        assert event.node_id == "p" and "position 7" in event.detail and "q, r" in event.detail
