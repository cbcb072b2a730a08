"""The brokers refuse anonymous clients and keep each node to its own topics.

Both brokers run for real: the embedded amqtt broker in this process (as the coordinator
runs it) and a mosquitto process with a generated password file and the ACLs of
docker/. A node logs in as its node id with the password derived from the swarm token;
the coordinator with its own password. Attackers try anonymous logins, guessed
passwords, and (as a member) publishing under another node's id or reading the whole
swarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import grpc
import pytest
from e2e.chaos import Daemon, add_tokenizer
from helpers import make_tiny_model

from swarm_coordinator.broker import ADMIN_USER, EmbeddedBroker, MosquittoBroker, find_mosquitto
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.trust import mqtt_password

TOKEN = "broker-token"
SWARM = "locked"
ADMIN_PASSWORD = "admin-secret-for-mosquitto"


@contextlib.asynccontextmanager
async def _broker(kind: str) -> AsyncIterator[tuple[str, int, str]]:
    """(host, port, coordinator password) of a locked broker of ``kind``."""
    if kind == "embedded":
        embedded = EmbeddedBroker("127.0.0.1", 0, swarm_id=SWARM, token=TOKEN)
        async with embedded:
            yield embedded.host, embedded.port, embedded.admin_password
        return
    assert find_mosquitto(), "mosquitto is not installed: make deps-system"
    users = {ADMIN_USER: ADMIN_PASSWORD, **{n: mqtt_password(TOKEN, SWARM, n) for n in ("a", "b")}}
    async with MosquittoBroker(users=users) as mosquitto:
        yield mosquitto.host, mosquitto.port, ADMIN_PASSWORD


def _client(host: str, port: int, user: str | None = None, password: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(host, port, username=user, password=password, timeout=5)


async def _receive(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []

    async def read() -> None:
        async for message in client.messages:
            payload: Any = message.payload
            got.append((message.topic.value, bytes(payload)))

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(read(), seconds)
    return got


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
async def test_anonymous_and_wrong_passwords_are_refused(kind: str) -> None:
    async with _broker(kind) as (host, port, _):
        for user, password in [(None, None), ("a", "guess"), (ADMIN_USER, "guess"), (ADMIN_USER, mqtt_password(TOKEN, SWARM, ADMIN_USER))]:
            with pytest.raises(aiomqtt.MqttError):
                async with _client(host, port, user, password):
                    pass
        async with _client(host, port, "a", mqtt_password(TOKEN, SWARM, "a")):
            pass  # the node's own login works


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
async def test_a_node_publishes_only_under_its_own_id(kind: str) -> None:
    prefix = f"swarm/{SWARM}/"
    async with _broker(kind) as (host, port, admin_password):
        async with _client(host, port, ADMIN_USER, admin_password) as coordinator, \
                _client(host, port, "a", mqtt_password(TOKEN, SWARM, "a")) as node_a:
            await coordinator.subscribe(f"{prefix}#", qos=1)
            await node_a.subscribe(f"{prefix}#", qos=1)  # refused (or reduced to nothing)
            await node_a.publish(f"{prefix}node/b/status", b"forged", qos=1)
            await node_a.publish(f"{prefix}assign/a", b"forged", qos=1)
            await node_a.publish(f"{prefix}node/a/status", b"mine", qos=1)
            await coordinator.publish(f"{prefix}assign/b", b"for b", qos=1)
            await coordinator.publish(f"{prefix}assign/a", b"for a", qos=1)
            seen = await _receive(coordinator, 1.5)
            seen_by_a = await _receive(node_a, 0.5)
    topics = {t for t, _ in seen}
    assert f"{prefix}node/a/status" in topics
    assert f"{prefix}node/b/status" not in topics, "a node published under another node's id"
    assert (f"{prefix}assign/a", b"forged") not in seen, "a node published an assignment"
    # node a read nothing but its own assignment
    assert {t for t, _ in seen_by_a} <= {f"{prefix}assign/a"}


@pytest.mark.slow
def test_broker_password_is_never_shown_and_an_exposed_coordinator_warns(tmp_path: Path) -> None:
    """``--mqtt mqtt://coordinator:PASSWORD@...``: not in the banner, the log or
    GetSwarmInfo (which any caller may read); binding 0.0.0.0 without a token warns."""
    assert find_mosquitto(), "mosquitto is not installed: make deps-system"
    model = add_tokenizer(make_tiny_model(tmp_path, "llama3"))
    secret = "Very-Secret-Broker-Password"
    with MosquittoBroker(users={ADMIN_USER: secret}) as mosquitto:
        url = f"mqtt://{ADMIN_USER}:{secret}@127.0.0.1:{mosquitto.port}"
        argv = [sys.executable, "-m", "swarm_coordinator.cli", "--model", str(model), "--host", "0.0.0.0",
                "--port", "0", "--http-port", "0", "--mqtt", url, "--swarm-id", SWARM,
                "--state-dir", str(tmp_path / "state")]
        daemon = Daemon("coordinator", argv, tmp_path / "coordinator.log").start()
        try:
            banner = daemon.line(60)
            port = banner.split()[3].rsplit(":", 1)[1]
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                info = swarm_pb2_grpc.CoordinatorStub(channel).GetSwarmInfo(swarm_pb2.SwarmInfoRequest(), timeout=10)
        finally:
            daemon.stop()
    log = (tmp_path / "coordinator.log").read_text()
    assert info.mqtt_url == f"mqtt://127.0.0.1:{mosquitto.port}" and len(info.coordinator_key) == 32
    assert secret not in banner and secret not in log and secret not in info.mqtt_url
    assert "neither TLS nor a swarm token" in log
    assert (tmp_path / "state" / f"coordinator-{SWARM}.key").exists()
