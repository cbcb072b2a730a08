"""Presence topics and msgpack payloads (swarm_proto.presence): round trips and rejects."""

from __future__ import annotations

import msgpack
import pytest

from swarm_proto.presence import (
    MAX_LOAD_SESSIONS,
    Assign,
    Event,
    EventKind,
    LayerRange,
    NodeLoad,
    NodeState,
    NodeStatus,
    PayloadError,
    PresenceError,
    SessionLoad,
    TopicKind,
    Topics,
    decode,
    encode,
)
from swarm_proto.presence_client import Backoff, BrokerAddress

T = Topics("lab")
STATUS = NodeStatus("n1", "10.0.0.2:7000", "smollm2", LayerRange(0, 15), "cuda:0", 8 << 30, 420.5, NodeState.READY)


def test_topic_names() -> None:
    assert T.status("n1") == "swarm/lab/node/n1/status"
    assert T.load("n1") == "swarm/lab/node/n1/load"
    assert T.assign("n1") == "swarm/lab/assign/n1"
    assert T.events == "swarm/lab/events"
    assert T.all == "swarm/lab/#"
    assert T.parse("swarm/lab/node/n1/status") == (TopicKind.STATUS, "n1")
    assert T.parse("swarm/lab/assign/n1") == (TopicKind.ASSIGN, "n1")
    assert T.parse("swarm/lab/events") == (TopicKind.EVENTS, None)


@pytest.mark.parametrize(
    "topic", ["swarm/other/events", "swarm/lab/node/n1", "swarm/lab/node/n1/status/x", "swarm/lab/assign", "swarm/lab/nope"]
)
def test_unknown_topics_are_payload_errors(topic: str) -> None:
    with pytest.raises(PayloadError):
        T.parse(topic)


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "with space", "x" * 129])
def test_ids_that_would_break_topics_are_refused(bad: str) -> None:
    with pytest.raises(PayloadError):
        T.status(bad)
    with pytest.raises(PayloadError):
        Topics(bad)


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (T.status("n1"), STATUS),
        (T.status("n1"), NodeStatus("n1")),
        (T.status("n1"), STATUS.offline()),
        (T.status("n1"), NodeStatus("n1", memory_budget=1 << 30, layer_bytes=2_500_000, weight_format="Q4_1+Q8_0")),
        (T.load("n1"), NodeLoad(3, 1, 4096, 17.5)),
        (T.assign("n1"), Assign("n1", "smollm2", LayerRange(10, 20), 7)),
        (T.assign("n1"), Assign("n1", "smollm2", None, 8)),
        (T.events, Event(EventKind.FAILOVER, "n1", "step timeout", 1234.5)),
        (T.events, Event(EventKind.REASSIGN, None, "", 1.0)),
    ],
)
def test_round_trip(topic: str, payload: object) -> None:
    kind, node_id, back = decode(T, topic, encode(payload))  # type: ignore[arg-type]
    assert back == payload
    assert node_id == (None if kind is TopicKind.EVENTS else "n1")


def test_empty_payload_means_retained_message_deleted() -> None:
    assert decode(T, T.status("n1"), b"") == (TopicKind.STATUS, "n1", None)


def _raw(**fields: object) -> bytes:
    return msgpack.packb({"v": 1, **fields})


