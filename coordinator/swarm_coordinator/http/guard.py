"""The gateway's guards in front of the handlers: Host check, request bounds, dashboard login.

- :class:`HostCheck` (ASGI): a request whose ``Host`` is not an allowed name gets 400.
  A DNS-rebinding page reaches a loopback or LAN gateway under the attacker's own
  host name, so names must be listed (``--allowed-host``; the defaults are the
  loopback names and the bound host); IP literals are always allowed (rebinding needs
  a name), and ``*`` turns the check off.
- :class:`RequestBounds` (ASGI): at most ``max_concurrent`` generation requests
  (``POST /v1/...``) in flight, from the first byte of the body to the last byte of
  the answer, streamed or not; one more gets 503 with ``Retry-After`` at once. A
  ``Content-Length`` over ``max_body_bytes`` gets 413 before the body is read;
  :func:`read_body` enforces the same bound on bodies sent without a length.
- :class:`DashboardLogin`: when API keys are set, ``/``, ``/dashboard/*`` and
  ``/metrics`` need a key too, as ``Authorization: Bearer`` (Prometheus' scrape
  config has ``authorization``) or as the cookie a browser gets by posting a key to
  ``/dashboard/login``. The cookie holds the caller's name, an expiry and an HMAC
  under a secret made at start, never the key: it dies with the process or after
  ``COOKIE_TTL_S``, and is ``HttpOnly`` and ``SameSite=Strict``.
- :func:`until_disconnected`: resolves when the HTTP caller hangs up, so that a
  non-streamed generation stops with it.

Invariants: the in-flight count is the number of generation requests between their
start and their answer's end; a refused request never reaches a handler.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request

from swarm_coordinator.http.errors import OpenAIError

__all__ = [
    "COOKIE",
    "DashboardLogin",
    "HostCheck",
    "RequestBounds",
    "default_allowed_hosts",
    "form_key",
    "read_body",
    "until_disconnected",
]

COOKIE = "swarm_dashboard"
COOKIE_TTL_S = 12 * 3600
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def default_allowed_hosts(bound_host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The names a gateway bound to ``bound_host`` answers to: loopback names, the bound
    host when it is a name, and ``extra`` (the ``--allowed-host`` flags)."""
    names = [*LOOPBACK_NAMES, *extra]
    if bound_host and not _is_ip(bound_host) and bound_host not in ("0.0.0.0", "::"):
        names.append(bound_host)
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in names if n))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _host_name(header: str) -> str:
    """``Host`` without its port: ``[::1]:80`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


def _error(message: str, type: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


class HostCheck:
    """Answer 400 to a request for a host name not in ``allowed`` (see the module doc)."""

    def __init__(self, app: Any, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower().rstrip(".") for h in allowed)
        self.any = "*" in self.allowed

    def allows(self, header: str) -> bool:
        name = _host_name(header.strip()).lower().rstrip(".")
        return self.any or _is_ip(name) or name in self.allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
            if not self.allows(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                message = f"invalid Host header {host[:100]!r}: add the name with --allowed-host"
                await _send_json(send, 400, _error(message, "invalid_request_error", "invalid_host"))
                return
        await self.app(scope, receive, send)


class RequestBounds:
    """Body size (by ``Content-Length``) and the count of generation requests in flight."""

    def __init__(self, app: Any, *, max_body_bytes: int, max_concurrent: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.refused = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            message = f"the request body has {int(length)} bytes; at most {self.max_body_bytes} are accepted"
            await _send_json(send, 413, _error(message, "invalid_request_error", "request_too_large"))
            return
        if not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            self.refused += 1
            message = f"the gateway is serving its most requests at once ({self.max_concurrent}); retry shortly"
            await _send_json(send, 503, _error(message, "server_overloaded", "server_overloaded"), {"Retry-After": "1"})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes (413 beyond, also without a length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(
                413, f"the request body is over {limit} bytes, the most accepted", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnected(request: Request) -> None:
    """Return when the caller hangs up (call after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class DashboardLogin:
    """Signed, expiring dashboard cookies for callers who proved a key (module doc)."""

    def __init__(self, ttl_s: float = COOKIE_TTL_S) -> None:
        self._secret = secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def cookie(self, caller_name: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.ttl_s)
        payload = f"{caller_name.replace('|', '_')}|{expires}"
        return f"{payload}|{self._mac(payload)}"

    def check(self, value: str, now: float | None = None) -> str | None:
        """The caller's name if ``value`` is a cookie of ours that has not expired."""
        parts = value.rsplit("|", 2)
        if len(parts) != 3:
            return None
        name, expires, mac = parts
        if not hmac.compare_digest(self._mac(f"{name}|{expires}").encode(), mac.encode()) or not expires.isdigit():
            return None
        if int(expires) < (time.time() if now is None else now):
            return None
        return name


def form_key(body: bytes) -> str:
    """The ``key`` field of a login form (urlencoded)."""
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return ""
    return (fields.get("key") or [""])[0].strip()


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llama-swarm: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}
input{width:100%;padding:.5rem;margin:.5rem 0;box-sizing:border-box}button{padding:.5rem 1rem}
.err{color:#b00}</style></head>
<body><h1>llama-swarm</h1><p>This gateway needs an API key to show its dashboard.</p>
{error}<form method="post" action="/dashboard/login">
<label for="key">API key</label><input id="key" name="key" type="password" autocomplete="current-password" autofocus>
<button type="submit">Sign in</button></form></body></html>
"""
