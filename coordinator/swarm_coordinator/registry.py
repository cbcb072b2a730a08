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
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

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
    PayloadError,
    TopicKind,
    Topics,
    decode,
    encode,
)
from swarm_proto.presence_client import Backoff, BrokerAddress, ReconnectingClient

log = logging.getLogger(__name__)

__all__ = ["Registry", "RegistryConfig"]


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
    ) -> None:
        super().__init__(
            BrokerAddress.parse(config.broker_url),
            # unique per process: two coordinators must not take over each other's session
            f"{config.client_id}-{config.swarm_id}-{secrets.token_hex(3)}",
            keepalive=config.keepalive,
            backoff=backoff,
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
        self.events: deque[Event] = deque(maxlen=config.max_events)
        self.malformed = 0  # messages ignored because their payload was bad

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
        """Yield the state after every change (changes in quick succession coalesce)."""
        while True:
            changed = self._changed
            await changed.wait()
            yield self.state

    @property
    def membership_event(self) -> asyncio.Event:
        """Set at the next change of what planning reads: statuses, timeouts and
        assignments (load reports, the bulk of the traffic, do not set it)."""
        return self._membership

    def _notify(self, membership: bool = True) -> None:
        self._state = None
        self._changed.set()
        self._changed = asyncio.Event()
        if membership:
            self._membership.set()
            self._membership = asyncio.Event()

    # incoming ------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Apply one MQTT message; malformed ones are logged and counted, never raised."""
        try:
            kind, node_id, message = decode(self.topics, topic, payload)
        except PayloadError as exc:
            self.malformed += 1
            log.warning("ignoring malformed message on %s: %s", topic, exc)
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
            if message is None:
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
        if status is None:  # retained status cleared: the node is forgotten
            self._forget(node_id)
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
        sent = await self.publish(self.topics.events, encode(event))
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
            sends.append(self.publish(self.topics.assign(node_id), encode(message), retain=True))
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
            await client.publish(self.topics.assign(node_id), encode(message), qos=1, retain=True)
        await client.subscribe(self.topics.all, qos=1)

    async def on_message(self, message: aiomqtt.Message) -> None:
        if not message.topic.value.startswith(self.topics.prefix):
            return  # amqtt 0.12 sends a new client the retained messages of other swarms too
        payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
        self.handle(message.topic.value, bytes(payload), retained=bool(message.retain))
        if self._outbox:  # published by while_connected: the receive loop never waits on the broker
            self._outbox_ready.set()

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
