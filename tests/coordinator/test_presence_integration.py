"""Presence through a real broker: the embedded amqtt one and a mosquitto process.

Every test runs against both. They show that the registry is rebuilt from retained
messages, that the Last Will marks a killed node offline, that malformed payloads are
ignored, and that clients reconnect and re-announce after a broker restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest

from swarm_coordinator.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto
from swarm_coordinator.registry import Registry, RegistryConfig
from swarm_coordinator.state import Assignment, LayerRange, SwarmState
from swarm_proto.presence import Assign, EventKind, NodeLoad, NodeState, NodeStatus, Topics, encode
from swarm_proto.presence_client import Backoff, BrokerAddress, PresenceClient
from swarm_proto.trust import Identity, Sealer

SWARM = "itest"
FAST = Backoff(initial=0.05, maximum=0.5)
TIMEOUT = 10.0


class Broker:
    """A running broker of either kind, restartable on the same port."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.embedded: EmbeddedBroker | None = None
        self.mosquitto: MosquittoBroker | None = None

    @property
    def url(self) -> str:
        b = self.embedded or self.mosquitto
        assert b is not None
        return b.url

    async def start(self) -> None:
        if self.kind == "amqtt":
            self.embedded = EmbeddedBroker("127.0.0.1", 0)
            await self.embedded.start()
        else:
            self.mosquitto = MosquittoBroker("127.0.0.1", 0)
            await asyncio.to_thread(self.mosquitto.start)

    async def restart(self) -> None:
        """Stop the broker (losing its retained messages) and start a fresh one."""
        if self.embedded is not None:
            port = self.embedded.port
            await self.embedded.stop()
            await asyncio.sleep(0.3)
            self.embedded = EmbeddedBroker("127.0.0.1", port)
            await self.embedded.start()
        else:
            assert self.mosquitto is not None
            await asyncio.to_thread(self.mosquitto.kill)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(self.mosquitto.start)

    async def close(self) -> None:
        if self.embedded is not None:
            await self.embedded.stop()
        if self.mosquitto is not None:
            await asyncio.to_thread(self.mosquitto.close)


