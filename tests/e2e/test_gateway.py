"""The OpenAI-compatible gateway of a real swarm: ``swarm-coordinator`` and two nodes.

The official ``openai`` client, pointed at the coordinator's HTTP port, must get
exactly what ``swarm generate --local`` prints, streaming or not; errors, keys and
limits answer as OpenAI's API does; ``/metrics`` of the coordinator and of both
nodes parse with Prometheus' parser and move when work is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e.gateway_helpers import Swarm, local_cli, scrape, start_swarm, total, value
from e2e.trust import Trust

from swarm_proto.model_args import read_args
from swarm_proto.weight_format import format_layer_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "sk-swarm-test"
LIMITED = "sk-limited"
PROMPT = "The three primary colors are"
QUESTION = "Name two planets of the solar system."
N = 20


@pytest.fixture(scope="module")
def swarm(default_model: Path, tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[Swarm]:
    logs = tmp_path_factory.mktemp("gateway-swarm")
    keys = logs / "keys"
    keys.write_text(f"# test keys\n{KEY}\n{LIMITED} rpm=2\n")
    # Room for 16 of the 30 layers per node: every route runs through both nodes.
    budget = 16 * format_layer_bytes(read_args(default_model), "bfloat16", "gguf", default_model)  # the nodes' default format
    swarm = start_swarm(
        default_model, 2, logs, coordinator_args=["--api-keys-file", str(keys)], node_args=["--memory-budget", str(budget)],
        key=KEY, trust=trust,
    )
    try:
        yield swarm
    finally:
        swarm.stop()


def _openai(swarm: Swarm, key: str = KEY) -> openai.OpenAI:
    client: openai.OpenAI = swarm.openai(key, max_retries=0, timeout=120)
    return client


def test_openai_client_gets_what_the_local_cli_prints(swarm: Swarm, default_model: Path) -> None:
    api = _openai(swarm)
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


def test_errors_keys_and_metrics(swarm: Swarm) -> None:
    api = _openai(swarm)
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
        _openai(swarm, "sk-wrong").completions.create(model=model, prompt="x")
    assert denied.value.status_code == 401

    urls = list(swarm.node_metrics.values())
    gw_before = swarm.metrics(KEY)
    node_before = [scrape(url) for url in urls]
    api.completions.create(model=model, prompt=PROMPT, max_tokens=5)
    gw_after = swarm.metrics(KEY)
    node_after = [scrape(url) for url in urls]

    assert value(gw_after, "swarm_gateway_completion_tokens_total") - value(gw_before, "swarm_gateway_completion_tokens_total") == 5
    ok = {"endpoint": "completions", "status": "200"}
    assert value(gw_after, "swarm_gateway_requests_total", **ok) == value(gw_before, "swarm_gateway_requests_total", **ok) + 1
    assert value(gw_after, "swarm_gateway_time_to_first_token_seconds_count") > value(gw_before, "swarm_gateway_time_to_first_token_seconds_count")
    assert value(gw_after, "swarm_gateway_auth_failures_total") >= 1
    assert value(gw_after, "swarm_nodes", state="ready") == 2
    assert value(gw_after, "swarm_layers_uncovered") == 0 and value(gw_after, "swarm_layers") == 30
    for before, after in zip(node_before, node_after):
        assert value(after, "swarm_node_tokens_total", phase="decode") - value(before, "swarm_node_tokens_total", phase="decode") == 4
        assert value(after, "swarm_node_sessions_opened_total") == value(before, "swarm_node_sessions_opened_total") + 1
        assert total(after, "swarm_node_step_duration_seconds_count") > total(before, "swarm_node_step_duration_seconds_count")
        assert value(after, "swarm_node_batch_size_steps_count") > value(before, "swarm_node_batch_size_steps_count")
        assert value(after, "swarm_node_kv_free_tokens") > 0
    sampled = [value(a, "swarm_node_sampled_tokens_total") - value(b, "swarm_node_sampled_tokens_total") for a, b in zip(node_after, node_before)]
    assert sorted(sampled) == [0, 5]  # the tail samples, the head does not


def test_rate_limit_answers_429(swarm: Swarm) -> None:
    api = _openai(swarm, LIMITED)
    model = api.models.list().data[0].id  # listing models is not rate limited
    for _ in range(2):
        api.completions.create(model=model, prompt="Hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        api.completions.create(model=model, prompt="Hi", max_tokens=1)
    assert limited.value.status_code == 429
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    assert limited.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    _openai(swarm).completions.create(model=model, prompt="Hi", max_tokens=1)  # other keys are not limited
