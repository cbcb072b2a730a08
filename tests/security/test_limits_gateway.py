"""Attacks on the HTTP gateway, each now answered with a clear status while another
caller's request completes: oversized bodies, a flood of requests, DNS rebinding,
reading the dashboard or metrics without a key, out-of-range numbers, a caller that
hangs up on a long non-streamed generation, and huge prompts (tokenized off the loop)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx2
import pytest
from helpers import ByteHF

from swarm_client import SwarmClient
from swarm_client.tokenizer import Tokenizer
from swarm_client.types import SampledToken, TokenSource
from swarm_coordinator.http import GatewayConfig, ThreadedHttpServer, create_app
from swarm_coordinator.http.guard import COOKIE, DashboardLogin, default_allowed_hosts
from swarm_proto.wire import SamplingParams

MODEL = "tiny-bytes"
KEY = "sk-owner"
EOS = 2


class Slow(TokenSource):
    """Yields ``n`` tokens, ``delay`` seconds apart; records when a generation ends early."""

    max_context = 1 << 20
    eos_token_ids = (EOS,)

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.started = threading.Event()
        self.closed = threading.Event()
        self.produced = 0
        self.threads: set[int] = set()

    def tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[SampledToken]:
        self.started.set()
        try:
            for _ in range(max_new_tokens):
                time.sleep(self.delay)
                self.produced += 1
                yield SampledToken(ord("a") + 3, -0.1)
        finally:
            self.closed.set()


class RecordingTokenizer(ByteHF):
    """Records the threads it encodes on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.add(threading.get_ident())
        return super().encode(text, add_special_tokens)


def make(config: GatewayConfig, source: TokenSource | None = None) -> tuple[Any, RecordingTokenizer]:
    hf = RecordingTokenizer()
    client = SwarmClient(source or Slow(), Tokenizer(hf, source="/models/tiny-bytes"))  # type: ignore[arg-type]
    return create_app(client, None, config), hf


