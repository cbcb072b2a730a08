"""Attacks on the control plane, made as an attacker makes them: a raw MQTT client on
the swarm's broker publishing forged presence, against real processes.

The swarm (a coordinator, node ``a`` placed by the coordinator and node ``b`` pinned to
every layer, a tiny random model) runs with a swarm token on a *shared, open* mosquitto
(anonymous clients welcome): signed presence must hold whatever broker carries it
(docs/security.md). Each forgery is one the code believed before: a route hijack by a
fast "ready" status pointing at the attacker, a status under the victim's id, an empty
retained payload, a forged offline, a poisoned epoch 2**64-1, an assignment for another
model, a flood of node ids, and a client id that used to kick the node off the broker.
Afterwards the attacker's listening socket has never been connected to, the nodes are
listed as before, the generations give the tokens of before, and every forgery was
counted as dropped.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import grpc
import msgpack
import pytest
from e2e.chaos import GREEDY, ChaosSwarm, NodeSpec, add_tokenizer, generate, prompts
from helpers import make_tiny_model

from swarm_coordinator.broker import MosquittoBroker, find_mosquitto
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.presence import Assign, LayerRange, NodeState, NodeStatus, Topics, encode
from swarm_proto.transport import call_metadata
from swarm_proto.trust import Identity, Sealer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKEN = "s3cret-swarm-token"
SWARM = "attacked"
NODES = [NodeSpec("a", None, 100, budget="1G"), NodeSpec("b", "0:6", 40)]
FLOOD = 300
BROKER_PASSWORD = "Very-Secret-Broker-Password"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_tokenizer(make_tiny_model(tmp_path_factory.mktemp("attack-model"), "llama3"))


@pytest.fixture(scope="module")
def shared_broker() -> Iterator[MosquittoBroker]:
    assert find_mosquitto(), "mosquitto is not installed: make deps-system"
    with MosquittoBroker() as broker:  # anonymous clients allowed: anyone can publish
        yield broker


@pytest.fixture(scope="module")
def swarm(tiny: Path, shared_broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosSwarm]:
    # the coordinator logs in with a password that must show nowhere (banner, log, GetSwarmInfo)
    url = f"mqtt://coordinator:{BROKER_PASSWORD}@{shared_broker.host}:{shared_broker.port}"
    s = ChaosSwarm(tiny, tmp_path_factory.mktemp("attacked-swarm"), swarm_id=SWARM, token=TOKEN, mqtt=url)
    try:
        s.start(NODES, timeout=180)
        yield s
    finally:
        s.close()


class Bait:
    """The attacker's gRPC "node": a listening socket that counts who connects."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _listed(swarm: ChaosSwarm) -> dict[str, tuple[str, int, int]]:
    return {n: (i.address, i.start, i.end) for n, i in swarm.nodes().items()}


def _dropped(swarm: ChaosSwarm) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{swarm.http}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^swarm_presence_dropped_total\{reason="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    }


async def _attack(swarm: ChaosSwarm, broker: MosquittoBroker, bait: str) -> None:
    topics = Topics(SWARM)
    fast = NodeStatus("evil", bait, swarm.model.name, LayerRange(0, 6), "cpu", 10**12, 1e300, NodeState.READY)
    mallory = Sealer(Identity.generate(), proof=secrets.token_bytes(32))  # no token: a made-up proof
    # the id a node used to connect with (node-<swarm>-<id>): taking it used to kick the node off
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"node-{SWARM}-a") as raw:
        forged: list[tuple[str, bytes]] = [
            (topics.status("evil"), encode(fast)),  # route hijack, unsigned
            (topics.status("evil"), mallory.seal(topics.status("evil"), encode(fast))),  # signed, not a member
            (topics.status("a"), mallory.seal(topics.status("a"), encode(NodeStatus(
                "a", bait, swarm.model.name, LayerRange(0, 6), "cpu", 10**12, 1e300, NodeState.READY)))),
            (topics.status("b"), b""),  # "delete" b's retained status
            (topics.status("a"), encode(NodeStatus("a", state=NodeState.OFFLINE))),  # forged offline
            (topics.status("b"), mallory.seal(topics.status("b"), encode(NodeStatus("b", state=NodeState.OFFLINE)))),
            # a poisoned epoch, as the old decoder accepted it
            (topics.assign("a"), msgpack.packb({"v": 1, "node_id": "a", "model": swarm.model.name,
                                                 "layers": [0, 6], "epoch": 2**64 - 1})),
            # an assignment for another model and more layers than the budget holds, signed by Mallory
            (topics.assign("a"), mallory.seal(topics.assign("a"), encode(Assign("a", "other-model", LayerRange(0, 6), 2**53)))),
        ]
        for topic, payload in forged:
            await raw.publish(topic, payload, qos=1, retain=True)
        for i in range(FLOOD):  # unbounded node ids
            topic = topics.status(f"flood-{i}")
            await raw.publish(topic, mallory.seal(topic, encode(NodeStatus(f"flood-{i}", bait, state=NodeState.READY))))
        await asyncio.sleep(1.0)


def test_forged_presence_on_a_shared_broker_is_harmless(swarm: ChaosSwarm, shared_broker: MosquittoBroker) -> None:
    cases = prompts(3)

    async def run() -> list[list[int]]:
        backend = swarm.backend()
        try:
            return [await generate(backend, p, GREEDY, 12) for p in cases]
        finally:
            await backend.aclose()

    before_nodes = _listed(swarm)
    assert set(before_nodes) == {"a", "b"}
    reference = asyncio.run(run())
    bait = Bait()
    try:
        asyncio.run(_attack(swarm, shared_broker, bait.address))
        deadline = time.monotonic() + 30
        want = {"unsigned": 2, "not admitted": FLOOD + 1, "key mismatch": 2, "empty": 1}
        while not all(_dropped(swarm).get(k, 0) >= v for k, v in want.items()):
            assert time.monotonic() < deadline, f"drops not counted: {_dropped(swarm)}"
            time.sleep(0.2)
        # the registry believed none of it: same nodes, same addresses, same layers
        assert _listed(swarm) == before_nodes
        for _ in range(2):
            assert asyncio.run(run()) == reference
        with grpc.insecure_channel(swarm.address) as channel:
            stub = swarm_pb2_grpc.CoordinatorStub(channel)
            route = stub.GetRoute(swarm_pb2.RouteRequest(), timeout=5, metadata=call_metadata(TOKEN))
        assert bait.address not in {hop.address for hop in route.hops}
        assert bait.accepted == 0, "the forged node received a connection"
        # the node refused the assignments it did not get from the coordinator, and stayed connected
        assert swarm.daemons["a"].alive and swarm.daemons["b"].alive
        log_a = (swarm.tmp / "a.log").read_text()
        assert "dropping assign of a: not the coordinator" in log_a
        assert "epoch 18446744073709551615 out of range" in log_a
    finally:
        bait.close()


def test_the_broker_password_is_never_shown(swarm: ChaosSwarm, shared_broker: MosquittoBroker) -> None:
    with grpc.insecure_channel(swarm.address) as channel:
        stub = swarm_pb2_grpc.CoordinatorStub(channel)
        info = stub.GetSwarmInfo(swarm_pb2.SwarmInfoRequest(), timeout=5, metadata=call_metadata(TOKEN))
    assert info.mqtt_url == f"mqtt://{shared_broker.host}:{shared_broker.port}" and len(info.coordinator_key) == 32
    assert swarm.coordinator is not None
    shown = "\n".join(swarm.coordinator.lines) + (swarm.tmp / "coordinator.log").read_text()
    assert BROKER_PASSWORD not in shown
