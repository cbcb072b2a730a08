"""Registry bookkeeping, fed sealed messages directly (no broker): joins, leaves, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from swarm_coordinator.registry import Registry, RegistryConfig
from swarm_coordinator.state import Assignment, LayerRange
from swarm_proto.presence import (
    Assign,
    Event,
    EventKind,
    NodeLoad,
    NodeState,
    NodeStatus,
    Topics,
    encode,
)
from swarm_proto.trust import Identity, Sealer

T = Topics("lab")
_SEALERS: dict[str, Sealer] = {}


def feed(reg: Registry, topic: str, body: bytes, *, retained: bool = False) -> None:
    """Hand ``reg`` one message as its node (or, for assignments and events, the registry
    itself) would have sealed it."""
    parts = topic.split("/")
    if parts[2] == "node":
        sealer = _SEALERS.setdefault(parts[3], Sealer(Identity.generate()))
        data = sealer.seal(topic, body) if body else body
    else:
        data = reg.seal(topic, body)
    reg.handle(topic, data, retained=retained)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Registry, Clock]:
    clock = Clock()
    config = RegistryConfig("mqtt://127.0.0.1:1", "lab", "m", 30, 1000, node_timeout_s=10)
    return Registry(config, clock=clock), clock


def status(node_id: str, state: NodeState = NodeState.READY, hosted: LayerRange | None = None) -> bytes:
    return encode(NodeStatus(node_id, f"{node_id}:7000", "m", hosted, "cpu", 10**9, 50.0, state))


def kinds(registry: Registry) -> list[tuple[EventKind, str | None]]:
    return [(e.kind, e.node_id) for e in registry._outbox]


def test_status_and_load_build_the_state() -> None:
    reg, _ = make()
    feed(reg, T.status("a"), status("a", hosted=LayerRange(0, 30)))
    feed(reg, T.load("a"), encode(NodeLoad(2, 0, 900, 15.0)))
    feed(reg, T.load("ghost"), encode(NodeLoad()))  # load without status: not a node yet
    state = reg.state
    assert list(state.nodes) == ["a"]
    view = state.nodes["a"]
    assert view.online and view.serving == LayerRange(0, 30)
    assert view.load == NodeLoad(2, 0, 900, 15.0)
    assert (state.model, state.num_layers, state.bytes_per_layer) == ("m", 30, 1000)


def test_live_join_and_leave_become_events_but_retained_replays_do_not() -> None:
    reg, _ = make()
    feed(reg, T.status("old"), status("old"), retained=True)  # known before we started
    feed(reg, T.status("new"), status("new"))
    feed(reg, T.status("new"), status("new", NodeState.OFFLINE))  # its Last Will
    feed(reg, T.status("dead"), status("dead", NodeState.OFFLINE), retained=True)
    assert kinds(reg) == [(EventKind.JOIN, "new"), (EventKind.LEAVE, "new")]
    state = reg.state
    assert [v.node_id for v in state.online()] == ["old"]
    assert not state.nodes["dead"].online


def test_malformed_messages_are_counted_and_ignored() -> None:
    reg, _ = make()
    feed(reg, T.status("a"), status("a"))
    feed(reg, T.status("a"), b"\x93garbage")
    feed(reg, T.status("b"), status("a"))  # payload names another node
    feed(reg, T.load("a"), encode(NodeStatus("a")))  # a status where a load belongs
    feed(reg, "swarm/lab/node/a/unknown", b"x")
    assert reg.malformed == 4
    assert list(reg.state.nodes) == ["a"] and reg.state.nodes["a"].online


def test_silent_node_times_out_and_comes_back() -> None:
    reg, clock = make()
    feed(reg, T.status("a"), status("a"))
    feed(reg, T.status("b"), status("b"))
    clock.now += 8
    feed(reg, T.load("b"), encode(NodeLoad()))
    clock.now += 5
    assert reg.sweep() == ["a"]
    assert reg.sweep() == []
    assert [v.node_id for v in reg.state.online()] == ["b"]
    feed(reg, T.load("a"), encode(NodeLoad()))
    assert [v.node_id for v in reg.state.online()] == ["a", "b"]
    assert kinds(reg)[-2:] == [(EventKind.LEAVE, "a"), (EventKind.JOIN, "a")]


def test_cleared_retained_status_is_ignored_only_forget_forgets() -> None:
    reg, _ = make()
    feed(reg, T.status("a"), status("a"))
    feed(reg, T.status("a"), b"")  # anyone may clear a retained topic: not a reason to forget
    assert list(reg.state.nodes) == ["a"] and reg.dropped["empty"] == 1
    asyncio.run(reg.forget("a"))
    assert reg.state.nodes == {}


def test_retained_assignments_rebuild_the_current_assignment() -> None:
    reg, _ = make()
    feed(reg, T.status("a"), status("a", hosted=LayerRange(0, 30)), retained=True)
    feed(reg, T.status("b"), status("b"), retained=True)
    feed(reg, T.assign("a"), encode(Assign("a", "m", LayerRange(0, 20), 5)), retained=True)
    feed(reg, T.assign("b"), encode(Assign("b", "m", LayerRange(20, 30), 5)), retained=True)
    assert reg.state.current_assignment() == Assignment({"a": LayerRange(0, 20), "b": LayerRange(20, 30)})
    assert reg.epoch == 5


def test_events_topic_feeds_the_recent_events() -> None:
    reg, _ = make()
    feed(reg, T.events, encode(Event(EventKind.FAILOVER, "a", "step timeout", 1.0)))
    assert list(reg.events) == [Event(EventKind.FAILOVER, "a", "step timeout", 1.0)]


async def test_publish_assignment_records_changes_even_while_disconnected() -> None:
    reg, _ = make()
    feed(reg, T.status("a"), status("a"))
    feed(reg, T.status("b"), status("b"))
    first = Assignment({"a": LayerRange(0, 30)})
    assert await reg.publish_assignment(first) == {"a": LayerRange(0, 30)}
    assert await reg.publish_assignment(first) == {}
    second = Assignment({"b": LayerRange(0, 30)})
    assert await reg.publish_assignment(second) == {"a": None, "b": LayerRange(0, 30)}
    assert reg.state.current_assignment() == second
    assert reg.state.nodes["a"].assign is not None and reg.state.nodes["a"].assign.layers is None
    assert [e.kind for e in reg.events] == [EventKind.REASSIGN, EventKind.REASSIGN]


async def test_wait_until_wakes_on_change_and_times_out() -> None:
    reg, _ = make()

    async def later() -> None:
        await asyncio.sleep(0.05)
        feed(reg, T.status("a"), status("a"))

    task = asyncio.create_task(later())
    state = await reg.wait_until(lambda s: "a" in s.nodes, timeout=2)
    assert "a" in state.nodes
    await task
    with pytest.raises(asyncio.TimeoutError):
        await reg.wait_until(lambda s: "zzz" in s.nodes, timeout=0.05)


async def test_changes_yields_the_state_after_each_change() -> None:
    reg, _ = make()
    stream = reg.changes()
    pending = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    feed(reg, T.status("a"), status("a"))
    state = await asyncio.wait_for(pending, 2)
    assert "a" in state.nodes
    await stream.aclose()


async def test_changes_misses_nothing_while_its_reader_is_busy() -> None:
    reg, _ = make()
    stream = reg.changes()
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    feed(reg, T.status("a"), status("a"))
    assert "a" in (await asyncio.wait_for(first, 2)).nodes
    feed(reg, T.status("b"), status("b"))  # while the reader is away: no waiting for a next change
    assert "b" in (await asyncio.wait_for(stream.__anext__(), 2)).nodes
    await stream.aclose()


async def test_received_messages_are_opened_off_the_loop_in_order_and_forgeries_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """on_message queues; a worker thread opens the seals in batches; the loop applies
    them in arrival order; a message whose signature fails changes nothing."""
    import aiomqtt

    from swarm_coordinator import registry as registry_module

    monkeypatch.setattr(registry_module, "MAX_BATCH", 3)  # several trips to the worker
    monkeypatch.setattr(registry_module, "MAX_INBOX", 4)  # and the receive loop made to wait
    reg, _ = make()
    sealer = Sealer(Identity.generate())

    def message(topic: str, body: bytes) -> aiomqtt.Message:
        return aiomqtt.Message(topic, sealer.seal(topic, body), qos=1, retain=False, mid=0, properties=None)

    forged = message(T.load("a"), encode(NodeLoad(99, 0, 900, 1.0)))
    forged.payload = forged.payload[:-1] + bytes([forged.payload[-1] ^ 1])  # type: ignore[index,operator]  # the signature's last byte
    received = [message(T.status("a"), status("a"))]
    received += [message(T.load("a"), encode(NodeLoad(i, 0, 900, 1.0))) for i in range(7)]
    received.insert(5, forged)
    try:
        for m in received:
            await reg.on_message(m)
        state = await reg.wait_until(
            lambda s: "a" in s.nodes and s.nodes["a"].load is not None and s.nodes["a"].load.active_sessions == 6, 5
        )
        assert state.nodes["a"].online
        await asyncio.sleep(0.05)
        assert reg.state.nodes["a"].load == NodeLoad(6, 0, 900, 1.0)  # the last one, not the forgery
        assert reg.malformed == 1 and reg.batches >= 3 and not reg._inbox
    finally:
        await reg.stop()
