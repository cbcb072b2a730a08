"""The gateway's OpenAI API over a scripted backend, in process (no sockets).

The official ``openai`` client talks to the ASGI app through httpx's ASGI transport;
the backend "samples" a fixed script with a byte tokenizer, so every answer is known.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from helpers import ByteHF

from swarm_client import SwarmClient
from swarm_client.tokenizer import Tokenizer
from swarm_client.types import SampledToken, TokenSource
from swarm_coordinator.http import GatewayConfig, create_app
from swarm_coordinator.http.auth import ApiKeys, Caller, KeyLimits, RateLimiter, extract_key, parse_keys_file
from swarm_coordinator.http.schema import parse_chat, parse_completion
from swarm_proto.wire import SamplingParams

BOS, EOS, OFFSET = 1, 2, 3
REPLY = "Paris is the capital. It is big."


class Script(TokenSource):
    """Answers every prompt with REPLY then EOS; records what it was asked."""

    max_context = 4096
    eos_token_ids = (EOS,)

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[tuple[int, ...], SamplingParams, int]] = []
        self.closed = 0

    def tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[SampledToken]:
        self.calls.append((tuple(prompt_ids), params, max_new_tokens))
        try:
            for i, t in enumerate(ByteHF().encode(REPLY) + [EOS]):
                time.sleep(self.delay)
                # `checked`: what a verifying backend reports (positions checked so far)
                yield SampledToken(t, -0.25, len(prompt_ids) + i)
        finally:
            self.closed += 1


MODEL = "tiny-bytes"


def make(config: GatewayConfig | None = None, script: Script | None = None) -> tuple[Any, Script]:
    script = script or Script()
    client = SwarmClient(script, Tokenizer(ByteHF(), source="/models/tiny-bytes"))  # type: ignore[arg-type]
    return create_app(client, None, config or GatewayConfig()), script


def oai(app: Any, key: str = "none", **kwargs: Any) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gw")
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key=key, http_client=http, max_retries=0, **kwargs)


def raw(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gw")


async def test_models_lists_the_model() -> None:
    app, _ = make()
    models = await oai(app).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await oai(app).models.retrieve(MODEL)).id == MODEL


async def test_chat_completion() -> None:
    app, script = make()
    r = await oai(app).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Capital?"}], temperature=0.5, top_p=0.9, seed=7, max_tokens=50
    )
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.content == REPLY and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    prompt, params, max_new = script.calls[0]
    assert prompt == tuple(ByteHF().encode("<user>Capital?<assistant>"))
    assert (params.temperature, params.top_p, params.seed, max_new) == (0.5, 0.9, 7, 50)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(REPLY) + 1)
    assert r.usage.total_tokens == len(prompt) + len(REPLY) + 1
    assert r.usage.checked_tokens == len(prompt) + len(REPLY)  # type: ignore[attr-defined]  # our extension


async def test_completion_with_stop_and_max_tokens() -> None:
    app, script = make()
    r = await oai(app).completions.create(model=MODEL, prompt="The capital of France is", stop=[". It"], max_tokens=64)
    assert r.object == "text_completion"
    assert r.choices[0].text == "Paris is the capital" and r.choices[0].finish_reason == "stop"
    r = await oai(app).completions.create(model=MODEL, prompt="x", max_tokens=5)
    assert r.choices[0].text == "Paris" and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5
    r = await oai(app).completions.create(model=MODEL, prompt="x")  # OpenAI's default max_tokens
    assert len(r.choices[0].text) == 16
    r = await oai(app).completions.create(model=MODEL, prompt=[70, 71], max_tokens=3, echo=True, logprobs=0)
    assert r.choices[0].text == "CDPar"
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.token_logprobs == [-0.25] * 3
    assert script.calls[-1][0] == (70, 71)


async def test_streaming_chat_and_completion() -> None:
    app, _ = make()
    client = oai(app)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(REPLY) + 1
    assert len({c.id for c in chunks}) == 1

    stream2 = await client.completions.create(model=MODEL, prompt="x", max_tokens=9, stream=True)
    pieces = [c async for c in stream2]
    assert "".join(c.choices[0].text for c in pieces) == REPLY[:9]
    assert pieces[-1].choices[0].finish_reason == "length"


async def test_stream_wire_format_ends_with_done() -> None:
    app, _ = make()
    async with raw(app) as http:
        resp = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3},
        )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in resp.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    assert blocks[-1] == "data: [DONE]"
    assert json.loads(blocks[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": MODEL}, 400, "messages", None),
        ({"model": MODEL, "messages": []}, 400, "messages", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", None),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop", None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": "7"}, 400, "seed", None),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "model_not_found"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
    ],
)
async def test_bad_chat_requests(body: dict[str, Any], status: int, param: str, code: str | None) -> None:
    app, script = make()
    async with raw(app) as http:
        resp = await http.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert err["message"]
    assert not script.calls


async def test_bad_requests_through_the_official_client() -> None:
    app, _ = make()
    client = oai(app)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=-5)
    assert bad.value.status_code == 400 and bad.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt=[[1, 2], [3, 4]])
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt=[1, 99999])  # outside the vocabulary


async def test_malformed_json_and_unknown_paths() -> None:
    app, _ = make()
    async with raw(app) as http:
        resp = await http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
        resp = await http.post("/v1/embeddings", json={})
        assert resp.status_code == 404 and "error" in resp.json()
        resp = await http.get("/v1/completions")
        assert resp.status_code == 405 and "error" in resp.json()


async def test_prompt_longer_than_the_context_is_a_400() -> None:
    script = Script()
    script.max_context = 8
    app, _ = make(script=script)
    with pytest.raises(openai.BadRequestError) as err:
        await oai(app).completions.create(model=MODEL, prompt="a prompt that is too long")
    assert err.value.code == "context_length_exceeded"


async def test_api_keys() -> None:
    app, _ = make(GatewayConfig(api_keys=("sk-good",)))
    with pytest.raises(openai.AuthenticationError) as err:
        await oai(app, key="sk-wrong-key").models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await oai(app, key="sk-wrong-key").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    async with raw(app) as http:
        resp = await http.get("/v1/models")  # no key at all
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        resp = await http.get("/v1/models", headers={"x-api-key": "sk-good"})
        assert resp.status_code == 200
        # With keys set, the operators' endpoints need one too; liveness reveals nothing.
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": "Bearer sk-good"})).status_code == 200
        assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await oai(app, key="sk-good").models.list()).data[0].id == MODEL


async def test_request_rate_limit_answers_429_with_retry_after() -> None:
    app, _ = make(GatewayConfig(api_keys=("sk-a", "sk-b"), requests_per_minute=2))
    a = oai(app, key="sk-a")
    for _ in range(2):
        await a.completions.create(model=MODEL, prompt="x", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as err:
        await a.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
    retry = int(err.value.response.headers["retry-after"])
    assert 1 <= retry <= 30
    await oai(app, key="sk-b").completions.create(model=MODEL, prompt="x", max_tokens=2)  # its own bucket


async def test_token_rate_limit() -> None:
    app, _ = make(GatewayConfig(tokens_per_minute=30))  # no keys: one shared bucket
    await oai(app).completions.create(model=MODEL, prompt="0123456789", max_tokens=25)  # 35 tokens
    with pytest.raises(openai.RateLimitError) as err:
        await oai(app).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert err.value.type == "tokens" and int(err.value.response.headers["retry-after"]) >= 1


def test_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    caller = Caller("k", KeyLimits(requests_per_minute=60, tokens_per_minute=600))
    for _ in range(60):
        assert limiter.admit(caller) is None
    refusal = limiter.admit(caller)
    assert refusal is not None and refusal.kind == "requests" and refusal.retry_after_s == pytest.approx(1.0)
    now[0] = 1.0
    assert limiter.admit(caller) is None
    limiter.charge(caller, 700)  # overdrawn by 100 tokens = 10 s of refill
    now[0] = 2.0
    refusal = limiter.admit(caller)
    assert refusal is not None and refusal.kind == "tokens" and refusal.retry_after_s == pytest.approx(9.0)
    assert refusal.retry_after_header == "9"
    now[0] = 12.0
    assert limiter.admit(caller) is None


def test_keys_file(tmp_path: Path) -> None:
    text = "# team keys\nsk-one rpm=5 tpm=100\n\nsk-two   # defaults\n"
    assert parse_keys_file(text) == {"sk-one": KeyLimits(5, 100), "sk-two": KeyLimits()}
    path = tmp_path / "keys"
    path.write_text(text)
    keys = ApiKeys.load(["sk-three"], path, default=KeyLimits(requests_per_minute=9))
    assert len(keys) == 3
    one, two = keys.authenticate("sk-one"), keys.authenticate("sk-two")
    assert one is not None and one.limits == KeyLimits(5, 100)
    assert two is not None and two.limits == KeyLimits(9, 0)
    assert keys.authenticate("sk-four") is None and keys.authenticate(None) is None
    assert "sk-one" not in one.name  # the name is a fingerprint, safe for logs and the dashboard
    with pytest.raises(ValueError, match="keys:2"):
        parse_keys_file("ok\nbad rpm=x\n", source="keys")
    assert extract_key({"authorization": "Bearer sk-1"}) == "sk-1"
    assert extract_key({"api-key": "sk-2"}) == "sk-2"
    assert extract_key({}) is None


def test_parsers_map_fields_to_sampling_options() -> None:
    chat = parse_chat(
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}],
            "max_completion_tokens": 12,
            "stop": "\n",
            "top_k": 5,
            "logprobs": True,
        }
    )
    assert chat.messages == [{"role": "system", "content": "be brief"}]
    assert chat.options.max_tokens == 12 and chat.options.stop == ("\n",) and chat.options.top_k == 5
    assert chat.options.logprobs and chat.logprobs
    comp = parse_completion({"model": "m", "prompt": ["only one"], "top_p": 0})
    assert comp.prompt == "only one" and comp.options.temperature == 0.0 and comp.options.max_tokens == 16
