"""Control plane over MQTT: topic names and msgpack payloads.

Topics live under ``swarm/<swarm-id>/``:

==========================  ========  ============  ==========================================
topic                       retained  publisher     payload
==========================  ========  ============  ==========================================
``node/<id>/status``        yes       node          :class:`NodeStatus` (Last Will: offline)
``node/<id>/load``          no        node          :class:`NodeLoad`, every ~2 s
``assign/<id>``             yes       coordinator   :class:`Assign`
``events``                  no        anyone        :class:`Event`
``coordinator/lease``       yes       coordinator   :class:`Lease` (Last Will: deleted)
==========================  ========  ============  ==========================================

Every payload is a msgpack map carrying ``"v"`` (:data:`PAYLOAD_VERSION`). Decoding is
strict about the fields it knows and ignores fields it does not, so a newer peer can add
fields without breaking an older one. A malformed payload raises :class:`PayloadError`;
receivers log it and carry on. An empty payload on a retained topic is MQTT's way of
deleting the retained message and is reported as ``None`` by :func:`decode`.

This module is the only place where these dataclasses meet msgpack; it does no I/O.
The MQTT connections (:class:`PresenceClient` for nodes, the reconnecting base class the
coordinator's registry builds on) are in :mod:`swarm_proto.presence_client`. Both sit in
``swarm_proto`` because the node (publisher) and the coordinator (subscriber) share
them, and the node may not import the coordinator.
"""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Final, Union

import msgpack

from swarm_proto.errors import SwarmProtoError, WireError

PAYLOAD_VERSION: Final = 1
DEFAULT_PORT: Final = 1883
_ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


class PresenceError(SwarmProtoError):
    """The MQTT side of the control plane failed (bad broker URL, not connected)."""


