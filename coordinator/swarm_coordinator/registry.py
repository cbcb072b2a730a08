"""The coordinator's registry: a :class:`SwarmState` built only from MQTT messages.

The registry subscribes to ``swarm/<id>/#``. Node status (retained, Last Will = offline)
and load messages make up the nodes; the retained ``assign/<id>`` messages, which the
registry itself publishes, make up the current assignment. A restarted coordinator
therefore rebuilds everything from the broker's retained messages, and nodes never talk
to the coordinator directly.

A node is offline when its status says so (graceful stop, or the broker's Last Will
when its connection dies) or when nothing was heard from it for ``node_timeout_s``
(its load messages double as heartbeats); a later message brings it back. Malformed
payloads are logged and ignored. Joins and leaves seen live go out on ``events``.

Every message is sealed (:mod:`swarm_proto.trust`) and passes the registry's
:class:`~swarm_proto.trust.PresenceGuard` before it changes anything: node messages need
an admitted key (the swarm token's proof or the allow-list) that owns the node id,
assignments need the registry's own key, counters must grow, empty retained payloads
are ignored (only :meth:`Registry.forget` forgets a node), and at most ``max_nodes``
node ids are tracked. What the guard refuses is counted in :attr:`Registry.dropped`.

Opening a seal (two msgpack layers and an Ed25519 verification, ~100 us, most of a
message's cost) happens off the event loop: received messages queue in an inbox (at
most ``MAX_INBOX``; the receive loop waits beyond that), and one worker thread opens
them in batches, in arrival order (the verification releases the GIL, so routes are
answered meanwhile); the loop then applies each batch in order. Nothing is applied
before its seal verified. :meth:`Registry.handle` does both at once (tests, tools).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiomqtt

from swarm_coordinator.state import Assignment, LayerRange, NodeView, SwarmState
from swarm_proto.presence import (
    Assign,
    Event,
    EventKind,
    Lease,
    NodeLoad,
    NodeState,
    NodeStatus,
    Payload,
    PayloadError,
    TopicKind,
    Topics,
    encode,
)
from swarm_proto.presence_client import Backoff, BrokerAddress, ReconnectingClient
from swarm_proto.trust import Identity, PresenceGuard, Seal, Sealer, decode_sealed, membership_proof

log = logging.getLogger(__name__)

__all__ = ["Registry", "RegistryConfig"]

MAX_INBOX = 10_000  # received messages waiting to be opened; the receive loop waits beyond
MAX_BATCH = 500  # messages opened per trip to the worker thread

Opened = tuple[TopicKind, str | None, Payload | None, Seal | None]


def _open(topics: Topics, topic: str, payload: bytes) -> Opened | PayloadError:
    try:
        return decode_sealed(topics, topic, payload)
    except PayloadError as exc:
        return exc


def _open_batch(topics: Topics, batch: list[tuple[str, bytes, bool]]) -> list[Opened | PayloadError]:
    """Runs in the registry's worker thread: pure, touches no registry state."""
    return [_open(topics, topic, payload) for topic, payload, _ in batch]


@dataclass(frozen=True)
class RegistryConfig:
    broker_url: str
    swarm_id: str
    model: str
    num_layers: int
    bytes_per_layer: int
    client_id: str = "coordinator"
    node_timeout_s: float = 10.0  # silence after which a node counts as offline
    forget_after_s: float = 600.0  # a node offline this long is forgotten, its retained messages cleared
    keepalive: int = 10
    max_events: int = 500  # recent events kept for the dashboard
    token: str = field(default="", repr=False)  # proof of membership asked of node keys
    allowed_keys: frozenset[bytes] = frozenset()  # node keys admitted without the token's proof
    max_nodes: int = 4096  # node ids tracked at most (a flood of new ids is dropped)
    coordinator_key: bytes | None = None  # observers: whose assignments to believe (None: first seen)


