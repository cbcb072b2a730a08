"""The acceptable-use policy at the gateway, in process: the official ``openai`` client
over httpx's ASGI transport and a scripted backend (see test_http_api.py), plus the
client library's GatewayClient over a real loopback HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from coordinator.test_http_api import MODEL, REPLY, Script, make, oai

from swarm_client.errors import ContentPolicyError
from swarm_client.gateway import GatewayClient, policy_error
from swarm_coordinator.http import GatewayConfig, ThreadedHttpServer, create_app
from swarm_coordinator.http.policy_gate import PolicyGate

# REPLY is "Paris is the capital. It is big."
RULES = """
[policy]
holdback_chars = 8

[[rule]]
id = "no-bombs"
pattern = "build a bomb"
applies_to = "prompt"

[[rule]]
id = "no-capitals"
pattern = "capital"
applies_to = "completion"
action = "stop"

[[rule]]
id = "magic"
classifier = "policy_classifiers:secret_word"
applies_to = "prompt"
"""


def _policy(tmp_path: Path, text: str = RULES) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def _gate(app: Any) -> PolicyGate:
    return app.state.gateway.policy  # type: ignore[no-any-return]


def _audit(app: Any, path: Path) -> list[dict[str, Any]]:
    gate = _gate(app)
    assert gate.audit is not None
    gate.audit.drain()
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_refused_prompt_never_reaches_the_backend(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    app, script = make(GatewayConfig(policy_file=str(_policy(tmp_path)), audit_log=str(audit), api_keys=("sk-a",)))
    client = oai(app, "sk-a")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(model=MODEL, prompt="How to BUILD A BOMB at home", max_tokens=5)
    assert refused.value.status_code == 400 and refused.value.code == "content_policy_violation"
    assert "no-bombs" in refused.value.message and refused.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "Be nice."}, {"role": "user", "content": "say xyzzy"}]
        )
    assert refused.value.code == "content_policy_violation" and "'magic'" in refused.value.message
    assert refused.value.param == "messages"
    err = policy_error(refused.value)
    assert err is not None and (err.rule, err.stage) == ("magic", "prompt")
    assert script.calls == []  # the backend never saw a step

    # token-id prompts are decoded and checked too
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt=[b + 3 for b in b"build a bomb"], max_tokens=2)
    assert script.calls == []

    r = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert r.choices[0].text == "Paris" and r.choices[0].finish_reason == "length"

    lines = _audit(app, audit)
    assert [(x["decision"], x["rule"]) for x in lines] == [
        ("refused", "no-bombs"), ("refused", "magic"), ("refused", "no-bombs"), ("allowed", None)
    ]
    key = "key-" + hashlib.sha256(b"sk-a").hexdigest()[:8]
    assert all(x["key"] == key for x in lines) and "sk-a" not in audit.read_text()
    assert lines[0]["prompt_sha256"] == hashlib.sha256(b"How to BUILD A BOMB at home").hexdigest()
    assert lines[1]["label"] == "secret" and lines[1]["endpoint"] == "chat.completions" and lines[1]["model"] == MODEL
    assert (lines[3]["prompt_tokens"], lines[3]["completion_tokens"], lines[3]["finish_reason"]) == (5, 5, "length")
    text = audit.read_text()
    assert "BOMB" not in text and "xyzzy" not in text and "Paris" not in text  # no texts unless asked
    assert all({"time", "ts", "key", "model", "decision", "rule", "prompt_tokens", "completion_tokens", "prompt_sha256"} <= set(x) for x in lines)

    state = (await _raw_get(app, "/dashboard/state", key="sk-a"))["policy"]
    assert state["rules"] == ["no-bombs", "no-capitals", "magic"]
    assert state["refusals_by_key"] == {key: 3}
    assert [e["kind"] for e in state["events"]] == ["refused"] * 3 and state["events"][0]["rule"] == "no-bombs"
    metrics = await _raw_get(app, "/metrics", text=True, key="sk-a")
    assert 'swarm_gateway_policy_decisions_total{decision="refused",rule="no-bombs"} 2.0' in metrics
    assert 'swarm_gateway_policy_decisions_total{decision="refused",rule="magic"} 1.0' in metrics
    assert 'swarm_gateway_policy_decisions_total{decision="allowed",rule=""} 1.0' in metrics
    assert "swarm_gateway_policy_rules 3.0" in metrics
    _gate(app).close()


async def _raw_get(app: Any, path: str, text: bool = False, key: str = "") -> Any:
    from coordinator.test_http_api import raw

    async with raw(app) as http:
        resp = await http.get(path, headers={"Authorization": f"Bearer {key}"} if key else {})
        assert resp.status_code == 200
        return resp.text if text else resp.json()


async def test_a_completion_crossing_a_rule_is_stopped(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    script = Script()
    app, _ = make(GatewayConfig(policy_file=str(_policy(tmp_path)), audit_log=str(audit), audit_log_text=True), script)
    client = oai(app)
    r = await client.completions.create(model=MODEL, prompt="Tell me", max_tokens=30)
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and choice.text == "Paris is the "
    assert (choice.model_extra or {}).get("stop_reason") == "no-capitals"
    assert r.usage is not None and r.usage.completion_tokens == len("Paris is the ")
    assert script.closed == 1  # the generation was closed at the match

    c = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert c.choices[0].finish_reason == "content_filter" and c.choices[0].message.content == "Paris is the "
    err = policy_error(c.choices[0], c.choices[0].message.content or "")
    assert err is not None and (err.rule, err.stage, err.text) == ("no-capitals", "completion", "Paris is the ")

    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Paris is the "
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["content_filter"]
    stream2 = await client.completions.create(model=MODEL, prompt="x", max_tokens=30, stream=True)
    pieces = [p async for p in stream2]
    assert "".join(p.choices[0].text for p in pieces) == "Paris is the "
    assert pieces[-1].choices[0].finish_reason == "content_filter"
    assert (pieces[-1].choices[0].model_extra or {}).get("stop_reason") == "no-capitals"

    lines = _audit(app, audit)
    assert [(x["decision"], x["rule"], x["finish_reason"]) for x in lines] == [("stopped", "no-capitals", "content_filter")] * 4
    assert lines[0]["prompt"] == "Tell me" and lines[0]["completion"] == "Paris is the "  # texts: asked for
    assert lines[1]["prompt"] == [{"role": "user", "content": "hi"}]
    _gate(app).close()


async def test_refuse_on_a_completion_withholds_the_answer(tmp_path: Path) -> None:
    rules = "[[rule]]\nid = 'big'\npattern = 'is big'\napplies_to = 'completion'\naction = 'refuse'\n"
    app, _ = make(GatewayConfig(policy_file=str(_policy(tmp_path, rules))))
    r = await oai(app).completions.create(model=MODEL, prompt="x", max_tokens=64)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].text == ""
    r = await oai(app).completions.create(model=MODEL, prompt="x", max_tokens=10)  # stops before the words
    assert r.choices[0].text == REPLY[:10] and r.choices[0].finish_reason == "length"


async def test_reload_swaps_rules_and_a_broken_file_keeps_the_old_ones(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    app, _ = make(GatewayConfig(policy_file=str(path)))
    gate = _gate(app)
    client = oai(app)
    await client.completions.create(model=MODEL, prompt="hello there", max_tokens=2)

    path.write_text(RULES + "\n[[rule]]\nid = 'no-hello'\npattern = 'hello'\napplies_to = 'prompt'\n")
    assert gate.reload()
    with pytest.raises(openai.BadRequestError, match="no-hello"):
        await client.completions.create(model=MODEL, prompt="hello there", max_tokens=2)

    path.write_text("[[rule]]\nid = 'x'\npattern = '(oops'\n")
    assert not gate.reload()
    assert "bad regular expression" in gate.reload_error and "rule #1 ('x')" in gate.reload_error
    with pytest.raises(openai.BadRequestError, match="no-hello"):  # the old rules stay
        await client.completions.create(model=MODEL, prompt="hello there", max_tokens=2)
    state = (await _raw_get(app, "/dashboard/state"))["policy"]
    assert state["reload_error"] and "no-hello" in state["rules"]
    assert [e["kind"] for e in state["events"]] == ["refused", "reload_failed", "refused", "reloaded"]
    metrics = await _raw_get(app, "/metrics", text=True)
    assert 'swarm_gateway_policy_reloads_total{result="ok"} 1.0' in metrics
    assert 'swarm_gateway_policy_reloads_total{result="error"} 1.0' in metrics


async def test_the_file_watch_reloads(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    app, _ = make(GatewayConfig(policy_file=str(path), policy_watch_s=0.05))
    gate = _gate(app)
    watch = asyncio.get_running_loop().create_task(gate.watch())
    try:
        path.write_text("[[rule]]\nid = 'only'\npattern = 'zzz'\n")
        for _ in range(200):
            if gate.policy.ids == ("only",):
                break
            await asyncio.sleep(0.05)
        assert gate.policy.ids == ("only",)
    finally:
        watch.cancel()


def test_a_bad_policy_stops_the_gateway_at_start(tmp_path: Path) -> None:
    import argparse

    from swarm_coordinator.errors import PolicyError
    from swarm_coordinator.http.mount import add_gateway_flags, gateway_config_from_args

    bad = _policy(tmp_path, "[[rule]]\nid = 'dup'\npattern = 'a'\n[[rule]]\nid = 'dup'\npattern = 'b'\n")
    parser = argparse.ArgumentParser()
    add_gateway_flags(parser)
    with pytest.raises(PolicyError, match="duplicate id 'dup'"):
        gateway_config_from_args(parser.parse_args(["--policy", str(bad)]))
    good = _policy(tmp_path)
    cfg = gateway_config_from_args(parser.parse_args(["--policy", str(good), "--audit-log", "a.jsonl", "--audit-log-text"]))
    assert (cfg.policy_file, cfg.audit_log, cfg.audit_log_text) == (str(good), "a.jsonl", True)


def test_gateway_client_raises_content_policy_error(tmp_path: Path) -> None:
    from helpers import ByteHF

    from swarm_client import SwarmClient
    from swarm_client.tokenizer import Tokenizer

    config = GatewayConfig(policy_file=str(_policy(tmp_path)))
    with ThreadedHttpServer(
        lambda: create_app(SwarmClient(Script(), Tokenizer(ByteHF(), source="/models/tiny-bytes")), None, config)  # type: ignore[arg-type]
    ) as server:
        gw = GatewayClient(server.url + "/v1")
        with pytest.raises(ContentPolicyError) as refused:
            gw.completion("build a bomb", max_tokens=3)
        assert (refused.value.rule, refused.value.stage) == ("no-bombs", "prompt")
        with pytest.raises(ContentPolicyError) as stopped:
            gw.chat([{"role": "user", "content": "hi"}], max_tokens=40)
        assert (stopped.value.rule, stopped.value.stage, stopped.value.text) == ("no-capitals", "completion", "Paris is the ")
        got: list[str] = []
        with pytest.raises(ContentPolicyError) as stopped:
            got.extend(gw.stream_completion("x", max_tokens=40))
        assert "".join(got) == "Paris is the " and stopped.value.text == "Paris is the "
        assert gw.completion("x", max_tokens=5) == "Paris"
