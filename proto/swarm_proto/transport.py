"""gRPC plumbing shared by the node's server and its outgoing streams: message-size
limits, keepalive, and the swarm token.

Keepalive matters for a swarm of ordinary machines: a peer that vanishes without
closing its sockets (power loss, a network partition) would otherwise leave a
session stream hanging until the client's step timeout. With pings every 10 s and
a 5 s answer deadline, a dead successor is noticed within about 15 s even on an
idle session.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from swarm_proto.tls import TlsFiles, secure_aio_channel

__all__ = ["ChannelPool", "Metadata", "TokenInterceptor", "call_metadata", "channel_options", "server_options"]

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


def channel_options() -> list[tuple[str, Any]]:
    """Options of a channel to a node (from another node or from a client)."""
    return [
        ("grpc.max_send_message_length", 1 << 30),
        ("grpc.max_receive_message_length", 1 << 30),
        *_KEEPALIVE_CLIENT,
    ]


class ChannelPool:
    """One long-lived channel per node address, shared by every call to that node;
    mutual TLS with ``tls`` (swarm_proto.tls), in clear without."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.tls = tls

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = secure_aio_channel(address, self.tls, channel_options())
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


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
