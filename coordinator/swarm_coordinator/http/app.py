"""The coordinator's HTTP side: an ASGI app (Starlette) for the gateway, dashboard and metrics.

``create_app(backend, registry_view, config)`` serves, on one port:

=========================  ============================================================
``/v1/...``                the OpenAI-compatible API (:mod:`.openai_api`), API keys and
                           rate limits (:mod:`.auth`)
``/``                      the dashboard (``static/``), fed by ``/dashboard/feed`` (SSE)
``/dashboard/state``       one dashboard snapshot as JSON
``/metrics``               Prometheus metrics of the gateway and the swarm
``/healthz``               liveness, with node and coverage counts
=========================  ============================================================

With API keys set, the dashboard and ``/metrics`` need a key too (a header, or the
cookie of ``/dashboard/login``), and ``/healthz`` says only ``ok`` to anyone else. Host
check, body size and in-flight bounds: :mod:`.guard` (defaults in docs/limits.md).

``backend`` is the client library: a ``SwarmClient`` or ``AsyncSwarmClient`` over any
backend (the swarm's route backend in the coordinator daemon, a fixed route or the
in-process model when served standalone). ``registry_view`` is the registry (anything
with ``state`` and ``events``) or None. The coordinator daemon runs the app in its own
event loop with :class:`~.serving.HttpServer`; tests and benchmarks can use
:class:`~.serving.ThreadedHttpServer`, which runs it on a loop of its own::

    app = create_app(SwarmClient.local(), None, GatewayConfig(api_keys=("sk-1",)))
    async with HttpServer(app, "127.0.0.1", 8080) as server:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from swarm_client.api import AsyncSwarmClient, SwarmClient
from swarm_client.errors import BusyError, SwarmError
from swarm_client.params import SamplingOptions
from swarm_client.types import StreamEvent, Timing
from swarm_coordinator.http.auth import ApiKeys, Caller, KeyLimits, RateLimiter, extract_key
from swarm_coordinator.http.dashboard import Activity, SwarmView, snapshot
from swarm_coordinator.http.errors import OpenAIError, invalid, translate
from swarm_coordinator.http.guard import (
    COOKIE,
    LOGIN_PAGE,
    DashboardLogin,
    HostCheck,
    RequestBounds,
    form_key,
    read_body,
)
from swarm_coordinator.http.openai_api import SSE_HEADERS, OpenAIRoutes
from swarm_coordinator.http.policy import Match
from swarm_coordinator.http.policy_gate import PolicyGate, refusal
from swarm_coordinator.http.queue import FairQueue, QueueBusy, QueueFull, Ticket
from swarm_coordinator.metrics import CONTENT_TYPE_LATEST, CoordinatorMetrics
from swarm_proto.presence import Event

log = logging.getLogger(__name__)

__all__ = ["Gateway", "GatewayConfig", "create_app", "model_id_for"]

STATIC = Path(__file__).parent / "static"
WATCH_INTERVAL_S = 0.1  # the registry watch wakes the dashboard feeds at most this often


@dataclass(frozen=True)
class GatewayConfig:
    """How the HTTP side behaves; the coordinator fills it from its flags."""

    model_id: str | None = None  # the id /v1/models lists (default: derived from the model)
    api_keys: tuple[str, ...] = ()  # empty (and no keys file): the API is open
    api_keys_file: str | None = None
    requests_per_minute: int = 0  # per key; 0 = unlimited (a keys file may set its own)
    tokens_per_minute: int = 0
    feed_interval_s: float = 1.0  # dashboard refresh when nothing changes
    queue_size: int = 64  # generations that may wait for room in the swarm; one more gets 429
    queue_timeout_s: float = 60.0  # the longest a generation waits for room before 429
    verify_rate: float = 0.05  # share of steps that trigger a spot check (docs/verification.md); 0 = off
    max_body_bytes: int = 2 << 20  # a bigger request body gets 413
    max_concurrent: int = 256  # generation requests in flight (tokenizing, waiting, streaming); one more gets 503
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered (IP literals always); None: no check
    speculate: int = 0  # speculative decoding for HTTP requests: drafts a step at most (0 = off; same tokens)
    policy_file: str | None = None  # acceptable-use rules (TOML, :mod:`.policy`); None: no rules
    policy_watch_s: float = 1.0  # how often the rules file is checked for changes; 0: only SIGHUP reloads
    audit_log: str | None = None  # one JSON line per generation request (:mod:`.audit`)
    audit_log_text: bool = False  # the audit log also holds prompt and completion texts
    warnings: tuple[str, ...] = ()  # shown on the dashboard (the coordinator's exposure warning)

    def __post_init__(self) -> None:
        KeyLimits(self.requests_per_minute, self.tokens_per_minute)  # validates
        if self.feed_interval_s <= 0:
            raise ValueError("feed_interval_s must be positive")
        if self.queue_size < 0 or self.queue_timeout_s <= 0:
            raise ValueError("queue_size must be >= 0 and queue_timeout_s positive")
        if self.max_body_bytes <= 0 or self.max_concurrent <= 0:
            raise ValueError("max_body_bytes and max_concurrent must be positive")
        if not 0 <= self.speculate <= 64:
            raise ValueError("speculate must be in 0..64")
        if self.policy_watch_s < 0:
            raise ValueError("policy_watch_s must be >= 0")


def model_id_for(model: str) -> str:
    """A short id for a model path or name: ``/x/SmolLM2-135M.Q4_1.gguf`` -> ``SmolLM2-135M.Q4_1``."""
    name = Path(model.rstrip("/\\")).name or model
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _async_client(backend: SwarmClient | AsyncSwarmClient) -> AsyncSwarmClient:
    if isinstance(backend, AsyncSwarmClient):
        return backend
    return AsyncSwarmClient.from_client(backend)


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
        self.queue = FairQueue(config.queue_size, config.queue_timeout_s)  # generations waiting for room
        self.metrics = CoordinatorMetrics(state=(lambda: view.state) if view is not None else None)
        self.metrics.queue_length.set_function(lambda: len(self.queue))
        self.activity = Activity()
        self.login = DashboardLogin()  # dashboard cookies, when keys are set
        self.policy = PolicyGate(
            config.policy_file, self.metrics, audit_log=config.audit_log, audit_text=config.audit_log_text,
            watch_s=config.policy_watch_s,
        )
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
        self.closing = False

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
        self._name_models(client.tokenizer.source)
        self.metrics.watch_client_failovers(lambda: client.backend.failovers)
        self.metrics.watch_client_avoidance(client.backend.avoided_nodes)

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

    def dashboard_caller(self, request: Request) -> str | None:
        """Who may see the dashboard and metrics: anyone when no keys are set; else the
        holder of a key (``Authorization``) or of a dashboard cookie. None: nobody."""
        if not self.keys.enabled:
            return "anonymous"
        key = extract_key(request.headers)
        if key:
            caller = self.keys.authenticate(key)
            return caller.name if caller is not None else None
        return self.login.check(request.cookies.get(COOKIE, ""))

    def require_dashboard(self, request: Request) -> None:
        if self.dashboard_caller(request) is None:
            self.metrics.auth_failures.inc()
            raise OpenAIError(
                401,
                "this gateway needs an API key: send 'Authorization: Bearer KEY' or sign in at /",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

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

    # -- acceptable-use policy --

    async def check_prompt(self, endpoint: str, caller: Caller, texts: Sequence[str], prompt: Any, param: str) -> None:
        """Refuse (400 ``content_policy_violation``) a prompt a rule matches, before any
        node sees it; the refusal is recorded (metrics, dashboard, audit log)."""
        match = await self.policy.check_prompt(texts)
        if match is not None:
            self.policy.record(
                key=caller.name, endpoint=endpoint, model=self.model_id, match=match, outcome="refused",
                finish_reason=None, prompt=prompt, prompt_tokens=0, completion_tokens=0,
            )
            raise refusal(match, param)

    async def generate(
        self,
        endpoint: str,
        caller: Caller,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        prompt: Any = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """The client's event stream, counted in metrics, activity and the caller's budget.

        Completions pass the policy's filter (:mod:`.policy`): a generation that crosses
        a rule is closed at once (no more steps) and ends with ``content_filter``.
        ``prompt`` (as the caller sent it) is what the audit log hashes.

        When the swarm is busy the generation waits in the gateway's line (fair across
        API keys, bounded in length and time; :mod:`.queue`): a refusal before the first
        token puts it back in line, and the wait is part of its time to first token."""
        m = self.metrics
        arrived = time.perf_counter()
        ticket = await self._enter(caller)
        info = self.activity.start(endpoint, caller.name, len(prompt_ids), options.max_tokens)
        info.t0 = arrived  # time to first token includes the wait in line
        self.limiter.charge(caller, len(prompt_ids))
        m.active.inc()
        self.poke()
        status, finish = "cancelled", None
        last = 0.0
        started = False
        filt, threaded = self.policy.completion_filter()  # this generation keeps this policy
        match: Match | None = None
        sent_tokens = 0
        sent_text: list[str] = []  # for an audit log with texts
        events = self.client.stream(list(prompt_ids), options)
        try:
            while True:
                try:
                    first = await events.__anext__()
                    break
                except BusyError as exc:  # refused for capacity before the first token: back in line
                    m.busy.labels("refused").inc()
                    await events.aclose()  # type: ignore[attr-defined]
                    try:
                        await self.queue.again(ticket, exc.retry_after)
                    except QueueBusy as busy:
                        m.busy.labels("queue_full" if isinstance(busy, QueueFull) else "queue_timeout").inc()
                        raise
                    finally:
                        self.poke()
                    events = self.client.stream(list(prompt_ids), options)
            m.queue_wait_seconds.observe(ticket.waited_s)
            self.queue.started(ticket)
            started = True
            async for event in _prepend(first, events):
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
                if filt is None:
                    if event.result is not None:
                        status, finish = "done", event.result.finish_reason
                    sent_tokens += n
                    sent_text.append(event.text)
                    yield event
                    continue
                for out in await self.policy.push(filt, event, threaded):
                    if out.result is not None:
                        status, finish = "done", out.result.finish_reason
                    sent_tokens += len(out.token_ids)
                    sent_text.append(out.text)
                    yield out
                if filt.match is not None:
                    match = filt.match
                    await events.aclose()  # the generation stops here: no more steps
                    timing = Timing(len(prompt_ids), info.tokens, info.ttft_s or 0.0, time.perf_counter() - info.t0)
                    final = filt.final(prompt_ids, options.seed or 0, timing)
                    status, finish = "done", "content_filter"
                    yield final
                    break
        except Exception:
            status = "error"
            raise
        finally:
            await events.aclose()
            self.policy.record(
                key=caller.name, endpoint=endpoint, model=self.model_id, match=match, outcome=status,
                finish_reason=finish, prompt=prompt if prompt is not None else list(prompt_ids),
                prompt_tokens=len(prompt_ids), completion_tokens=sent_tokens,
                completion="".join(sent_text),
            )
            if started:
                self.queue.finished(ticket)
            m.active.dec()
            m.generations.labels(endpoint, status).inc()
            if status != "error":
                m.prompt_tokens.inc(len(prompt_ids))
            m.completion_tokens.inc(info.tokens)
            m.completion_sizes.observe(info.tokens)
            m.request_seconds.labels(endpoint).observe(time.perf_counter() - info.t0)
            self.limiter.charge(caller, info.tokens)
            self.activity.end(info, status, finish)
            self.poke()

    async def _enter(self, caller: Caller) -> Ticket:
        """A turn in the line (at once when the swarm has room); 429 when the line is full."""
        try:
            return await self.queue.enter(caller.name)
        except QueueBusy as exc:
            self.metrics.busy.labels("queue_full" if isinstance(exc, QueueFull) else "queue_timeout").inc()
            raise
        finally:
            self.poke()

    # -- change notification (dashboard feed, event counters) --

    def close_feeds(self) -> None:
        """End the dashboard feeds (their streams never end by themselves), so that the
        server can stop without waiting for its graceful-shutdown timeout."""
        self.closing = True
        self.poke()

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
        if self.view is None:
            return
        async for _ in self.view.changes():
            self.sync_events()
            self.poke()
            # at most ten wakes a second: a big swarm changes hundreds of times a second,
            # and each state read is a snapshot built (changes() misses nothing meanwhile)
            await asyncio.sleep(WATCH_INTERVAL_S)

    def snapshot(self) -> dict[str, Any]:
        self.sync_events()
        return snapshot(
            self.view, self.activity, model_id=self.model_id, auth_required=self.keys.enabled, queue=self.queue,
            policy=self.policy.snapshot(), warnings=self.config.warnings,
        )


async def _prepend(first: StreamEvent, events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    yield first
    async for event in events:
        yield event


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
        if gw.dashboard_caller(request) is None:
            return HTMLResponse(LOGIN_PAGE.replace("{error}", ""), headers={"Cache-Control": "no-store"})
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def login(request: Request) -> Response:
        body = await read_body(request, 4096)
        caller = gw.keys.authenticate(form_key(body)) if gw.keys.enabled else None
        if caller is None:
            gw.metrics.auth_failures.inc()
            page = LOGIN_PAGE.replace("{error}", '<p class="err">That key is not valid here.</p>')
            return HTMLResponse(page, status_code=401, headers={"Cache-Control": "no-store"})
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, gw.login.cookie(caller.name), max_age=int(gw.login.ttl_s), httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def feed(request: Request) -> Response:
        gw.require_dashboard(request)

        async def events() -> AsyncIterator[bytes]:
            while not gw.closing:
                data = json.dumps(gw.snapshot(), separators=(",", ":"))
                yield f"event: snapshot\ndata: {data}\n\n".encode()
                await gw.wait_change(gw.config.feed_interval_s)
                await asyncio.sleep(0.05)  # let a burst of changes coalesce

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def state(request: Request) -> Response:
        gw.require_dashboard(request)
        return JSONResponse(gw.snapshot())

    async def metrics(request: Request) -> Response:
        gw.require_dashboard(request)
        gw.sync_events()
        return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        if gw.dashboard_caller(request) is None:  # liveness only: nothing about the swarm
            return JSONResponse({"status": "ok"})
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
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(gw.watch(), name="gateway-watch")
        policy_watch = loop.create_task(gw.policy.watch(), name="policy-watch")
        hup = _on_sighup(loop, gw.policy)
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            for task in (watcher, policy_watch):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            gw.policy.close()

    routes = [
        Route("/", index),
        Route("/dashboard/login", login, methods=["POST"]),
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
    app.add_middleware(_CountRequests, metrics=gw.metrics)
    cfg = gw.config
    app.add_middleware(RequestBounds, max_body_bytes=cfg.max_body_bytes, max_concurrent=cfg.max_concurrent)
    if cfg.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=cfg.allowed_hosts)
    app.state.gateway = gw
    return app


def _on_sighup(loop: asyncio.AbstractEventLoop, gate: PolicyGate) -> bool:
    """SIGHUP reloads the policy and reopens the audit log, when there is either and
    the app runs in the main thread (a threaded test server cannot take signals)."""
    if not (gate.path or gate.audit) or not hasattr(signal, "SIGHUP"):
        return False
    try:
        loop.add_signal_handler(signal.SIGHUP, gate.on_sighup)
    except (RuntimeError, ValueError):
        log.debug("SIGHUP not handled here (not the main thread): the policy reloads on file changes only")
        return False
    return True


_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions", "/v1/models": "models"}


class _CountRequests:
    """Counts every ``/v1`` request by endpoint and the status it was answered with
    (plain ASGI, so streamed responses pass through untouched)."""

    def __init__(self, app: Any, metrics: CoordinatorMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        endpoint = _ENDPOINTS.get(path, "models" if path.startswith("/v1/models/") else "other")

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