@pytest.mark.parametrize(
    ("topic", "data"),
    [
        (T.status("n1"), b"\xc1\xff garbage"),
        (T.status("n1"), msgpack.packb([1, 2, 3])),
        (T.status("n1"), msgpack.packb({"node_id": "n1", "state": "ready"})),  # no version
        (T.status("n1"), msgpack.packb({"v": 9, "node_id": "n1", "state": "ready"})),
        (T.status("n1"), _raw(node_id="n2", state="ready")),  # names another node
        (T.status("n1"), _raw(node_id="n1", state="dancing")),
        (T.status("n1"), _raw(node_id="n1", state="ready", speed="fast")),
        (T.status("n1"), _raw(node_id="n1", state="ready", speed=-1.0)),
        (T.status("n1"), _raw(node_id="n1", state="ready", hosted=[5, 2])),
        (T.status("n1"), _raw(node_id="n1", state="ready", hosted=[0, 1, 2])),
        (T.status("n1"), _raw(node_id="n1", state="ready", hosted=[True, 4])),
        (T.status("n1"), _raw(node_id="n1", state="ready", memory_budget=True)),
        (T.status("n1"), _raw(node_id="n1")),  # no state
        (T.load("n1"), _raw(active_sessions=-1, queued_steps=0, free_kv_tokens=0, tokens_per_s=0.0)),
        (T.load("n1"), _raw(active_sessions=0, queued_steps=0, free_kv_tokens=0, tokens_per_s=float("nan"))),
        (T.load("n1"), _raw(active_sessions=0, queued_steps=0, tokens_per_s=1.0)),  # no free_kv_tokens
        (T.assign("n1"), _raw(node_id="n1", model=3, layers=None)),
        (T.events, _raw(kind="party")),
        (T.events, msgpack.packb({1: 2})),
    ],
)
def test_malformed_payloads_raise_payload_error(topic: str, data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(T, topic, data)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = _raw(node_id="n1", state="ready", speed=3, future_field={"x": 1})
    _, _, status = decode(T, T.status("n1"), data)
    assert status == NodeStatus("n1", speed=3.0, state=NodeState.READY)


def test_broker_urls() -> None:
    assert BrokerAddress.parse("mqtt://h:1884") == BrokerAddress("h", 1884)
    assert BrokerAddress.parse("h") == BrokerAddress("h", 1883)
    assert BrokerAddress.parse("mqtt://u:p%40ss@h") == BrokerAddress("h", 1883, "u", "p@ss")
    for bad in ("http://h", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(PresenceError):
            BrokerAddress.parse(bad)


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(initial=0.1, maximum=2.0)
    assert 0.05 <= b.delay(0) <= 0.1
    assert 1.0 <= b.delay(10) <= 2.0


def test_client_classes_are_reachable_from_presence_too() -> None:
    import swarm_proto.presence as presence
    from swarm_proto import presence_client

    assert presence.PresenceClient is presence_client.PresenceClient
    with pytest.raises(AttributeError):
        presence.NoSuchThing  # noqa: B018


def test_load_lists_sessions_round_trip() -> None:
    sessions = tuple(SessionLoad(f"s{i}", 0, 15, 40 + i, 12, 64, 3.5, 0.25) for i in range(3))
    load = NodeLoad(3, 1, 2048, 9.5, sessions)
    assert decode(T, T.load("n1"), encode(load)) == (TopicKind.LOAD, "n1", load)
    # an older node's load, without the field, has no sessions
    old = msgpack.packb({"v": 1, "active_sessions": 1, "queued_steps": 0, "free_kv_tokens": 0, "tokens_per_s": 0.0})
    assert decode(T, T.load("n1"), old)[2] == NodeLoad(1, 0, 0, 0.0)


def _load_with(sessions: object) -> bytes:
    fields = {"v": 1, "active_sessions": 1, "queued_steps": 0, "free_kv_tokens": 0, "tokens_per_s": 0.0}
    return bytes(msgpack.packb({**fields, "sessions": sessions}))


@pytest.mark.parametrize(
    "sessions",
    [
        "s1",  # not a list
        [["s1", 0, 15, 4, 2, 8, 1.0]],  # 7 items
        [["", 0, 15, 4, 2, 8, 1.0, 0.0]],  # empty id
        [["x" * 129, 0, 15, 4, 2, 8, 1.0, 0.0]],  # id too long
        [["s\n1", 0, 15, 4, 2, 8, 1.0, 0.0]],  # unprintable id
        [["s1", 15, 15, 4, 2, 8, 1.0, 0.0]],  # empty layer range
        [["s1", 0, 15, -1, 2, 8, 1.0, 0.0]],  # negative position
        [["s1", 0, 15, 4.5, 2, 8, 1.0, 0.0]],  # float counter
        [["s1", 0, 15, 4, 2, 8, float("nan"), 0.0]],  # NaN age
        [["s1", 0, 15, 4, 2, 8, True, 0.0]],  # bool time
        [[f"s{i}", 0, 15, 4, 2, 8, 1.0, 0.0] for i in range(MAX_LOAD_SESSIONS + 1)],  # unbounded
    ],
)
def test_bad_session_lists_are_payload_errors(sessions: object) -> None:
    with pytest.raises(PayloadError):
        decode(T, T.load("n1"), _load_with(sessions))


def test_a_node_cannot_list_more_sessions_than_the_bound() -> None:
    with pytest.raises(PayloadError, match="at most"):
        NodeLoad(sessions=tuple(SessionLoad(f"s{i}", 0, 1, 0, 0, 0, 0.0, 0.0) for i in range(MAX_LOAD_SESSIONS + 1)))


def test_load_reports_peer_round_trips() -> None:
    from swarm_proto.presence import PeerRtt

    load = NodeLoad(1, 0, 64, 2.0, peer_rtts=(PeerRtt("n2", 0.021), PeerRtt("n3", 0.05)))
    assert decode(T, T.load("n1"), encode(load)) == (TopicKind.LOAD, "n1", load)


@pytest.mark.parametrize(
    "rtts",
    [
        ["n2", 0.02],  # not a map
        {"n2": "fast"},  # not a number
        {"n2": True},  # bool
        {"n2": -0.01},  # negative
        {"n2": float("inf")},  # not finite
        {"n2": 3600.0},  # beyond any real round trip
        {"bad/id": 0.02},  # would break a topic
        {f"n{i}": 0.01 for i in range(33)},  # unbounded
    ],
)
def test_bad_peer_round_trips_are_payload_errors(rtts: object) -> None:
    fields = {"v": 1, "active_sessions": 1, "queued_steps": 0, "free_kv_tokens": 0, "tokens_per_s": 0.0}
    with pytest.raises(PayloadError):
        decode(T, T.load("n1"), bytes(msgpack.packb({**fields, "peer_rtts": rtts})))
