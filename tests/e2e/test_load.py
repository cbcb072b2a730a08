"""Busy is not broken: a memory-limited swarm loaded past its capacity through the gateway.

A coordinator and three nodes (the default, quantized path) started with a memory budget
of 16 layers each (the default model split over them, one node per span) and a small ``--kv-budget``, so a span holds
only a few sessions at once. The official ``openai`` client sends twice a span's
capacity of chat completions at once: every one completes with the text it gets alone,
the nodes' refusals are "busy" (waited on in the gateway's line), and no node is ever
reported, avoided or failed over. A second gateway on the same swarm with a line of one
answers the excess with 429 and ``Retry-After``, never a 5xx. A node killed during an
overload is still a failure, recovered as before.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e.gateway_helpers import Proc, Swarm, get_json, scrape, start_swarm, total, value
from e2e.trust import Trust

from swarm_node.admission import slot_length

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KV_BUDGET = "3M"  # two or three short chats (64-position slots) per span of this model (float32 KV)
MAX_TOKENS = 12
QUESTIONS = [
    "Name a planet.",
    "Name a color.",
    "Name a fruit.",
    "Name an animal.",
    "Name a country.",
    "Name a river.",
    "Name a metal.",
    "Name a flower.",
]


@pytest.fixture(scope="module")
def swarm(default_model: Path, tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[Swarm]:
    from swarm_proto.model_args import read_args
    from swarm_proto.weight_format import format_layer_bytes

    logs = tmp_path_factory.mktemp("load-swarm")
    layer_bytes = format_layer_bytes(read_args(default_model), "bfloat16", "gguf", default_model)
    swarm = start_swarm(
        default_model,
        3,
        logs,
        coordinator_args=["--queue-size", "32", "--queue-timeout", "120"],
        # The default path is batch-invariant (docs/engine.md): batched and replayed sessions
        # compute what they compute alone, so the kill test asks for every solo text.
        node_args=["--memory-budget", str(16 * layer_bytes), "--kv-budget", KV_BUDGET],
        trust=trust,
    )
    try:
        # Two nodes can cover the model before the third is assigned: wait for the layout
        # with all three, one node per span (a covered swarm is not reshuffled after that).
        swarm.wait(
            lambda s: all(n["serving"] for n in s["nodes"]) and set(s["coverage"]) == {1}, what="one node per span"
        )
        yield swarm
    finally:
        swarm.stop()


def _model(swarm: Swarm) -> str:
    return str(get_json(swarm.url + "/v1/models", context=swarm.ssl)["data"][0]["id"])


async def _ask(swarm: Swarm, questions: list[str], model: str, url: str = "") -> list[tuple[int, Any]]:
    """Each question at once to the swarm's gateway (or the one at ``url``); (200, text)
    or (status, the APIStatusError)."""
    api = swarm.async_openai("x", url, max_retries=0, timeout=300)

    async def one(q: str) -> tuple[int, Any]:
        try:
            r = await api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS, temperature=0
            )
            return 200, r.choices[0].message.content
        except openai.APIStatusError as exc:
            return exc.status_code, exc

    try:
        return await asyncio.gather(*(one(q) for q in questions))
    finally:
        await api.close()


def _solo(swarm: Swarm, questions: list[str], model: str) -> tuple[dict[str, str], int]:
    """Each question alone (one at a time), and the longest prompt in tokens."""
    api = swarm.openai("x", max_retries=0, timeout=300)
    out, longest = {}, 0
    for q in questions:
        r = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS, temperature=0
        )
        out[q] = r.choices[0].message.content or ""
        assert r.usage is not None
        longest = max(longest, r.usage.prompt_tokens)
    return out, longest


def _span_capacity(swarm: Swarm, longest_prompt: int) -> int:
    """Sessions of these requests the fullest span holds at once (from the nodes' load reports)."""
    state = swarm.wait(lambda s: all(n["load"] and n["load"]["kv_tokens"] for n in s["nodes"]), what="load reports")
    assert state["coverage"] and set(state["coverage"]) == {1}, state["coverage"]  # one node per span
    slot = slot_length(longest_prompt + MAX_TOKENS + 1)
    return min(n["load"]["kv_tokens"] // slot for n in state["nodes"])


def _no_failure_state(swarm: Swarm) -> None:
    """Nothing held against any node: no reports, no avoidance, no failover."""
    metrics = swarm.metrics()
    assert total(metrics, "swarm_gateway_avoided_nodes") == 0
    assert total(metrics, "swarm_gateway_failovers_total") == 0
    assert value(metrics, "swarm_failovers_total") == 0
    log = swarm.coordinator.log.read_text()
    assert "reported failing" not in log and "recently failed" not in log, log[-3000:]


def test_twice_the_capacity_completes_and_the_excess_of_a_small_line_gets_429(
    swarm: Swarm, default_model: Path, tmp_path: Path
) -> None:
    model = _model(swarm)
    solo, longest = _solo(swarm, QUESTIONS, model)
    capacity = _span_capacity(swarm, longest)
    assert 1 <= capacity <= len(QUESTIONS) // 2, capacity
    load = QUESTIONS[: 2 * capacity]

    # Twice a span's capacity at once: all complete, each with its solo text.
    answers = asyncio.run(_ask(swarm, load, model))
    assert [a for _, a in answers] == [solo[q] for q in load], answers
    metrics = swarm.metrics()
    assert value(metrics, "swarm_gateway_busy_total", kind="refused") > 0  # the load did hit "busy"
    assert value(metrics, "swarm_gateway_queue_wait_seconds_count") == len(QUESTIONS) + len(load)
    assert value(metrics, "swarm_gateway_queue_length") == 0
    refused = sum(total(scrape(url), "swarm_node_sessions_refused_total") for url in swarm.node_metrics.values())
    assert refused > 0
    _no_failure_state(swarm)

    # A second gateway on the same swarm, with a line of one: the excess gets 429.
    gateway = Proc.start(
        [sys.executable, "-m", "swarm_coordinator.http", "--coordinator", swarm.address, "--model", str(default_model)]
        + ["--port", "0", "--queue-size", "1", *swarm.trust.flags("gateway")],
        tmp_path / "gateway.log",
        env=swarm.trust.env,
    )
    try:
        url = gateway.wait_line("gateway listening on")
        burst = QUESTIONS[: 2 * capacity] + QUESTIONS[: 3]
        answers = asyncio.run(_ask(swarm, burst, model, url))
        statuses = sorted({status for status, _ in answers})
        assert set(statuses) <= {200, 429} and 429 in statuses, answers
        for q, (status, answer) in zip(burst, answers):
            if status == 200:
                assert answer == solo[q]
            else:
                assert int(answer.response.headers["Retry-After"]) >= 1
                assert answer.body["type"] == "server_overloaded" and "busy" in answer.body["message"]
        assert sum(status == 200 for status, _ in answers) >= capacity
        small = swarm.metrics(url=url)
        assert value(small, "swarm_gateway_busy_total", kind="queue_full") == sum(s == 429 for s, _ in answers)
    finally:
        gateway.stop()

    # The overload is over: a new request is served at once, nothing lingers.
    t0 = time.monotonic()
    (status, answer), = asyncio.run(_ask(swarm, QUESTIONS[:1], model))
    assert (status, answer) == (200, solo[QUESTIONS[0]])
    print(f"after the overload: served in {time.monotonic() - t0:.2f} s")  # the figure is bench/load.py's business
    _no_failure_state(swarm)
    state = swarm.state()
    assert state["queue"]["waiting"] == 0 and not state["queue"]["full"]
    assert not [e for e in state["events"] if e["kind"] == "failover"]


def test_a_node_killed_during_an_overload_is_recovered(swarm: Swarm, default_model: Path) -> None:
    """A real failure amid busy refusals: the in-flight generations fail over (the
    killed node's layers go to a survivor) and end with their solo texts; nothing gets
    a 5xx; only the killed node is reported."""
    model = _model(swarm)
    solo, longest = _solo(swarm, QUESTIONS, model)
    capacity = _span_capacity(swarm, longest)
    load = QUESTIONS[: 2 * capacity]
    state = swarm.state()
    victim = next(n["id"] for n in state["nodes"] if n["serving"] and n["serving"][1] == state["swarm"]["num_layers"])

    async def run() -> list[tuple[int, Any]]:
        task = asyncio.ensure_future(_ask(swarm, load, model))
        while True:  # kill the tail once generations are streaming tokens
            s = await asyncio.to_thread(swarm.state)
            if any(x["tokens"] > 0 for x in s["sessions"]):
                break
            await asyncio.sleep(0.05)
        swarm.nodes[victim].kill()
        return await task

    answers = asyncio.run(run())
    assert {status for status, _ in answers} <= {200, 429}, answers
    done = [(q, a) for q, (status, a) in zip(load, answers) if status == 200]
    assert len(done) >= capacity and all(a == solo[q] for q, a in done), answers
    log = swarm.coordinator.log.read_text()
    reported = {line.split("node ", 1)[1].split()[0] for line in log.splitlines() if "reported failing" in line}
    assert reported == {victim}, reported
