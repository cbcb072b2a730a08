"""MQTT connections of the control plane: a reconnecting client and the node's presence.

:class:`ReconnectingClient` keeps one MQTT connection alive across broker restarts
(exponential backoff with jitter) and replays its announcements on every reconnect.
:class:`PresenceClient` is the node's side: retained status with an offline Last Will,
load every ~2 s (which doubles as heartbeat), and its assignment from the coordinator.
The coordinator's registry is another :class:`ReconnectingClient`.

Topic names and payloads are in :mod:`swarm_proto.presence`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Union
from urllib.parse import unquote, urlsplit

import aiomqtt

from swarm_proto.daemon import Service
from swarm_proto.presence import (
    DEFAULT_PORT,
    Assign,
    Event,
    NodeLoad,
    NodeStatus,
    PayloadError,
    PresenceError,
    TopicKind,
    Topics,
    decode,
    encode,
)

log = logging.getLogger(__name__)


__all__ = ["AssignHandler", "Backoff", "BrokerAddress", "LoadSource", "PresenceClient", "ReconnectingClient"]


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt://[user[:password]@]host[:port]`` (``host[:port]`` alone works too)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise PresenceError(f"bad broker URL {url!r}: expected mqtt://host[:port]")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise PresenceError(f"bad broker URL {url!r}: {exc}") from exc
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, user, password)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@dataclass(frozen=True)
class Backoff:
    """Exponential reconnect delay with full jitter."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        cap = min(self.maximum, self.initial * self.factor**attempt)
        return random.uniform(cap / 2, cap)