class Registry(ReconnectingClient):
    """Live view of the swarm; ``state`` is an immutable snapshot.

    ::

        async with Registry(config) as registry:
            state = await registry.wait_until(lambda s: len(s.online()) >= 2, timeout=10)
            await registry.publish_assignment(plan(state))
    """

    def __init__(
        self,
        config: RegistryConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff = Backoff(),
        identity: Identity | None = None,
        broker: BrokerAddress | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``identity``: the coordinator's key; its registry believes assignments sealed by
        it alone. Without one the registry is an observer (a fresh key; assignments from
        ``config.coordinator_key`` or the first sealer seen)."""
        own = identity or Identity.generate()
        super().__init__(
            broker or BrokerAddress.parse(config.broker_url),
            # unique per process: two coordinators must not take over each other's session
            f"{config.client_id}-{config.swarm_id}-{secrets.token_hex(3)}",
            keepalive=config.keepalive,
            backoff=backoff,
            sealer=Sealer(own, membership_proof(config.token, config.swarm_id, own.public)),
            tls_context=tls_context,
        )
        self.identity = own
        self.guard = PresenceGuard(
            config.swarm_id,
            token=config.token,
            allowed_keys=config.allowed_keys,
            coordinator_key=own.public if identity is not None else config.coordinator_key,
            own_key=own.public,
            max_nodes=config.max_nodes,
        )
        self.config = config
        self.topics = Topics(config.swarm_id)
        self._clock = clock
        self._statuses: dict[str, NodeStatus] = {}
        self._loads: dict[str, NodeLoad] = {}
        self._assigns: dict[str, Assign] = {}
        self._last_seen: dict[str, float] = {}
        self._timed_out: set[str] = set()
        self._outbox: list[Event] = []
        self._changed = asyncio.Event()
        self._outbox_ready = asyncio.Event()  # events wait in _outbox for while_connected
        self._membership = asyncio.Event()  # set by what planning cares about (not loads)
        self._state: SwarmState | None = None  # the snapshot, rebuilt on the first read after a change
        self._route_state: SwarmState | None = None  # snapshot()
        self._route_at = 0.0
        self._views: dict[str, NodeView] = {}  # per node, dropped when one of its messages arrives
        self.lease: Lease | None = None  # the retained coordinator lease, as last seen (lease.py)
        self.lease_seen = asyncio.Event()  # set (and replaced) at every lease message
        self.messages = 0  # MQTT messages handled (metrics, the scale bench)
        self.version = 0  # counts changes (changes())
        self.events: deque[Event] = deque(maxlen=config.max_events)
        self.malformed = 0  # messages ignored because their payload was bad
        self._inbox: list[tuple[str, bytes, bool]] = []  # (topic, payload, retained), not yet opened
        self._room = asyncio.Event()  # cleared while the inbox is full
        self._room.set()
        self._drainer: asyncio.Task[None] | None = None
        self._opener: ThreadPoolExecutor | None = None
        self.batches = 0  # trips to the worker thread (metrics, the scale bench)

    def lease_sealer(self) -> Sealer:
        """A sealer of this coordinator's key for the lease holder's own connection."""
        return Sealer(self.identity, membership_proof(self.config.token, self.config.swarm_id, self.identity.public))

    @property
    def dropped(self) -> Counter[str]:
        """Well-formed messages the guard refused, by reason (unsigned, replayed...)."""
        return self.guard.dropped

    # the view ----------------------------------------------------------------

    @property
    def state(self) -> SwarmState:
        """The current snapshot. Messages only fold into dicts; the snapshot is rebuilt
        on the first read after a change, so a burst of messages costs one rebuild."""
        if self._state is None:
            views = []
            for node_id, status in self._statuses.items():
                view = self._views.get(node_id)
                if view is None:
                    if node_id in self._timed_out:
                        status = status.offline()
                    view = NodeView(
                        status, self._loads.get(node_id), self._assigns.get(node_id), self._last_seen.get(node_id, 0.0)
                    )
                    self._views[node_id] = view
                views.append(view)
            self._state = SwarmState.of(self.config.model, self.config.num_layers, self.config.bytes_per_layer, views)
        return self._state

    def snapshot(self, max_age: float) -> SwarmState:
        """The state for routing, reused for up to ``max_age`` seconds: a thousand nodes
        send hundreds of messages a second, and a route a tenth of a second behind is
        still one the client can fail over from (a crash takes the broker longer)."""
        now = self._clock()
        if self._route_state is None or now - self._route_at > max_age:
            self._route_state = self.state
            self._route_at = now
        return self._route_state

    @property
    def epoch(self) -> int:
        return max((a.epoch for a in self._assigns.values()), default=0)

    async def wait_until(self, predicate: Callable[[SwarmState], bool], timeout: float) -> SwarmState:
        """The first state (now or later) that satisfies ``predicate``; TimeoutError if none."""

        async def first() -> SwarmState:
            while True:
                changed = self._changed
                state = self.state
                if predicate(state):
                    return state
                await changed.wait()

        return await asyncio.wait_for(first(), timeout)

    async def changes(self) -> AsyncGenerator[SwarmState, None]:
        """Yield the state after every change. Changes in quick succession coalesce, and
        a reader that takes its time between reads misses none: it gets the state after
        them (a thousand nodes change the registry hundreds of times a second, and every
        state yielded is a snapshot built)."""
        seen = self.version
        while True:
            if self.version == seen:
                await self._changed.wait()
            seen = self.version
            yield self.state

    @property
    def membership_event(self) -> asyncio.Event:
        """Set at the next change of what planning reads: statuses, timeouts and
        assignments (load reports, the bulk of the traffic, do not set it)."""
        return self._membership

    def _notify(self, membership: bool = True) -> None:
        self._state = None
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()
        if membership:
            self._membership.set()
            self._membership = asyncio.Event()

    # incoming ------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Apply one MQTT message; malformed ones are logged and counted, never raised."""
        self._apply(topic, _open(self.topics, topic, payload), retained)

    def _apply(self, topic: str, opened: Opened | PayloadError, retained: bool) -> None:
        if isinstance(opened, PayloadError):
            self.malformed += 1
            log.warning("ignoring malformed message on %s: %s", topic, opened)
            return
        kind, node_id, message, seal = opened
        if not self.guard.check(kind, node_id, message, seal):
            return
        now = self._clock()
        self.messages += 1
        if kind is TopicKind.LEASE:
            self.lease = message if isinstance(message, Lease) else None
            self.lease_seen.set()
            self.lease_seen = asyncio.Event()
            return
        if kind is TopicKind.EVENTS:
            if isinstance(message, Event):
                self.events.append(message)
            return
        assert node_id is not None
        if kind is TopicKind.ASSIGN:
            if message is None:  # the guard drops empty payloads: kept for an unguarded registry
                self._assigns.pop(node_id, None)
                self._views.pop(node_id, None)
            elif isinstance(message, Assign):
                self._assigns[node_id] = message
                self._views.pop(node_id, None)
        elif kind is TopicKind.STATUS:
            self._on_status(node_id, message if isinstance(message, NodeStatus) else None, now, retained)
        elif kind is TopicKind.LOAD and isinstance(message, NodeLoad):
            if node_id not in self._statuses:
                return  # a load without a status names nobody we know: keep no table entry for it
            self._loads[node_id] = message
            self._views.pop(node_id, None)
            self._last_seen[node_id] = now
            if self._revive(node_id):
                self._notify()
            else:
                self._notify(membership=False)
            return
        self._notify()

    def _on_status(self, node_id: str, status: NodeStatus | None, now: float, retained: bool) -> None:
        before = self._statuses.get(node_id)
        was_online = before is not None and before.state is not NodeState.OFFLINE and node_id not in self._timed_out
        if status is None:  # the guard lets no empty status through
            return
        self._statuses[node_id] = status
        self._last_seen[node_id] = now
        self._timed_out.discard(node_id)
        self._views.pop(node_id, None)
        online = status.state is not NodeState.OFFLINE
        if online and not was_online and not retained:
            self._outbox.append(Event(EventKind.JOIN, node_id, f"{status.address} {status.device}"))
        elif not online and was_online:
            self._outbox.append(Event(EventKind.LEAVE, node_id, "offline"))

    def _revive(self, node_id: str) -> bool:
        if node_id not in self._timed_out:
            return False
        self._timed_out.discard(node_id)
        self._views.pop(node_id, None)
        self._outbox.append(Event(EventKind.JOIN, node_id, "heard from again"))
        return True

    def _forget(self, node_id: str) -> None:
        for table in (self._statuses, self._loads, self._last_seen):
            table.pop(node_id, None)
        self._timed_out.discard(node_id)
        self.guard.forget(node_id)
        self._views.pop(node_id, None)

    def sweep(self) -> list[str]:
        """Mark nodes silent for longer than ``node_timeout_s`` offline; returns their ids."""
        now = self._clock()
        silent = [
            node_id
            for node_id, status in self._statuses.items()
            if status.state is not NodeState.OFFLINE
            and node_id not in self._timed_out
            and now - self._last_seen.get(node_id, now) > self.config.node_timeout_s
        ]
        for node_id in silent:
            self._timed_out.add(node_id)
            self._views.pop(node_id, None)
            self._outbox.append(Event(EventKind.LEAVE, node_id, f"silent for {self.config.node_timeout_s:g}s"))
        if silent:
            self._notify()
        return silent

    # outgoing ------------------------------------------------------------------

    async def publish_event(self, event: Event) -> bool:
        sent = await self.publish(self.topics.events, self.seal(self.topics.events, encode(event)))
        if not sent:  # nobody will echo it back to us
            self.events.append(event)
        return sent

    async def publish_assignment(self, assignment: Assignment) -> dict[str, LayerRange | None]:
        """Tell nodes their new ranges (retained). Returns what changed; nodes dropped from
        the assignment are told to host nothing."""
        current = Assignment({n: a.layers for n, a in self._assigns.items() if a.layers is not None})
        changes = current.changes(assignment)
        if not changes:
            return changes
        epoch = max(self.epoch + 1, int(time.time() * 1000))
        sends = []
        for node_id, layers in changes.items():
            message = Assign(node_id, self.config.model, layers, epoch)
            self._assigns[node_id] = message
            self._views.pop(node_id, None)
            topic = self.topics.assign(node_id)
            sends.append(self.publish(topic, self.seal(topic, encode(message)), retain=True))
        await asyncio.gather(*sends)  # pipelined: a thousand changes do not wait a thousand round trips
        summary = ", ".join(f"{n}: {r if r else 'none'}" for n, r in changes.items())
        await self.publish_event(Event(EventKind.REASSIGN, None, summary))
        self._notify()
        return changes

    async def forget(self, node_id: str) -> None:
        """Clear a node's retained status and assignment for good (it was removed)."""
        await self.publish(self.topics.status(node_id), b"", retain=True)
        await self.publish(self.topics.assign(node_id), b"", retain=True)
        self._forget(node_id)
        self._assigns.pop(node_id, None)
        self._views.pop(node_id, None)
        self._notify()

    async def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for event in outbox:
            await self.publish_event(event)

    # connection hooks ------------------------------------------------------------

    async def on_connect(self, client: aiomqtt.Client) -> None:
        # A broker that restarted lost our retained assignments: say them again.
        for node_id, message in sorted(self._assigns.items()):
            topic = self.topics.assign(node_id)
            await client.publish(topic, self.seal(topic, encode(message)), qos=1, retain=True)
        await client.subscribe(self.topics.all, qos=1)

    async def on_message(self, message: aiomqtt.Message) -> None:
        if not message.topic.value.startswith(self.topics.prefix):
            return  # amqtt 0.12 sends a new client the retained messages of other swarms too
        payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
        self._inbox.append((message.topic.value, bytes(payload), bool(message.retain)))
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain(), name="registry-open")
        if len(self._inbox) >= MAX_INBOX:
            self._room.clear()
            await self._room.wait()

    async def _drain(self) -> None:
        """Open the inbox in batches on the worker thread; apply each batch in order."""
        loop = asyncio.get_running_loop()
        if self._opener is None:
            self._opener = ThreadPoolExecutor(1, thread_name_prefix="registry-open")
        try:
            while self._inbox:
                batch, self._inbox = self._inbox[:MAX_BATCH], self._inbox[MAX_BATCH:]
                opened = await loop.run_in_executor(self._opener, _open_batch, self.topics, batch)
                self.batches += 1
                for (topic, _, retained), result in zip(batch, opened):
                    self._apply(topic, result, retained)
                if len(self._inbox) < MAX_INBOX:
                    self._room.set()
                if self._outbox:  # published by while_connected: the receive loop never waits on the broker
                    self._outbox_ready.set()
        finally:
            self._drainer = None
            self._room.set()

    async def stop(self) -> None:
        await super().stop()
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        if self._opener is not None:
            self._opener.shutdown(wait=False, cancel_futures=True)
            self._opener = None

    def forgettable(self) -> list[str]:
        """Nodes offline for longer than ``forget_after_s``: a churning swarm would
        otherwise keep every node it ever saw, here and retained on the broker."""
        now = self._clock()
        return [
            node_id
            for node_id, status in self._statuses.items()
            if (status.state is NodeState.OFFLINE or node_id in self._timed_out)
            and now - self._last_seen.get(node_id, now) > self.config.forget_after_s
        ]

    async def while_connected(self, client: aiomqtt.Client) -> None:
        interval = max(0.1, min(1.0, self.config.node_timeout_s / 4))
        while True:
            try:
                await asyncio.wait_for(self._outbox_ready.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._outbox_ready.clear()
            self.sweep()
            for node_id in self.forgettable():
                log.info("forgetting node %s: offline for over %g s", node_id, self.config.forget_after_s)
                await self.forget(node_id)
            if self._outbox:
                await self._flush()
