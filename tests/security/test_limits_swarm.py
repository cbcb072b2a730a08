"""Attacks on a running swarm (a coordinator with its gateway and API keys, and a node,
all real processes), each made harmless: the attacker gets a clear error while a
user's completion through the gateway stays the same greedy text."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e.gateway_helpers import Swarm, get_json, start_swarm

from swarm_client.remote import Hop, RouteSession
from swarm_proto import PROTOCOL_VERSION, swarm_pb2, swarm_pb2_grpc
from swarm_proto.wire import session_label

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "sk-owner"
PROMPT = "The three primary colors are"
N = 8


@pytest.fixture(scope="module")
def swarm(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    logs = tmp_path_factory.mktemp("security-swarm")
    swarm = start_swarm(
        default_model, 1, logs, coordinator_args=["--api-key", KEY, "--max-body-bytes", "65536"],
        node_args=["--max-sessions", "3", "--idle-evict-after", "2", "--max-pending-results", "8"], key=KEY,
    )
    try:
        yield swarm
    finally:
        swarm.stop()


def http(swarm: Swarm, path: str, body: Any = None, *, key: str = KEY, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    request = urllib.request.Request(swarm.url + path, data=data, headers=hdrs, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def complete(swarm: Swarm) -> str:
    model = get_json(swarm.url + "/v1/models", KEY)["data"][0]["id"]
    status, body = http(swarm, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0})
    assert status == 200, body
    return str(json.loads(body)["choices"][0]["text"])


@pytest.fixture(scope="module")
def expected(swarm: Swarm) -> str:
    return complete(swarm)


def node_hop(swarm: Swarm) -> Hop:
    node = get_json(swarm.url + "/dashboard/state", KEY)["nodes"][0]
    return Hop(node["address"], 0, 30, node["id"])


def test_gateway_bounds_on_the_daemon(swarm: Swarm, expected: str) -> None:
    status, body = http(swarm, "/v1/completions", b"{" + b" " * 100_000 + b"}")
    assert status == 413 and b"request_too_large" in body
    status, body = http(swarm, "/v1/models", headers={"Host": "rebind.attacker.example"})
    assert status == 400 and b"invalid_host" in body
    for path in ("/dashboard/state", "/metrics"):
        assert http(swarm, path, key="")[0] == 401
    status, page = http(swarm, "/", key="")
    assert status == 200 and b"/dashboard/login" in page
    assert json.loads(http(swarm, "/healthz", key="")[1]) == {"status": "ok"}
    status, body = http(swarm, "/v1/completions", {"model": "x", "prompt": "a", "seed": 2**64})
    assert status == 400 and json.loads(body)["error"]["param"] == "seed"
    assert complete(swarm) == expected


def test_results_nobody_reads_do_not_pile_up_on_the_node(swarm: Swarm, expected: str) -> None:
    hop = node_hop(swarm)

    async def attack() -> swarm_pb2.Error:
        async with grpc.aio.insecure_channel(hop.address) as ch:
            call = swarm_pb2_grpc.NodeStub(ch).Session()
            await call.write(swarm_pb2.SessionRequest(open=swarm_pb2.OpenSession(
                session_id="hoarder", max_length=256, start=0, end=30, protocol_version=PROTOCOL_VERSION)))
            assert (await call.read()).WhichOneof("kind") == "opened"
            for i in range(40):  # never opens Results
                try:
                    await call.write(swarm_pb2.SessionRequest(step=swarm_pb2.Step(step_id=i + 1, start_pos=i, tokens=[42], sample=True)))
                except grpc.aio.AioRpcError:
                    break
            while True:
                reply = await asyncio.wait_for(call.read(), 120)
                assert reply is not grpc.aio.EOF
                if reply.WhichOneof("kind") == "error":
                    call.cancel()
                    return reply.error

    error = asyncio.run(attack())
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "unread" in error.message
    assert complete(swarm) == expected


def test_sessions_held_idle_give_way_to_a_user(swarm: Swarm, expected: str) -> None:
    hop = node_hop(swarm)

    async def hold() -> list[RouteSession]:
        held = []
        for _ in range(3):  # all of --max-sessions
            s = RouteSession([hop], max_length=64)
            await s.open()
            await s.prefill([1, 2, 3])
            held.append(s)
        return held

    loop = asyncio.new_event_loop()
    try:
        held = loop.run_until_complete(hold())
        time.sleep(2.5)  # past --idle-evict-after: the node may now let them go
        assert complete(swarm) == expected
        for s in held:
            loop.run_until_complete(s.close())
    finally:
        loop.close()


def test_failure_reports_cannot_flood_the_dashboard_or_leak_session_ids(swarm: Swarm) -> None:
    async def report(msg: swarm_pb2.FailureReport) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(swarm.address, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            try:
                await swarm_pb2_grpc.CoordinatorStub(ch).ReportFailure(msg, timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    flood = swarm_pb2.FailureReport(node_id="node-0", code=14, message="A" * 4_000_000, recovered=True)  # what gRPC lets through
    assert asyncio.run(report(flood)) == grpc.StatusCode.INVALID_ARGUMENT
    sid = "f00dfeedf00dfeedf00dfeedf00dfeed"
    ok = swarm_pb2.FailureReport(node_id="node-0", session_id=sid, code=14, message="gone\x1b[2J", recovered=True, mode="span")
    assert asyncio.run(report(ok)) == grpc.StatusCode.OK
    state = swarm.wait(lambda s: any(session_label(sid) in (e["detail"] or "") for e in s["events"]), 30, "the failover event")
    text = json.dumps(state)
    assert sid not in text and "\x1b" not in text and len(text) < 200_000
