"""Serving the app with uvicorn: inside a running event loop, or on a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from swarm_proto.daemon import Service
from swarm_proto.tls import TlsFiles

if TYPE_CHECKING:
    from swarm_coordinator.http.app import Gateway

log = logging.getLogger(__name__)

__all__ = ["HttpServer", "ThreadedHttpServer"]


class _Server(uvicorn.Server):
    # The process that embeds us owns the signals (the coordinator drains on SIGTERM).
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(512)
    sock.setblocking(False)
    return sock


class HttpServer(Service):
    """uvicorn serving ``app`` inside the running event loop; ``port=0`` picks one."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", tls: TlsFiles | None = None
    ) -> None:
        """``tls``: serve HTTPS with that certificate (browsers and API callers are not
        asked for one of theirs: they authenticate with API keys)."""
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self.tls = tls
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> str:
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            log_level=self.log_level,
            access_log=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=30,
            ssl_certfile=self.tls.cert if self.tls else None,
            ssl_keyfile=self.tls.key if self.tls else None,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server._serve(sockets=[sock]), name="http-server")
        while not self._server.started:
            if self._task.done():
                sock.close()
                exc = self._task.exception()
                raise OSError(f"HTTP server on {self.host}:{self.port} failed to start: {exc!r}")
            await asyncio.sleep(0.01)
        log.info("HTTP on %s (OpenAI API under /v1, dashboard at /, metrics at /metrics)", self.url)
        return self.url

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        gateway = getattr(getattr(self.app, "state", None), "gateway", None)
        if gateway is not None:
            gateway.close_feeds()
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self._task
        self._server = self._task = None



class ThreadedHttpServer:
    """An :class:`HttpServer` on an event loop of its own thread, for sync callers.

    ``make_app`` runs on that loop (so anything async the app builds belongs to it)::

        with ThreadedHttpServer(lambda: create_app(client)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, make_app: Callable[[], Any], host: str = "127.0.0.1", port: int = 0) -> None:
        self.make_app = make_app
        self.host = host
        self.port = port
        self.url = ""
        self.app: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: HttpServer | None = None
        self._stop: asyncio.Event | None = None

    def start(self, timeout: float = 30.0) -> str:
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                self.app = self.make_app()
                self._server = HttpServer(self.app, self.host, self.port)
                self.url = await self._server.start()
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            self._loop = asyncio.get_running_loop()
            ready.set()
            await self._stop.wait()
            await self._server.stop()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="http-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the HTTP server did not start")
        if errors:
            raise errors[0]
        return self.url

    @property
    def gateway(self) -> Gateway:
        return self.app.state.gateway  # type: ignore[no-any-return]

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)
        self._loop = None

    def __enter__(self) -> ThreadedHttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