class PayloadError(WireError):
    """A control-plane payload or topic is malformed; receivers log it and ignore it."""


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is usable inside a topic (no ``/``, ``+``, ``#``, spaces)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise PayloadError(f"bad {kind} {value!r}: use 1-128 of [A-Za-z0-9_.:@-]")
    return value


# ---------------------------------------------------------------------------
# Topics
# ---------------------------------------------------------------------------


class TopicKind(str, enum.Enum):
    STATUS = "status"
    LOAD = "load"
    ASSIGN = "assign"
    EVENTS = "events"
    LEASE = "lease"


@dataclass(frozen=True)
class Topics:
    """Topic names of one swarm."""

    swarm_id: str

    def __post_init__(self) -> None:
        check_id("swarm id", self.swarm_id)

    @property
    def prefix(self) -> str:
        return f"swarm/{self.swarm_id}/"

    @property
    def all(self) -> str:
        return f"swarm/{self.swarm_id}/#"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    def status(self, node_id: str) -> str:
        return f"{self.prefix}node/{check_id('node id', node_id)}/status"

    def load(self, node_id: str) -> str:
        return f"{self.prefix}node/{check_id('node id', node_id)}/load"

    def assign(self, node_id: str) -> str:
        return f"{self.prefix}assign/{check_id('node id', node_id)}"

    @property
    def lease(self) -> str:
        return f"{self.prefix}coordinator/lease"

    def parse(self, topic: str) -> tuple[TopicKind, str | None]:
        """Split a topic of this swarm into its kind and node id (``None`` for events)."""
        if not topic.startswith(self.prefix):
            raise PayloadError(f"topic {topic!r} is not under {self.prefix!r}")
        parts = topic[len(self.prefix) :].split("/")
        if parts == ["events"]:
            return TopicKind.EVENTS, None
        if parts == ["coordinator", "lease"]:
            return TopicKind.LEASE, None
        if len(parts) == 2 and parts[0] == "assign":
            return TopicKind.ASSIGN, check_id("node id", parts[1])
        if len(parts) == 3 and parts[0] == "node" and parts[2] in ("status", "load"):
            return TopicKind(parts[2]), check_id("node id", parts[1])
        raise PayloadError(f"unknown topic {topic!r}")


# ---------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open range of decoder layers ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.end, int)):
            raise PayloadError(f"layer range needs ints, got {self.start!r}, {self.end!r}")
        if not 0 <= self.start < self.end:
            raise PayloadError(f"bad layer range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


class NodeState(str, enum.Enum):
    STARTING = "starting"  # connected, nothing loaded yet, waiting for an assignment
    LOADING = "loading"  # reading the weights of its assigned range
    READY = "ready"  # serving ``hosted``
    DRAINING = "draining"  # finishing its sessions, takes no new ones
    OFFLINE = "offline"  # gone (graceful stop, or the broker's Last Will)


@dataclass(frozen=True)
class NodeStatus:
    """What a node is and what it hosts; retained, so a new subscriber sees it at once.

    ``speed`` is the node's measured decode speed in layer-steps per second at batch 1
    (one token through one layer): a node hosting ``n`` layers takes about ``n / speed``
    seconds per token. ``memory_budget`` is the bytes it may spend on weights.
    ``prefill_speed`` is positions per second through one layer for a prompt chunk.
    A ``pinned`` node was told its layers by its operator (``--layers``) and ignores
    assignments; the coordinator plans around it. ``layer_bytes`` is what one layer
    costs this node in its weight format (``weight_format``: ``bfloat16``, ``int4``,
    ``Q4_1+Q8_0``...); 0 (an older node) lets the coordinator assume the swarm default.
    ``exposed``: the node listens beyond loopback with neither TLS nor a swarm token
    (``swarm_proto.tls.exposed``); the dashboard warns about it.
    """

    node_id: str
    address: str = ""
    model: str = ""
    hosted: LayerRange | None = None
    device: str = "cpu"
    memory_budget: int = 0
    speed: float = 0.0
    state: NodeState = NodeState.STARTING
    prefill_speed: float = 0.0
    pinned: bool = False
    layer_bytes: int = 0
    weight_format: str = ""
    exposed: bool = False

    def __post_init__(self) -> None:
        check_id("node id", self.node_id)
        if self.layer_bytes < 0 or len(self.weight_format) > 64:
            raise PayloadError(f"node {self.node_id}: negative layer bytes or an overlong weight format")
        if not math.isfinite(self.prefill_speed) or self.prefill_speed < 0:
            raise PayloadError(f"node {self.node_id}: bad prefill speed")
        if self.memory_budget < 0 or not math.isfinite(self.speed) or self.speed < 0:
            raise PayloadError(f"node {self.node_id}: negative budget or bad speed")

    def offline(self) -> NodeStatus:
        return replace(self, state=NodeState.OFFLINE)


MAX_EPOCH: Final = 2**53  # assignment epochs; plans use milliseconds since 1970 (~2**41)
MAX_LOAD_SESSIONS: Final = 32  # sessions one load lists: the most recently active
MAX_SESSION_ID: Final = 128  # as a node accepts in OpenSession
MAX_PEER_RTTS: Final = 32  # peers one load reports round trips to
MAX_RTT_S: Final = 60.0  # a longer "round trip" is a broken measurement


@dataclass(frozen=True)
class SessionLoad:
    """One session open on a node, as its load lists it: what a dashboard shows of the
    sessions the swarm serves (every hop of a session reports it under the same id)."""

    session_id: str
    start: int  # the layers this node runs for it, [start, end)
    end: int
    position: int  # tokens in its cache here
    prompt_tokens: int  # 0 when the client did not say
    max_new_tokens: int  # 0 when unbounded
    age_s: float  # since it opened on this node
    idle_s: float  # since its last step

    def __post_init__(self) -> None:
        sid = self.session_id
        if not isinstance(sid, str) or not 0 < len(sid) <= MAX_SESSION_ID or not sid.isprintable():
            raise PayloadError(f"bad session id {sid!r}: 1..{MAX_SESSION_ID} printable characters")
        if min(self.start, self.position, self.prompt_tokens, self.max_new_tokens) < 0 or self.end <= self.start:
            raise PayloadError(f"session {sid!r}: bad counters or layers [{self.start}, {self.end})")
        if not all(math.isfinite(t) and t >= 0 for t in (self.age_s, self.idle_s)):
            raise PayloadError(f"session {sid!r}: bad times {self.age_s!r}, {self.idle_s!r}")


@dataclass(frozen=True)
class PeerRtt:
    """A round trip this node measured to a peer it may forward to (link-aware routing)."""

    node_id: str
    rtt_s: float

    def __post_init__(self) -> None:
        check_id("node id", self.node_id)
        if not (isinstance(self.rtt_s, float) and math.isfinite(self.rtt_s) and 0 <= self.rtt_s <= MAX_RTT_S):
            raise PayloadError(f"peer {self.node_id}: bad round trip {self.rtt_s!r}")


@dataclass(frozen=True)
class NodeLoad:
    """Current load of a node; published every ~2 s, also serves as a heartbeat."""

    active_sessions: int = 0
    queued_steps: int = 0
    free_kv_tokens: int = 0  # token positions its KV cache can still take (its layers)
    tokens_per_s: float = 0.0
    sessions: tuple[SessionLoad, ...] = ()  # at most MAX_LOAD_SESSIONS, most recently active first
    kv_tokens: int = 0  # token positions its KV budget holds in all (0: not reported)
    free_sessions: int = 0  # sessions it can still open (its count cap; KV room is free_kv_tokens)
    opening_sessions: int = 0  # admitted, waiting for their KV cache (counted in active_sessions' room)
    peer_rtts: tuple[PeerRtt, ...] = ()  # at most MAX_PEER_RTTS: measured round trips to peers

    def __post_init__(self) -> None:
        counters = (self.active_sessions, self.queued_steps, self.free_kv_tokens)
        if min(*counters, self.kv_tokens, self.free_sessions, self.opening_sessions) < 0:
            raise PayloadError("negative load counter")
        if not math.isfinite(self.tokens_per_s) or self.tokens_per_s < 0:
            raise PayloadError(f"bad tokens_per_s {self.tokens_per_s!r}")
        if len(self.sessions) > MAX_LOAD_SESSIONS:
            raise PayloadError(f"{len(self.sessions)} sessions in one load; at most {MAX_LOAD_SESSIONS}")
        if len(self.peer_rtts) > MAX_PEER_RTTS:
            raise PayloadError(f"{len(self.peer_rtts)} peer round trips in one load; at most {MAX_PEER_RTTS}")


@dataclass(frozen=True)
class Assign:
    """Coordinator -> node: host ``layers`` of ``model`` (``None``: host nothing).

    ``epoch`` grows with every new assignment plan, so a node can ignore stale ones; it
    is bounded by :data:`MAX_EPOCH` (milliseconds since 1970 stay far below it), so one
    poisoned epoch cannot push every later plan past what msgpack can carry.
    """

    node_id: str
    model: str
    layers: LayerRange | None
    epoch: int = 0

    def __post_init__(self) -> None:
        check_id("node id", self.node_id)
        if not (type(self.epoch) is int and 0 <= self.epoch <= MAX_EPOCH):
            raise PayloadError(f"assignment of {self.node_id}: epoch {self.epoch!r} out of range 0..{MAX_EPOCH}")
        if len(self.model) > 256:
            raise PayloadError(f"assignment of {self.node_id}: overlong model name")


class EventKind(str, enum.Enum):
    JOIN = "join"
    LEAVE = "leave"
    FAILOVER = "failover"
    REASSIGN = "reassign"
    QUARANTINE = "quarantine"  # a spot check caught the node lying; routes leave it out


@dataclass(frozen=True)
class Event:
    """A line of the swarm's history, for dashboards and logs (never for decisions)."""

    kind: EventKind
    node_id: str | None = None
    detail: str = ""
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Lease:
    """Which coordinator plans the swarm (retained; deleted by its Last Will).

    ``epoch`` grows with every claim, so a holder that was cut off and comes back sees
    that it was replaced; ``address`` is the holder's gRPC address.
    """

    holder: str
    address: str = ""
    epoch: int = 0

    def __post_init__(self) -> None:
        check_id("coordinator id", self.holder)
        if self.epoch < 0 or len(self.address) > 256:
            raise PayloadError(f"lease of {self.holder}: negative epoch or overlong address")


Payload = Union[NodeStatus, NodeLoad, Assign, Event, Lease]


def _pack(fields: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb({"v": PAYLOAD_VERSION, **fields}, use_bin_type=True)
    return data


def _range_out(r: LayerRange | None) -> list[int] | None:
    return None if r is None else [r.start, r.end]


def encode(payload: Payload) -> bytes:
    """msgpack bytes of one payload (the topic carries the node id where there is one)."""
    if isinstance(payload, NodeStatus):
        return _pack(
            {
                "node_id": payload.node_id,
                "address": payload.address,
                "model": payload.model,
                "hosted": _range_out(payload.hosted),
                "device": payload.device,
                "memory_budget": payload.memory_budget,
                "speed": float(payload.speed),
                "state": payload.state.value,
                "prefill_speed": float(payload.prefill_speed),
                "pinned": payload.pinned,
                "layer_bytes": payload.layer_bytes,
                "weight_format": payload.weight_format,
                "exposed": payload.exposed,
            }
        )
    if isinstance(payload, NodeLoad):
        return _pack(
            {
                "active_sessions": payload.active_sessions,
                "queued_steps": payload.queued_steps,
                "free_kv_tokens": payload.free_kv_tokens,
                "tokens_per_s": float(payload.tokens_per_s),
                "kv_tokens": payload.kv_tokens,
                "free_sessions": payload.free_sessions,
                "opening_sessions": payload.opening_sessions,
                # one list per session, in SessionLoad's field order
                "sessions": [
                    [x.session_id, x.start, x.end, x.position, x.prompt_tokens, x.max_new_tokens,
                     float(x.age_s), float(x.idle_s)]
                    for x in payload.sessions
                ],
                "peer_rtts": {p.node_id: float(p.rtt_s) for p in payload.peer_rtts},
            }
        )
    if isinstance(payload, Assign):
        return _pack(
            {
                "node_id": payload.node_id,
                "model": payload.model,
                "layers": _range_out(payload.layers),
                "epoch": payload.epoch,
            }
        )
    if isinstance(payload, Event):
        return _pack(
            {
                "kind": payload.kind.value,
                "node_id": payload.node_id,
                "detail": payload.detail,
                "ts": float(payload.ts),
            }
        )
    if isinstance(payload, Lease):
        return _pack({"holder": payload.holder, "address": payload.address, "epoch": payload.epoch})
    raise TypeError(f"not a presence payload: {type(payload).__name__}")


class _Fields:
    """Typed access to a decoded msgpack map; every mismatch is a PayloadError."""

    def __init__(self, what: str, data: dict[Any, Any]) -> None:
        self.what = what
        self.data = data

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise PayloadError(f"{self.what}: missing field {key!r}")
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            if not (value is None and default is None):
                raise PayloadError(f"{self.what}: field {key!r} has bad value {value!r}")
        return value

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise PayloadError(f"{self.what}: field {key!r} is not a boolean: {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        return float(self.get(key, (int, float), default))

    def range(self, key: str) -> LayerRange | None:
        value = self.get(key, list, None)
        if value is None:
            return None
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise PayloadError(f"{self.what}: field {key!r} is not [start, end]: {value!r}")
        return LayerRange(value[0], value[1])

    def enum(self, key: str, kind: type[enum.Enum], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        try:
            return kind(value)
        except ValueError:
            raise PayloadError(f"{self.what}: field {key!r} has unknown value {value!r}") from None


def _unpack(what: str, data: bytes) -> _Fields:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise PayloadError(f"{what}: not msgpack ({exc})") from exc
    if not isinstance(obj, dict):
        raise PayloadError(f"{what}: expected a map, got {type(obj).__name__}")
    fields = _Fields(what, obj)
    version = fields.get("v", int)
    if version != PAYLOAD_VERSION:
        raise PayloadError(f"{what}: unsupported payload version {version}")
    return fields


def decode_status(node_id: str, data: bytes) -> NodeStatus:
    f = _unpack(f"status of {node_id}", data)
    sender = f.get("node_id", str)
    if sender != node_id:
        raise PayloadError(f"status on the topic of {node_id} names node {sender!r}")
    return NodeStatus(
        node_id=node_id,
        address=f.get("address", str, ""),
        model=f.get("model", str, ""),
        hosted=f.range("hosted"),
        device=f.get("device", str, "cpu"),
        memory_budget=f.get("memory_budget", int, 0),
        speed=f.number("speed", 0.0),
        state=f.enum("state", NodeState),
        prefill_speed=f.number("prefill_speed", 0.0),
        pinned=f.flag("pinned"),
        layer_bytes=f.get("layer_bytes", int, 0),
        weight_format=f.get("weight_format", str, ""),
        exposed=f.flag("exposed"),
    )


def decode_load(node_id: str, data: bytes) -> NodeLoad:
    f = _unpack(f"load of {node_id}", data)
    return NodeLoad(
        active_sessions=f.get("active_sessions", int),
        queued_steps=f.get("queued_steps", int),
        free_kv_tokens=f.get("free_kv_tokens", int),
        tokens_per_s=float(f.get("tokens_per_s", (int, float))),
        kv_tokens=f.get("kv_tokens", int, 0),
        free_sessions=f.get("free_sessions", int, 0),
        opening_sessions=f.get("opening_sessions", int, 0),
        sessions=_sessions(f),
        peer_rtts=_peer_rtts(f),
    )


def _peer_rtts(f: _Fields) -> tuple[PeerRtt, ...]:
    items = f.get("peer_rtts", dict, {})  # absent from older nodes
    if len(items) > MAX_PEER_RTTS:
        raise PayloadError(f"{f.what}: {len(items)} peer round trips; at most {MAX_PEER_RTTS}")
    out = []
    for peer, rtt in items.items():
        if not isinstance(peer, str) or isinstance(rtt, bool) or not isinstance(rtt, (int, float)):
            raise PayloadError(f"{f.what}: a peer round trip has bad fields: {peer!r:.100} {rtt!r:.100}")
        out.append(PeerRtt(peer, float(rtt)))
    return tuple(out)


def _sessions(f: _Fields) -> tuple[SessionLoad, ...]:
    items = f.get("sessions", list, [])  # absent from older nodes
    if len(items) > MAX_LOAD_SESSIONS:
        raise PayloadError(f"{f.what}: {len(items)} sessions; at most {MAX_LOAD_SESSIONS}")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 8):
            raise PayloadError(f"{f.what}: a session is not an 8-item list: {item!r:.200}")
        sid, start, end, position, prompt, max_new, age, idle = item
        if not isinstance(sid, str) or not all(type(c) is int for c in (start, end, position, prompt, max_new)):
            raise PayloadError(f"{f.what}: a session has bad fields: {item!r:.200}")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (age, idle)):
            raise PayloadError(f"{f.what}: a session has bad times: {item!r:.200}")
        out.append(SessionLoad(sid, start, end, position, prompt, max_new, float(age), float(idle)))
    return tuple(out)


def decode_assign(node_id: str, data: bytes) -> Assign:
    f = _unpack(f"assignment of {node_id}", data)
    target = f.get("node_id", str)
    if target != node_id:
        raise PayloadError(f"assignment on the topic of {node_id} names node {target!r}")
    return Assign(node_id, f.get("model", str), f.range("layers"), f.get("epoch", int, 0))


def decode_event(data: bytes) -> Event:
    f = _unpack("event", data)
    return Event(
        kind=f.enum("kind", EventKind),
        node_id=f.get("node_id", str, None),
        detail=f.get("detail", str, ""),
        ts=f.number("ts", 0.0),
    )


def decode_lease(data: bytes) -> Lease:
    f = _unpack("lease", data)
    return Lease(f.get("holder", str), f.get("address", str, ""), f.get("epoch", int, 0))


def decode(topics: Topics, topic: str, data: bytes) -> tuple[TopicKind, str | None, Payload | None]:
    """Decode any message of the swarm: ``(kind, node id, payload or None if deleted)``."""
    kind, node_id = topics.parse(topic)
    if not data:
        return kind, node_id, None
    if kind is TopicKind.STATUS:
        assert node_id is not None
        return kind, node_id, decode_status(node_id, data)
    if kind is TopicKind.LOAD:
        assert node_id is not None
        return kind, node_id, decode_load(node_id, data)
    if kind is TopicKind.ASSIGN:
        assert node_id is not None
        return kind, node_id, decode_assign(node_id, data)
    if kind is TopicKind.LEASE:
        return kind, node_id, decode_lease(data)
    return kind, node_id, decode_event(data)


# The connection classes live in swarm_proto.presence_client (they need aiomqtt); they
# are importable from here too, loaded on first use.
_CLIENT_NAMES = frozenset(
    {"AssignHandler", "Backoff", "BrokerAddress", "LoadSource", "PresenceClient", "ReconnectingClient"}
)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from swarm_proto import presence_client

        return getattr(presence_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
