"""The coordinator's HTTP side: an ASGI app (Starlette) and a uvicorn server for it.

``create_app(backend, registry_view, config)`` serves, on one port:

=========================  ============================================================
``/v1/...``                the OpenAI-compatible API (:mod:`.openai_api`), API keys and
                           rate limits (:mod:`.auth`)
``/``                      the dashboard (``static/``), fed by ``/dashboard/feed`` (SSE)
``/dashboard/state``       one dashboard snapshot as JSON
``/metrics``               Prometheus metrics of the gateway and the swarm
``/healthz``               liveness, with node and coverage counts
=========================  ============================================================

``backend`` is the client library: a ``SwarmClient`` or ``AsyncSwarmClient`` over any
backend (the swarm's route backend in the coordinator daemon, a fixed route or the
in-process model when served standalone). ``registry_view`` is the registry (anything
with ``state`` and ``events``) or None. The coordinator daemon runs the app in its own
event loop with :class:`HttpServer`; tests and benchmarks can use
:class:`ThreadedHttpServer`, which runs it on a loop of its own::

    app = create_app(SwarmClient.local(), None, GatewayConfig(api_keys=("sk-1",)))
    async with HttpServer(app, "127.0.0.1", 8080) as server:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from swarm_client.api import AsyncSwarmClient, SwarmClient
from swarm_client.errors import SwarmError
from swarm_client.params import SamplingOptions
from swarm_client.types import StreamEvent
from swarm_coordinator.http.auth import ApiKeys, Caller, KeyLimits, RateLimiter, extract_key
from swarm_coordinator.http.dashboard import Activity, SwarmView, snapshot
from swarm_coordinator.http.openai_api import SSE_HEADERS, OpenAIError, OpenAIRoutes, invalid, translate
from swarm_coordinator.metrics import CONTENT_TYPE_LATEST, CoordinatorMetrics
from swarm_proto.presence import Event

log = logging.getLogger(__name__)

__all__ = ["Gateway", "GatewayConfig", "HttpServer", "ThreadedHttpServer", "create_app", "model_id_for"]

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class GatewayConfig:
    """How the HTTP side behaves; the coordinator fills it from its flags."""

    model_id: str | None = None  # the id /v1/models lists (default: derived from the model)
    api_keys: tuple[str, ...] = ()  # empty (and no keys file): the API is open
    api_keys_file: str | None = None
    requests_per_minute: int = 0  # per key; 0 = unlimited (a keys file may set its own)
    tokens_per_minute: int = 0
    feed_interval_s: float = 1.0  # dashboard refresh when nothing changes

    def __post_init__(self) -> None:
        KeyLimits(self.requests_per_minute, self.tokens_per_minute)  # validates
        if self.feed_interval_s <= 0:
            raise ValueError("feed_interval_s must be positive")


def model_id_for(model: str) -> str:
    """A short id for a model path or name: ``/x/SmolLM2-135M.Q4_1.gguf`` -> ``SmolLM2-135M.Q4_1``."""
    name = Path(model.rstrip("/\\")).name or model
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _async_client(backend: SwarmClient | AsyncSwarmClient) -> AsyncSwarmClient:
    if isinstance(backend, AsyncSwarmClient):
        return backend
    from_client = getattr(AsyncSwarmClient, "from_client", None)
    if from_client is not None:
        return from_client(backend)  # type: ignore[no-any-return]
    return AsyncSwarmClient(backend)  # type: ignore[call-arg,arg-type]


Backend = SwarmClient | AsyncSwarmClient
BackendFactory = Callable[[], Backend]


class Gateway:
    """What the handlers share: the client, keys and limits, metrics, activity.

    ``backend`` may be a zero-argument callable that builds the client; it then runs in
    a worker thread when the app starts (loading a tokenizer takes seconds, and the
    coordinator's event loop must keep serving meanwhile).
    """

    def __init__(self, backend: Backend | BackendFactory, view: SwarmView | None, config: GatewayConfig) -> None:
        self.view = view
        self.config = config
        default = KeyLimits(config.requests_per_minute, config.tokens_per_minute)
        self.keys = ApiKeys.load(config.api_keys, config.api_keys_file, default=default)
        self.limiter = RateLimiter()
        self.metrics = CoordinatorMetrics(state=(lambda: view.state) if view is not None else None)
        self.activity = Activity()
        self.created = int(time.time())
        self._factory: BackendFactory | None = None
        self._load_error = ""
        self._client: AsyncSwarmClient | None = None
        if isinstance(backend, (SwarmClient, AsyncSwarmClient)):
            self._set_client(backend)
        else:
            self._factory = backend
            self._name_models("")
        self._changed = asyncio.Event()
        self._last_event: Event | None = None

    @property
    def client(self) -> AsyncSwarmClient:
        if self._client is None:
            why = f"the gateway could not start its client: {self._load_error}" if self._load_error else "the gateway is still starting"
            raise OpenAIError(503, why, type="server_error", code="unavailable")
        return self._client

    async def load(self) -> None:
        """Build the client from its factory, if one was given (in a worker thread). A
        failure is logged and answered with 503: the coordinator must keep running."""
        if self._client is None and self._factory is not None:
            try:
                self._set_client(await asyncio.to_thread(self._factory))
            except Exception as exc:
                log.error("the gateway's client failed to start; /v1 answers 503", exc_info=exc)
                self._load_error = str(exc) or type(exc).__name__

    def _set_client(self, backend: Backend) -> None:
        self._client = client = _async_client(backend)
        self._name_models(getattr(client.tokenizer, "source", ""))
        if isinstance(getattr(client.backend, "failovers", None), int):  # the swarm's RoutedBackend
            self.metrics.watch_client_failovers(lambda: int(getattr(client.backend, "failovers", 0)))

    def _name_models(self, source: str) -> None:
        view, config = self.view, self.config
        names = [config.model_id] if config.model_id else []
        if view is not None:
            names.append(model_id_for(view.state.model))
        if source:
            names.append(model_id_for(str(source)))
        self.model_id = names[0] if names else "llama-swarm"
        self.model_ids = frozenset(names + ([view.state.model] if view is not None else []) + [self.model_id])

    # -- auth and limits --

    def authenticate(self, request: Request) -> Caller:
        key = extract_key(request.headers)
        caller = self.keys.authenticate(key)
        if caller is None:
            self.metrics.auth_failures.inc()
            if key:
                shown = key[:3] + "..." + key[-4:] if len(key) > 8 else "***"
                message = f"Incorrect API key provided: {shown}."
            else:
                message = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            raise OpenAIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return caller

    def admit(self, caller: Caller) -> None:
        refusal = self.limiter.admit(caller)
        if refusal is not None:
            self.metrics.rate_limited.labels(refusal.kind).inc()
            what = "requests" if refusal.kind == "requests" else "tokens"
            raise OpenAIError(
                429,
                f"Rate limit reached for {caller.name} on {what} per minute: limit {refusal.limit}. "
                f"Please try again in {refusal.retry_after_s:.1f}s.",
                type=refusal.kind,
                code="rate_limit_exceeded",
                headers={"Retry-After": refusal.retry_after_header, f"x-ratelimit-limit-{what}": str(refusal.limit)},
            )

    # -- generation --

    def encode(self, prompt: str | list[int]) -> list[int]:
        try:
            ids = self.client.encode(prompt)
        except SwarmError as exc:
            raise translate(exc) from exc
        vocab = self.client.tokenizer.vocab_size
        if isinstance(prompt, list) and any(t >= vocab for t in ids):
            raise invalid(f"token ids in 'prompt' must be below the vocabulary size {vocab}", "prompt")
        return ids

    async def generate(
        self, endpoint: str, caller: Caller, prompt_ids: Sequence[int], options: SamplingOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        """The client's event stream, counted in metrics, activity and the caller's budget."""
        m = self.metrics
        info = self.activity.start(endpoint, caller.name, len(prompt_ids), options.max_tokens)
        self.limiter.charge(caller, len(prompt_ids))
        m.active.inc()
        self.poke()
        status, finish = "cancelled", None
        last = 0.0
        events = self.client.stream(list(prompt_ids), options)
        try:
            async for event in events:
                n = len(event.token_ids)
                if n:
                    now = time.perf_counter()
                    if info.ttft_s is None:
                        m.ttft_seconds.observe(now - info.t0)
                    else:
                        per_token = (now - last) / n
                        for _ in range(n):
                            m.token_seconds.observe(per_token)
                    last = now
                    self.activity.tokens(info, n, now)
                if event.result is not None:
                    status, finish = "done", event.result.finish_reason
                yield event
        except Exception:
            status = "error"
            raise
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            m.active.dec()
            code = {"done": "200", "error": "error", "cancelled": "cancelled"}[status]
            m.requests.labels(endpoint, code).inc()
            if status != "error":
                m.prompt_tokens.inc(len(prompt_ids))
            m.completion_tokens.inc(info.tokens)
            m.completion_sizes.observe(info.tokens)
            m.request_seconds.labels(endpoint).observe(time.perf_counter() - info.t0)
            self.limiter.charge(caller, info.tokens)
            self.activity.end(info, status, finish)
            self.poke()

    # -- change notification (dashboard feed, event counters) --

    def poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        changed = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    def sync_events(self) -> None:
        """Count the registry's events that arrived since the last call."""
        if self.view is None:
            return
        events = list(self.view.events)
        if not events or events[-1] is self._last_event:
            return
        start = 0
        if self._last_event is not None:
            for i in range(len(events) - 1, -1, -1):
                if events[i] is self._last_event:
                    start = i + 1
                    break
        self.metrics.count_events(e.kind.value for e in events[start:])
        self._last_event = events[-1]

    async def watch(self) -> None:
        """Follow the registry: count its events and wake the dashboard feeds."""
        changes = getattr(self.view, "changes", None)
        if changes is None:
            while True:
                await asyncio.sleep(self.config.feed_interval_s)
                self.sync_events()
        async for _ in changes():
            self.sync_events()
            self.poke()

    def snapshot(self) -> dict[str, Any]:
        self.sync_events()
        return snapshot(self.view, self.activity, model_id=self.model_id, auth_required=self.keys.enabled)


def create_app(
    backend: Backend | BackendFactory,
    registry_view: SwarmView | None = None,
    config: GatewayConfig | None = None,
) -> Starlette:
    """The ASGI app of the gateway, dashboard and metrics (see the module docstring).
    ``backend`` is a client, or a callable that builds one when the app starts;
    ``app.state.gateway`` is the :class:`Gateway` behind it."""
    gw = Gateway(backend, registry_view, config or GatewayConfig())
    api = OpenAIRoutes(gw)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def feed(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            import json

            while True:
                data = json.dumps(gw.snapshot(), separators=(",", ":"))
                yield f"event: snapshot\ndata: {data}\n\n".encode()
                await gw.wait_change(gw.config.feed_interval_s)
                await asyncio.sleep(0.05)  # let a burst of changes coalesce

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def state(request: Request) -> Response:
        return JSONResponse(gw.snapshot())

    async def metrics(request: Request) -> Response:
        gw.sync_events()
        return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        snap = gw.snapshot()
        return JSONResponse(
            {
                "status": "ok",
                "model": gw.model_id,
                "nodes_online": snap["totals"]["nodes_online"],
                "uncovered_layers": sum(e - s for s, e in snap["uncovered"]),
            }
        )

    async def on_openai_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown path {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        err = OpenAIError(exc.status_code, message, type=kind, headers=exc.headers)
        return err.response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gw._changed = asyncio.Event()  # bind to the serving loop
        await gw.load()
        watcher = asyncio.get_running_loop().create_task(gw.watch(), name="gateway-watch")
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    routes = [
        Route("/", index),
        Route("/dashboard/feed", feed),
        Route("/dashboard/state", state),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/v1/models", api.models),
        Route("/v1/models/{model:path}", api.model),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={OpenAIError: on_openai_error, HTTPException: on_http_error},
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app


# --- serving -----------------------------------------------------------------------------


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


class HttpServer:
    """uvicorn serving ``app`` inside the running event loop; ``port=0`` picks one."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self._task
        self._server = self._task = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


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

