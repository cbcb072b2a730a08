"""Property-based fuzzing of the gateway's HTTP API (in process, over httpx's ASGI
transport): arbitrary bodies, fields and headers on every route get an answer in
OpenAI's error shape or a success, never a 500."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx2
import pytest
from helpers import ByteHF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm_client import SwarmClient
from swarm_client.tokenizer import Tokenizer
from swarm_client.types import SampledToken, TokenSource
from swarm_coordinator.http import GatewayConfig, create_app
from swarm_proto.wire import SamplingParams

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MODEL = "tiny-bytes"
EOS = 2


class Echo(TokenSource):
    """Answers a few bytes then EOS."""

    max_context = 256
    eos_token_ids = (EOS,)

    def tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[SampledToken]:
        for t in ByteHF().encode("ok.")[:max_new_tokens] + [EOS]:
            yield SampledToken(t, -0.5)
        time.sleep(0)


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[asyncio.AbstractEventLoop, httpx2.AsyncClient]]:
    client = SwarmClient(Echo(), Tokenizer(ByteHF(), source="/models/tiny-bytes"))  # type: ignore[arg-type]
    app = create_app(client, None, GatewayConfig(api_keys=("sk-fuzz",), max_body_bytes=16_384, allowed_hosts=("gw",)))
    loop = asyncio.new_event_loop()
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gw")
    yield loop, http
    loop.run_until_complete(http.aclose())
    loop.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(
    ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
     "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n", "echo", "repetition_penalty", "ignore_eos",
     "suffix", "logit_bias", "tools", "user"]
)
good = {
    "model": MODEL,
    "prompt": "hello",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 3,
}


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=300))
    body: dict[str, Any] = dict(good) if kind >= 2 else {}
    body.update(draw(st.dictionaries(fields, json_values, max_size=5)))
    if kind == 3:  # numbers at the edges of what the wire carries
        body[draw(st.sampled_from(["seed", "top_k", "max_tokens"]))] = draw(
            st.sampled_from([-1, 0, 2**31 - 1, 2**31, 2**63, 2**64 - 1, 2**64, -(2**63)])
        )
    return json.dumps(body).encode()


@FUZZ
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/dashboard/login", "/metrics"]),
    body=bodies(),
    key=st.sampled_from(["sk-fuzz", "sk-fuzz", "", "wrong"]),
    host=st.sampled_from(["gw", "gw", "127.0.0.1:8080", "evil.example"]),
)
def test_http_api_never_answers_500(
    gateway: tuple[asyncio.AbstractEventLoop, httpx2.AsyncClient], path: str, body: bytes, key: str, host: str
) -> None:
    loop, http = gateway
    headers = {"Host": host, "Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"

    async def call() -> httpx2.Response:
        if path in ("/v1/models", "/metrics"):
            return await http.get(path, headers=headers)
        return await http.post(path, content=body, headers=headers)

    resp = loop.run_until_complete(call())
    assert resp.status_code < 500 or resp.status_code == 503, resp.text[:300]
    if host == "evil.example":
        assert resp.status_code == 400
    if resp.status_code >= 400 and path.startswith("/v1/"):
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
