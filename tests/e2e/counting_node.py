"""``swarm-node`` with every gRPC message it receives or sends counted (tests only).

    python tests/e2e/counting_node.py COUNTS_FILE [swarm-node flags...]

The node runs unchanged; a server interceptor wraps its handlers and, when a stream
ends, appends one JSON line to COUNTS_FILE: the method, the session id, and how many
messages of each kind went in and out, e.g.
``{"method": "Session", "session": "ab12", "in": {"open": 1, "step": 7, "close": 1},
"out": {"opened": 1}}``. Every stream of the data plane has a node at its server end
(client -> head, node -> successor, tail -> client), so the lines of all the nodes of
a route count every message that crossed the network for a session, once each.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


def _kind(message: Any) -> str:
    if hasattr(message, "WhichOneof"):
        try:
            return message.WhichOneof("kind") or "empty"
        except ValueError:  # a message without a `kind` oneof (Result)
            return "error" if message.HasField("error") else "result"
    return type(message).__name__


class _CountingContext:
    """The servicer context, with its writes counted."""

    def __init__(self, context: Any, out: Counter[str]) -> None:
        self._context = context
        self._out = out

    async def write(self, message: Any) -> None:
        self._out[_kind(message)] += 1
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class CountingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, path: str) -> None:
        self.path = path

    def _record(self, method: str, session: str, into: Counter[str], out: Counter[str]) -> None:
        line = json.dumps({"method": method, "session": session, "in": dict(into), "out": dict(out)})
        with open(self.path, "a") as f:  # one short append per stream
            f.write(line + "\n")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        if handler is None or method not in ("Session", "Results"):
            return handler

        if method == "Session":
            inner_session = handler.stream_stream

            async def session(requests: AsyncIterator[Any], context: Any) -> None:
                into: Counter[str] = Counter()
                out: Counter[str] = Counter()
                sid = [""]

                async def counted() -> AsyncIterator[Any]:
                    async for request in requests:
                        kind = _kind(request)
                        into[kind] += 1
                        if kind == "open":
                            sid[0] = request.open.session_id
                        yield request

                try:
                    await inner_session(counted(), _CountingContext(context, out))
                finally:
                    self._record(method, sid[0], into, out)

            return grpc.stream_stream_rpc_method_handler(
                session, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )

        inner_results = handler.unary_stream

        async def results(request: Any, context: Any) -> None:
            out: Counter[str] = Counter()
            try:
                await inner_results(request, _CountingContext(context, out))
            finally:
                self._record(method, request.session_id, Counter({"request": 1}), out)

        return grpc.unary_stream_rpc_method_handler(
            results, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def main() -> int:
    path, argv = sys.argv[1], sys.argv[2:]
    make_server = grpc.aio.server

    def server(*args: Any, interceptors: Any = None, **kwargs: Any) -> Any:
        return make_server(*args, interceptors=[CountingInterceptor(path), *(interceptors or ())], **kwargs)

    grpc.aio.server = server  # the node builds its server through this module attribute
    from swarm_node.cli import main as node_main

    return node_main(argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