class ReconnectingClient(Service):
    """An MQTT connection that comes back after the broker goes away.

    Subclasses set the Last Will with :meth:`will`, (re)announce themselves in
    :meth:`on_connect`, handle messages in :meth:`on_message` and may run periodic work
    in :meth:`while_connected`; all three run again after every reconnect.
    """

    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str,
        *,
        keepalive: int = 10,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.keepalive = keepalive
        self.backoff = backoff
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.connections = 0  # successful connects so far; tests and metrics read it

    # hooks -----------------------------------------------------------------

    def will(self) -> aiomqtt.Will | None:
        return None

    async def on_connect(self, client: aiomqtt.Client) -> None:
        """Subscribe and publish what a fresh broker must learn; runs on every connect."""

    async def on_message(self, message: aiomqtt.Message) -> None:
        """Handle one received message; must not raise for bad payloads."""

    async def while_connected(self, client: aiomqtt.Client) -> None:
        """Periodic work for the life of one connection (returns only by raising)."""
        await asyncio.Event().wait()

    # lifecycle -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, *, wait: float | None = 10.0) -> None:
        """Start the connection loop; with ``wait``, return once connected (or raise)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
        if wait is not None:
            await self.wait_connected(wait)

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise PresenceError(f"no MQTT connection to {self.broker.url} after {timeout:g}s") from None

    async def stop(self) -> None:
        """Disconnect cleanly (no Last Will) after :meth:`before_disconnect`."""
        client = self._client
        if client is not None and self.connected:
            try:
                await asyncio.wait_for(self.before_disconnect(client), 5.0)
            except (aiomqtt.MqttError, asyncio.TimeoutError) as exc:
                log.warning("%s: could not say goodbye: %s", self.client_id, exc)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def before_disconnect(self, client: aiomqtt.Client) -> None:
        """Last words before a clean disconnect."""

    async def abort(self) -> None:
        """Drop the connection as a crash would: the socket closes without an MQTT
        DISCONNECT, so the broker publishes the Last Will; no reconnect follows.
        (Simulations and tests: a process that dies does this by itself.)"""
        client = self._client
        if client is not None:
            sock = client._client.socket()  # paho's socket: the only way to cut it
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # aiomqtt's exit may wait for a DISCONNECT acknowledgement that never comes
            await asyncio.wait([task], timeout=5.0)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> bool:
        """Publish now if connected; ``False`` if not (re-announcing is on_connect's job)."""
        client = self._client
        if client is None or not self.connected:
            log.debug("%s: not connected, dropping publish to %s", self.client_id, topic)
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("%s: publish to %s failed: %s", self.client_id, topic, exc)
            return False
        return True

    async def _run(self) -> None:
        attempt = 0
        while True:
            client = aiomqtt.Client(
                self.broker.host,
                self.broker.port,
                username=self.broker.username,
                password=self.broker.password,
                identifier=self.client_id,
                will=self.will(),
                keepalive=self.keepalive,
                clean_session=True,
                timeout=10.0,
            )
            try:
                async with client:
                    self._client = client
                    await self.on_connect(client)
                    self._connected.set()
                    self.connections += 1
                    attempt = 0
                    log.info("%s: connected to %s", self.client_id, self.broker.url)
                    await _first_done(self._receive(client), self.while_connected(client))
            except aiomqtt.MqttError as exc:
                log.info("%s: MQTT connection to %s lost or refused: %s", self.client_id, self.broker.url, exc)
            except Exception:  # a bug in a hook: log it and reconnect rather than go silent
                log.exception("%s: MQTT session failed", self.client_id)
            finally:
                self._connected.clear()
                self._client = None
            delay = self.backoff.delay(attempt)
            attempt += 1
            await asyncio.sleep(delay)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                await self.on_message(message)
            except Exception:  # a handler bug must not take presence down with it
                log.exception("%s: handler failed on %s", self.client_id, message.topic)
        raise aiomqtt.MqttError("message stream ended")


async def _first_done(*coros: Awaitable[None]) -> None:
    """Run coroutines until the first one finishes; re-raise its error, cancel the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


LoadSource = Callable[[], NodeLoad]
AssignHandler = Callable[[Assign], Union[Awaitable[None], None]]


class PresenceClient(ReconnectingClient):
    """A node's presence: retained status with an offline Last Will, periodic load,
    and its assignment from the coordinator.

    ``load`` is called every ``load_interval`` seconds (the load doubles as heartbeat);
    ``on_assign`` gets each new :class:`Assign` (retained, so also after a reconnect).
    """

    def __init__(
        self,
        broker: BrokerAddress,
        swarm_id: str,
        status: NodeStatus,
        *,
        load: LoadSource | None = None,
        on_assign: AssignHandler | None = None,
        load_interval: float = 2.0,
        keepalive: int = 10,
        backoff: Backoff = Backoff(),
    ) -> None:
        super().__init__(broker, f"node-{swarm_id}-{status.node_id}", keepalive=keepalive, backoff=backoff)
        self.topics = Topics(swarm_id)
        self._status = status
        self._load = load or NodeLoad
        self._on_assign = on_assign
        self.load_interval = load_interval
        self.assignment: Assign | None = None

    @property
    def status(self) -> NodeStatus:
        return self._status

    def will(self) -> aiomqtt.Will:
        return aiomqtt.Will(
            self.topics.status(self._status.node_id), encode(self._status.offline()), qos=1, retain=True
        )

    async def on_connect(self, client: aiomqtt.Client) -> None:
        node_id = self._status.node_id
        await client.subscribe(self.topics.assign(node_id), qos=1)
        await client.publish(self.topics.status(node_id), encode(self._status), qos=1, retain=True)

    async def set_status(self, status: NodeStatus) -> bool:
        """Publish a new retained status (also re-sent after every reconnect)."""
        if status.node_id != self._status.node_id:
            raise PresenceError("a presence client cannot change its node id")
        self._status = status
        return await self.publish(self.topics.status(status.node_id), encode(status), retain=True)

    async def publish_event(self, event: Event) -> bool:
        return await self.publish(self.topics.events, encode(event))

    async def while_connected(self, client: aiomqtt.Client) -> None:
        topic = self.topics.load(self._status.node_id)
        while True:
            await client.publish(topic, encode(self._load()), qos=0)
            await asyncio.sleep(self.load_interval)

    async def on_message(self, message: aiomqtt.Message) -> None:
        if not message.topic.value.startswith(self.topics.prefix):
            return  # amqtt 0.12 also sends the retained messages of other swarms (see below)
        try:
            kind, node_id, payload = decode(self.topics, message.topic.value, bytes(message.payload))
        except PayloadError as exc:
            log.warning("%s: ignoring malformed message on %s: %s", self.client_id, message.topic, exc)
            return
        if kind is not TopicKind.ASSIGN or not isinstance(payload, Assign):
            return
        if node_id != self._status.node_id:
            # amqtt 0.12 sends a connecting client the retained messages of every
            # subscription on the broker, not only of its own: not ours, not for us.
            return
        if self.assignment is not None and payload.epoch < self.assignment.epoch:
            log.info("%s: ignoring stale assignment epoch %d", self.client_id, payload.epoch)
            return
        if payload == self.assignment:
            return
        self.assignment = payload
        if self._on_assign is not None:
            result = self._on_assign(payload)
            if result is not None:
                await result

    async def before_disconnect(self, client: aiomqtt.Client) -> None:
        offline = self._status.offline()
        await client.publish(self.topics.status(offline.node_id), encode(offline), qos=1, retain=True)
