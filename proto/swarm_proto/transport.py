"""gRPC plumbing shared by the node's server and its outgoing streams: message-size
limits, keepalive, and the swarm token.

Keepalive matters for a swarm of ordinary machines: a peer that vanishes without
closing its sockets (power loss, a network partition) would otherwise leave a
session stream hanging until the client's step timeout. With pings every 10 s and
a 5 s answer deadline, a dead successor is noticed within about 15 s even on an
idle session.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

__all__ = [
    "ChannelPool",
    "Metadata",
    "TokenInterceptor",
    "call_metadata",
    "channel_options",
    "receive_limit",
    "server_options",
]

Metadata = tuple[tuple[str, str], ...] | None  # what gRPC calls take as ``metadata``

_KEEPALIVE_CLIENT = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]
_KEEPALIVE_SERVER = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Accept the clients' 10 s pings on streams that carry no data for a while
    # (a session between two turns) instead of answering GOAWAY "too many pings".
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def server_options(max_receive_bytes: int) -> list[tuple[str, Any]]:
    """Options of a node's server: it receives at most one step's activations."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", 1 << 30),  # full logits when a client asks
        *_KEEPALIVE_SERVER,
    ]


DEFAULT_MAX_RECEIVE = 64 << 20  # what a client accepts from a node unless it asks for logits


def channel_options(max_receive_bytes: int = 1 << 30) -> list[tuple[str, Any]]:
    """Options of a channel to a node (from another node or from a client). A node
    receives only Opened and Error replies on its channels; a client receives results,
    whose size it knows from what it asked for (``receive_limit``)."""
    return [
        ("grpc.max_send_message_length", 1 << 30),
        ("grpc.max_receive_message_length", max_receive_bytes),
        *_KEEPALIVE_CLIENT,
    ]


def receive_limit(*, logits_positions: int = 0, vocab_size: int = 0) -> int:
    """The largest reply a client needs: a Result with ``logits_positions`` rows of float32
    logits over ``vocab_size`` (0: no logits), plus room for the rest of the message."""
    return DEFAULT_MAX_RECEIVE + logits_positions * vocab_size * 4


class ChannelPool:
    """Channels to node addresses, shared by every call to the same address.

    The addresses come from callers (a route names them), so the pool is bounded: a
    channel in use (:meth:`acquire` without its :meth:`release`) stays open; an unused
    one is closed when it has been unused for ``idle_timeout_s`` or when more than
    ``max_idle`` are unused (least recently used first). :meth:`get` is ``acquire``
    for a pool whose channels all live until :meth:`close` (a client's session).

    Invariants: at most ``max_idle`` unused channels stay open; every channel the pool
    opened is closed by the pool (eviction or :meth:`close`).
    """

    def __init__(self, *, max_idle: int = 32, idle_timeout_s: float = 300.0, max_receive_bytes: int = 1 << 30) -> None:
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self.max_receive_bytes = max_receive_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._users: dict[str, int] = {}
        self._idle: OrderedDict[str, float] = OrderedDict()  # unused address -> since when (oldest first)
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, address: str) -> grpc.aio.Channel:
        return self.acquire(address)

    def acquire(self, address: str) -> grpc.aio.Channel:
        """The channel to ``address``, held until :meth:`release` (or :meth:`close`)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=channel_options(self.max_receive_bytes))
            self._channels[address] = channel
        self._idle.pop(address, None)
        self._users[address] = self._users.get(address, 0) + 1
        self.prune()
        return channel

    def release(self, address: str) -> None:
        users = self._users.get(address, 0) - 1
        if users > 0:
            self._users[address] = users
            return
        self._users.pop(address, None)
        if address in self._channels:
            self._idle[address] = time.monotonic()
        self.prune()

    def prune(self, now: float | None = None) -> int:
        """Close the channels unused too long or beyond ``max_idle``; how many."""
        now = time.monotonic() if now is None else now
        closed = 0
        while self._idle:
            address, since = next(iter(self._idle.items()))
            if len(self._idle) <= self.max_idle and now - since < self.idle_timeout_s:
                break
            del self._idle[address]
            channel = self._channels.pop(address)
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            closed += 1
        return closed

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._users.clear()
        self._idle.clear()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5.0)


def call_metadata(token: str) -> Metadata:
    """The metadata that carries the swarm token on an outgoing call."""
    return (("authorization", f"Bearer {token}"),) if token else None


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuse every call that does not carry the swarm token (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(handler_call_details)
        return _deny(handler_call_details.method)


def _deny(method: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong swarm token")

    # Answer with the same streaming shape as the method (unary request in all ours
    # except Session, which streams both ways).
    if method.endswith("/Session"):
        return grpc.stream_stream_rpc_method_handler(abort)
    if method.endswith("/Results"):
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
