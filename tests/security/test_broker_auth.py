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
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from swarm_coordinator.broker import ADMIN_USER, EmbeddedBroker, MosquittoBroker, find_mosquitto
from swarm_coordinator.config import CoordinatorConfig
from swarm_proto.presence_client import BrokerAddress, redact
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

    async def exchange(host: str, port: int, admin_password: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
        coordinator = _client(host, port, ADMIN_USER, admin_password)
        node_a = _client(host, port, "a", mqtt_password(TOKEN, SWARM, "a"))
        async with coordinator, node_a:
            await coordinator.subscribe(f"{prefix}#", qos=1)
            await node_a.subscribe(f"{prefix}#", qos=1)  # refused (or reduced to nothing)
            await node_a.publish(f"{prefix}node/b/status", b"forged", qos=1)
            await node_a.publish(f"{prefix}assign/a", b"forged", qos=1)
            await node_a.publish(f"{prefix}node/a/status", b"mine", qos=1)
            await coordinator.publish(f"{prefix}assign/b", b"for b", qos=1)
            await coordinator.publish(f"{prefix}assign/a", b"for a", qos=1)
            return await _receive(coordinator, 1.5), await _receive(node_a, 0.5)

    async with _broker(kind) as (host, port, admin_password):
        seen, seen_by_a = await exchange(host, port, admin_password)
    topics = {t for t, _ in seen}
    assert f"{prefix}node/a/status" in topics
    assert f"{prefix}node/b/status" not in topics, "a node published under another node's id"
    assert (f"{prefix}assign/a", b"forged") not in seen, "a node published an assignment"
    # node a read nothing but its own assignment
    assert {t for t, _ in seen_by_a} <= {f"{prefix}assign/a"}


def test_urls_are_redacted_and_an_exposed_coordinator_is_recognised() -> None:
    assert redact("mqtt://coordinator:Very-Secret@10.0.0.1:1883") == "mqtt://coordinator:***@10.0.0.1:1883"
    assert "Very-Secret" not in repr(BrokerAddress.parse("mqtt://u:Very-Secret@h"))
    assert BrokerAddress.parse("mqtt://u:Very-Secret@h").url == "mqtt://h:1883"
    assert BrokerAddress.parse("mqtts://h").url == "mqtts://h:8883"
    model = "m.gguf"
    assert CoordinatorConfig(model, host="0.0.0.0").exposed
    assert not CoordinatorConfig(model, host="0.0.0.0", token="t").exposed
    assert not CoordinatorConfig(model, host="127.0.0.1").exposed
