"""The OpenAI-compatible gateway in front of real ``swarm-node`` processes.

Two nodes serve the default model (layers 0-15 and 15-30) on a fixed route; the
gateway runs the client library over that route. The official ``openai`` client must
get, streaming or not, exactly what ``swarm generate --local`` prints; errors, keys
and limits answer as OpenAI's API does; ``/metrics`` of the gateway and of both nodes
parse and move.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from e2e.gateway_helpers import Proc, StaticRoute, local_cli, scrape, script, total, value
from swarm_client.api import AsyncSwarmClient
from swarm_client.remote import Hop
from swarm_client.tokenizer import load_tokenizer
from swarm_coordinator.http import GatewayConfig, StaticView, ThreadedHttpServer, create_app
from swarm_coordinator.state import NodeView, SwarmState
from swarm_node.loading import read_args
from swarm_proto.presence import LayerRange, NodeState, NodeStatus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "sk-swarm-test"
PROMPT = "The three primary colors are"
QUESTION = "Name two planets of the solar system."
N = 20


@pytest.fixture(scope="module")
def nodes(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Proc, Hop, str]]]:
    logs = tmp_path_factory.mktemp("gateway-nodes")
    procs = []
    for i, (a, b) in enumerate(((0, 15), (15, 30))):
        args = script("swarm-node") + [
            "--model", str(default_model), "--layers", f"{a}:{b}", "--port", "0", "--threads", "1",
            "--metrics-port", "0", "--node-id", f"node-{i}",
        ]
        procs.append((Proc.start(args, logs / f"node-{i}.log"), a, b))
    try:
        out = []
        for proc, a, b in procs:
            metrics = proc.wait_line("metrics on")
            address = proc.wait_line("listening on")
            out.append((proc, Hop(address, a, b), metrics))
        yield out
    finally:
        for proc, _, _ in procs:
            proc.stop()


def _view(model: str, hops: list[Hop]) -> StaticView:
    views = [
        NodeView(NodeStatus(f"node-{i}", h.address, model, LayerRange(h.start, h.end), "cpu", state=NodeState.READY))
        for i, h in enumerate(hops)
    ]
    return StaticView(SwarmState.of(model, 30, 1, views))


@pytest.fixture(scope="module")
def client(default_model: Path, nodes: list[tuple[Proc, Hop, str]]) -> AsyncSwarmClient:
    args = read_args(default_model)
    route = StaticRoute([h for _, h, _ in nodes], max_context=args.max_position_embeddings, eos_token_ids=args.eos_token_ids)
    return AsyncSwarmClient(route, load_tokenizer(default_model))


@pytest.fixture(scope="module")
def gateway(client: AsyncSwarmClient, nodes: list[tuple[Proc, Hop, str]]) -> Iterator[ThreadedHttpServer]:
    hops = [h for _, h, _ in nodes]
    config = GatewayConfig(api_keys=(KEY,))
    with ThreadedHttpServer(lambda: create_app(client, _view("smollm2", hops), config)) as server:
        yield server


def _openai(server: ThreadedHttpServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_gets_what_the_local_cli_prints(gateway: ThreadedHttpServer, default_model: Path) -> None:
    api = _openai(gateway)
    model = api.models.list().data[0].id
    expected = local_cli(default_model, PROMPT, "--max-tokens", str(N))
    expected_chat = local_cli(default_model, QUESTION, "--chat", "--max-tokens", str(N))
    assert expected and expected_chat

    r = api.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == expected
    assert r.usage is not None and r.usage.completion_tokens == N and r.choices[0].finish_reason == "length"

    pieces = api.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == expected

    messages: Any = [{"role": "user", "content": QUESTION}]
    c = api.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0)
    assert c.choices[0].message.content == expected_chat
    assert c.usage is not None and c.usage.prompt_tokens > 10

    chunks = api.chat.completions.create(model=model, messages=messages, max_tokens=N, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected_chat


def test_errors_keys_and_metrics(gateway: ThreadedHttpServer, nodes: list[tuple[Proc, Hop, str]]) -> None:
    api = _openai(gateway)
    model = api.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=model, messages=[])
    assert bad.value.status_code == 400 and bad.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=model, prompt="x", max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="llama-9000", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as denied:
        _openai(gateway, "sk-wrong").completions.create(model=model, prompt="x")
    assert denied.value.status_code == 401

    gw_before = scrape(gateway.url + "/metrics")
    node_before = [scrape(url) for _, _, url in nodes]
    api.completions.create(model=model, prompt=PROMPT, max_tokens=5)
    gw_after = scrape(gateway.url + "/metrics")
    node_after = [scrape(url) for _, _, url in nodes]

    assert value(gw_after, "swarm_gateway_completion_tokens_total") - value(gw_before, "swarm_gateway_completion_tokens_total") == 5
    ok = {"endpoint": "completions", "status": "200"}
    assert value(gw_after, "swarm_gateway_requests_total", **ok) == value(gw_before, "swarm_gateway_requests_total", **ok) + 1
    assert value(gw_after, "swarm_gateway_time_to_first_token_seconds_count") > value(gw_before, "swarm_gateway_time_to_first_token_seconds_count")
    assert value(gw_after, "swarm_gateway_auth_failures_total") >= 1
    assert value(gw_after, "swarm_nodes", state="ready") == 2
    for before, after in zip(node_before, node_after):
        assert value(after, "swarm_node_tokens_total", phase="decode") - value(before, "swarm_node_tokens_total", phase="decode") == 4
        assert value(after, "swarm_node_sessions_opened_total") == value(before, "swarm_node_sessions_opened_total") + 1
        assert total(after, "swarm_node_step_duration_seconds_count") > total(before, "swarm_node_step_duration_seconds_count")
        assert value(after, "swarm_node_batch_size_steps_count") > value(before, "swarm_node_batch_size_steps_count")
        assert value(after, "swarm_node_kv_free_tokens") > 0
    tail = node_after[1]
    assert value(tail, "swarm_node_sampled_tokens_total") - value(node_before[1], "swarm_node_sampled_tokens_total") == 5


def test_rate_limit_answers_429(client: AsyncSwarmClient, nodes: list[tuple[Proc, Hop, str]]) -> None:
    config = GatewayConfig(api_keys=(KEY,), requests_per_minute=2)
    with ThreadedHttpServer(lambda: create_app(client, None, config)) as server:
        api = _openai(server)
        model = api.models.list().data[0].id
        for _ in range(2):
            api.completions.create(model=model, prompt="Hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limited:
            api.completions.create(model=model, prompt="Hi", max_tokens=1)
        assert limited.value.status_code == 429
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        assert limited.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