def raw(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gw")


def completion(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 3, **kw}


AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_oversized_body_gets_413_and_others_are_served() -> None:
    app, _ = make(GatewayConfig(api_keys=(KEY,), max_body_bytes=4096))
    async with raw(app) as http:
        big = json.dumps(completion(prompt="x" * 10_000))
        resp = await http.post("/v1/completions", content=big, headers=AUTH)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

        async def chunked() -> Any:  # no Content-Length: counted while reading
            for _ in range(10):
                yield b" " * 1000

        resp = await http.post("/v1/completions", content=chunked(), headers=AUTH)
        assert resp.status_code == 413
        ok = await http.post("/v1/completions", json=completion(), headers=AUTH)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


async def test_concurrency_cap_answers_503_with_retry_after() -> None:
    source = Slow(delay=0.05)
    app, _ = make(GatewayConfig(max_concurrent=1), source)
    async with raw(app) as http:
        first = asyncio.ensure_future(http.post("/v1/completions", json=completion(max_tokens=20)))
        await asyncio.to_thread(source.started.wait, 30)
        refused = await http.post("/v1/completions", json=completion())
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "server_overloaded"
        done = await first
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 20
        assert (await http.post("/v1/completions", json=completion())).status_code == 200


async def test_dns_rebinding_host_is_refused() -> None:
    allowed = default_allowed_hosts("127.0.0.1", ["gw"])
    assert "localhost" in allowed and "gw" in allowed
    app, _ = make(GatewayConfig(allowed_hosts=allowed))
    async with raw(app) as http:
        for host in ("attacker.example", "attacker.example:8080", "localhost.attacker.example"):
            resp = await http.get("/v1/models", headers={"Host": host})
            assert resp.status_code == 400 and "--allowed-host" in resp.json()["error"]["message"]
        for host in ("gw", "localhost:8080", "127.0.0.1:8080", "[::1]:8080", "10.1.2.3"):
            assert (await http.get("/v1/models", headers={"Host": host})).status_code == 200


async def test_dashboard_and_metrics_need_a_key_when_keys_are_set() -> None:
    app, _ = make(GatewayConfig(api_keys=(KEY,)))
    async with raw(app) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "/dashboard/login" in page.text and "app.js" not in page.text
        for path in ("/dashboard/state", "/dashboard/feed", "/metrics"):
            assert (await http.get(path)).status_code == 401, path
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        wrong = await http.post("/dashboard/login", content=b"key=sk-guess", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert wrong.status_code == 401 and COOKIE not in wrong.cookies
        login = await http.post("/dashboard/login", content=f"key={KEY}".encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert login.status_code == 303 and COOKIE in login.cookies
        cookie = login.cookies[COOKIE]
        assert KEY not in cookie  # the key itself never goes into the cookie
    forged = cookie[:-1] + ("0" if cookie[-1] != "0" else "1")
    for value, status in ((cookie, 200), (forged, 401), ("key-abcd|99999999999|" + "0" * 64, 401)):
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gw", cookies={COOKIE: value}) as browser:
            assert (await browser.get("/dashboard/state")).status_code == status
            assert (await browser.get("/metrics")).status_code == status
            assert ("app.js" in (await browser.get("/")).text) == (status == 200)
            assert ("nodes_online" in (await browser.get("/healthz")).json()) == (status == 200)


def test_dashboard_cookie_expires() -> None:
    login = DashboardLogin(ttl_s=10)
    cookie = login.cookie("key-1234", now=1000.0)
    assert login.check(cookie, now=1005.0) == "key-1234"
    assert login.check(cookie, now=1011.0) is None
    assert DashboardLogin().check(cookie, now=1005.0) is None  # another process's secret


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", -1), ("seed", 2**64), ("seed", 2**70), ("top_k", 2**31), ("max_tokens", 2**31), ("temperature", 1e308)],
)
async def test_out_of_range_numbers_get_400(field: str, value: int) -> None:
    app, _ = make(GatewayConfig())
    async with raw(app) as http:
        resp = await http.post("/v1/completions", json=completion(**{field: value}))
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == field


async def test_prompts_are_tokenized_off_the_event_loop_after_admission() -> None:
    app, hf = make(GatewayConfig(api_keys=(KEY,), requests_per_minute=1, max_body_bytes=1 << 22))
    async with raw(app) as http:
        assert (await http.post("/v1/completions", json=completion(), headers=AUTH)).status_code == 200
        assert threading.get_ident() not in hf.threads  # a worker thread did it
        hf.threads.clear()
        limited = await http.post("/v1/completions", json=completion(prompt="y" * 1_000_000), headers=AUTH)
        assert limited.status_code == 429 and not hf.threads  # refused before any tokenizing


def test_a_caller_that_hangs_up_stops_its_generation() -> None:
    source = Slow(delay=0.05)
    app, _ = make(GatewayConfig(), source)
    with ThreadedHttpServer(lambda: app) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps(completion(max_tokens=100_000))
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        assert source.started.wait(30)
        sock.close()  # hang up before the answer
        assert source.closed.wait(30), "the generation went on for nobody"
        assert source.produced < 100_000
        conn = http.client.HTTPConnection(host, int(port), timeout=30)  # the gateway still serves others
        conn.request("POST", "/v1/completions", json.dumps(completion()), {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200


def test_gateway_flags_fill_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from swarm_coordinator.http.mount import add_gateway_flags, gateway_config_from_args

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--host", default="gw.lan")
        add_gateway_flags(p)
        return p

    config = gateway_config_from_args(parser().parse_args([]))
    assert (config.max_body_bytes, config.max_concurrent) == (2 << 20, 256)
    assert config.allowed_hosts is not None and {"localhost", "gw.lan"} <= set(config.allowed_hosts)
    monkeypatch.setenv("SWARM_ALLOWED_HOST", "a.example,b.example")  # flags read their variables when added
    config = gateway_config_from_args(parser().parse_args(["--max-body-bytes", "1000", "--max-concurrent", "3"]))
    assert (config.max_body_bytes, config.max_concurrent) == (1000, 3)
    assert config.allowed_hosts is not None and {"a.example", "b.example", "localhost"} <= set(config.allowed_hosts)