@pytest.fixture(params=["amqtt", "mosquitto"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    if request.param == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (make deps-system)")
    b = Broker(request.param)
    await b.start()
    yield b
    await b.close()


def registry(broker: Broker, *, client_id: str = "coordinator", node_timeout_s: float = 30.0) -> Registry:
    config = RegistryConfig(broker.url, SWARM, "m", 30, 1000, client_id=client_id, node_timeout_s=node_timeout_s, keepalive=5)
    return Registry(config, backoff=FAST)


def node_status(node_id: str, hosted: LayerRange | None = None) -> NodeStatus:
    return NodeStatus(node_id, f"127.0.0.1:{7000 + len(node_id)}", "m", hosted, "cpu", 10**9, 80.0, NodeState.READY)


def presence(
    broker: Broker,
    node_id: str,
    *,
    load_interval: float = 0.2,
    on_assign: Callable[[Assign], None] | None = None,
) -> PresenceClient:
    return PresenceClient(
        BrokerAddress.parse(broker.url),
        SWARM,
        node_status(node_id),
        load=lambda: NodeLoad(1, 0, 4096, 12.5),
        on_assign=on_assign,
        load_interval=load_interval,
        keepalive=5,
        backoff=FAST,
    )


def has_node(node_id: str, *, online: bool = True) -> Callable[[SwarmState], bool]:
    def check(state: SwarmState) -> bool:
        view = state.nodes.get(node_id)
        return view is not None and view.online == online

    return check


async def eventually(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_status_load_and_assignment_flow(broker: Broker) -> None:
    assigned: list[Assign] = []
    async with presence(broker, "n1", on_assign=assigned.append) as node, registry(broker) as reg:
        state = await reg.wait_until(lambda s: "n1" in s.nodes and s.nodes["n1"].load is not None, TIMEOUT)
        view = state.nodes["n1"]
        assert view.status == node_status("n1")
        assert view.load == NodeLoad(1, 0, 4096, 12.5)

        await reg.publish_assignment(Assignment({"n1": LayerRange(0, 30)}))
        await eventually(lambda: bool(assigned))
        assert assigned[-1].layers == LayerRange(0, 30) and assigned[-1].model == "m"

        await node.set_status(node_status("n1", hosted=LayerRange(0, 30)))
        state = await reg.wait_until(lambda s: s.nodes["n1"].serving == LayerRange(0, 30), TIMEOUT)
        assert state.current_assignment() == Assignment({"n1": LayerRange(0, 30)})


async def test_restarted_coordinator_rebuilds_registry_from_retained_messages(broker: Broker) -> None:
    # The nodes publish load only once a minute here, so the second registry can learn
    # about them only from retained status and assignment messages.
    async with presence(broker, "a", load_interval=60) as a, presence(broker, "b", load_interval=60) as b:
        plan = Assignment({"a": LayerRange(0, 12), "b": LayerRange(12, 30)})
        async with registry(broker) as first:
            await first.wait_until(lambda s: len(s.online()) == 2, TIMEOUT)
            await first.publish_assignment(plan)
            await eventually(lambda: a.assignment is not None and b.assignment is not None)
        # coordinator gone; a new one starts from nothing
        async with registry(broker) as second:
            state = await second.wait_until(
                lambda s: len(s.online()) == 2 and s.current_assignment() == plan, TIMEOUT
            )
            assert state.nodes["a"].status == a.status
            assert second.epoch == first.epoch
            # it did not mistake nodes it found already there for new ones
            await asyncio.sleep(0.2)
            assert not [e for e in second.events if e.kind is EventKind.JOIN]


NODE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from swarm_proto.presence import NodeState, NodeStatus
    from swarm_proto.presence_client import BrokerAddress, PresenceClient

    async def main() -> None:
        url, swarm, node_id = sys.argv[1:4]
        status = NodeStatus(node_id, "127.0.0.1:7999", "m", None, "cpu", 10**9, 50.0, NodeState.READY)
        client = PresenceClient(BrokerAddress.parse(url), swarm, status, load_interval=0.2, keepalive=5)
        await client.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_last_will_marks_a_killed_node_offline(broker: Broker, tmp_path: Path) -> None:
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, str(script), broker.url, SWARM, "doomed"], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), TIMEOUT)
        assert line.strip() == b"ready"
        async with registry(broker) as reg:
            await reg.wait_until(has_node("doomed"), TIMEOUT)
            proc.send_signal(signal.SIGKILL)
            proc.wait(TIMEOUT)
            t0 = asyncio.get_running_loop().time()
            await reg.wait_until(has_node("doomed", online=False), TIMEOUT)
            assert asyncio.get_running_loop().time() - t0 < 5.0  # the Will, not the 30 s timeout
            await eventually(lambda: any(e.kind is EventKind.LEAVE and e.node_id == "doomed" for e in reg.events))
        # the offline status is retained: a coordinator started now sees it too
        async with registry(broker, client_id="late") as late:
            await late.wait_until(has_node("doomed", online=False), TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_malformed_payloads_are_ignored(broker: Broker) -> None:
    topics = Topics(SWARM)
    address = BrokerAddress.parse(broker.url)
    async with registry(broker) as reg:
        async with aiomqtt.Client(address.host, address.port, identifier="vandal") as raw:
            for topic, payload in [
                (topics.status("x"), b"\xc1 not msgpack"),
                (topics.status("x"), b"\x93\x01\x02\x03"),  # a list, not a map
                (topics.status("x"), encode(node_status("someone-else"))),
                (topics.load("x"), encode(node_status("x"))),
                (topics.assign("x"), b"\x80"),
                (topics.events, b"{}"),
                (f"swarm/{SWARM}/node/x/what", b"1"),
            ]:
                await raw.publish(topic, payload, qos=1)
            await raw.publish(topics.status("x"), encode(node_status("x")), qos=1)  # well-formed, unsigned
            sealer = Sealer(Identity.generate())
            await raw.publish(topics.status("x"), sealer.seal(topics.status("x"), encode(node_status("x"))), qos=1)
        await reg.wait_until(has_node("x"), TIMEOUT)
        await eventually(lambda: reg.malformed == 7 and reg.dropped["unsigned"] == 1)
        assert reg.connected and reg.connections == 1
        assert list(reg.state.nodes) == ["x"]


async def test_broker_restart_clients_reconnect_and_reannounce(broker: Broker) -> None:
    async with presence(broker, "n1") as node, registry(broker) as reg:
        await reg.wait_until(has_node("n1"), TIMEOUT)
        plan = Assignment({"n1": LayerRange(0, 30)})
        await reg.publish_assignment(plan)
        await eventually(lambda: node.assignment is not None)
        assigned = node.assignment

        await broker.restart()  # retained status and assignment are gone with it
        await eventually(lambda: node.connections >= 2 and reg.connections >= 2 and node.connected and reg.connected)

        # A coordinator that starts now finds the node and its assignment again: the node
        # re-published its status and the old registry its retained assignment.
        async with registry(broker, client_id="fresh") as fresh:
            state = await fresh.wait_until(
                lambda s: has_node("n1")(s) and s.current_assignment() == plan, TIMEOUT
            )
            assert state.nodes["n1"].status == node.status
        # load keeps flowing to the old registry, and the node kept its assignment
        seen = reg.state.nodes["n1"].last_seen
        await eventually(lambda: reg.state.nodes["n1"].last_seen > seen)
        assert reg.state.nodes["n1"].online
        assert node.assignment == assigned


async def test_graceful_stop_publishes_offline(broker: Broker) -> None:
    async with registry(broker) as reg:
        node = presence(broker, "polite")
        await node.start()
        await reg.wait_until(has_node("polite"), TIMEOUT)
        await node.stop()
        await reg.wait_until(has_node("polite", online=False), TIMEOUT)
        # joined and left while the registry watched: both are events
        await eventually(lambda: [(e.kind, e.node_id) for e in reg.events] == [
            (EventKind.JOIN, "polite"), (EventKind.LEAVE, "polite")
        ])


async def test_silent_node_without_a_will_times_out(broker: Broker) -> None:
    # A retained "ready" status whose publisher went away cleanly (so no Will fired) and
    # sends no load: the registry's heartbeat timeout takes it offline.
    topics = Topics(SWARM)
    address = BrokerAddress.parse(broker.url)
    async with aiomqtt.Client(address.host, address.port, identifier="ghost") as raw:
        sealed = Sealer(Identity.generate()).seal(topics.status("ghost"), encode(node_status("ghost")))
        await raw.publish(topics.status("ghost"), sealed, qos=1, retain=True)
    async with registry(broker, node_timeout_s=0.5) as reg:
        await reg.wait_until(has_node("ghost"), TIMEOUT)
        await reg.wait_until(has_node("ghost", online=False), TIMEOUT)
        await eventually(lambda: any(e.kind is EventKind.LEAVE and e.node_id == "ghost" for e in reg.events))


async def test_a_failing_assignment_handler_does_not_stop_presence(broker: Broker) -> None:
    calls: list[Assign] = []

    def explode(assign: Assign) -> None:
        calls.append(assign)
        raise RuntimeError("handler bug")

    async with presence(broker, "n1", on_assign=explode) as node, registry(broker) as reg:
        await reg.wait_until(has_node("n1"), TIMEOUT)
        await reg.publish_assignment(Assignment({"n1": LayerRange(0, 10)}))
        await eventually(lambda: len(calls) == 1)
        await reg.publish_assignment(Assignment({"n1": LayerRange(0, 30)}))
        await eventually(lambda: len(calls) == 2)
        assert node.connected and node.connections == 1


async def test_forget_clears_retained_status_and_assignment(broker: Broker) -> None:
    async with presence(broker, "retired") as node, registry(broker) as reg:
        await reg.wait_until(has_node("retired"), TIMEOUT)
        await reg.publish_assignment(Assignment({"retired": LayerRange(0, 30)}))
        await eventually(lambda: node.assignment is not None)
    async with registry(broker) as reg:
        await reg.wait_until(has_node("retired", online=False), TIMEOUT)
        await reg.forget("retired")
        assert "retired" not in reg.state.nodes
    async with registry(broker, client_id="after") as after:
        await asyncio.sleep(0.3)  # retained messages arrive right after subscribing
        assert "retired" not in after.state.nodes
        assert after.state.current_assignment() == Assignment()
