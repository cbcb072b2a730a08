"""The acceptable-use policy of a real swarm's gateway: ``swarm-coordinator --policy
--audit-log`` and one node, real processes, the official ``openai`` client.

A refused prompt never reaches a node (the node's own metrics do not move); a
completion that crosses a rule stops at once, streamed or not; a classifier entry
point refuses; the audit log holds one line per request and no text; SIGHUP reloads
the rules, and a broken file keeps the old ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e.gateway_helpers import CHROMIUM, CHROMIUM_ARGS, Swarm, scrape, start_swarm, total, value
from e2e.trust import Trust

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "sk-anything"  # the API is open (so the dashboard and /metrics need no key): callers are "anonymous"
TESTS = Path(__file__).resolve().parent.parent  # policy_classifiers.py lives there
RULES = """
[[rule]]
id = "no-bombs"
pattern = "build a bomb"
applies_to = "prompt"
action = "refuse"

[[rule]]
id = "no-paris"
pattern = "paris"
applies_to = "completion"
action = "stop"

[[rule]]
id = "magic"
classifier = "policy_classifiers:secret_word"
applies_to = "prompt"
"""


@pytest.fixture(scope="module")
def swarm(default_model: Path, tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[Swarm]:
    logs = tmp_path_factory.mktemp("policy-swarm")
    (logs / "policy.toml").write_text(RULES)
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    args = ["--policy", str(logs / "policy.toml"), "--policy-watch", "0"]
    args += ["--audit-log", str(logs / "audit.jsonl")]
    swarm = start_swarm(default_model, 1, logs, coordinator_args=args, coordinator_env=env, trust=trust)
    try:
        yield swarm
    finally:
        swarm.stop()


def _files(swarm: Swarm) -> tuple[Path, Path]:
    logs = swarm.coordinator.log.parent
    return logs / "policy.toml", logs / "audit.jsonl"


def _api(swarm: Swarm) -> tuple[openai.OpenAI, str]:
    api: openai.OpenAI = swarm.openai(KEY, max_retries=0, timeout=120)
    return api, api.models.list().data[0].id


def _node(swarm: Swarm) -> dict[str, float]:
    (url,) = swarm.node_metrics.values()
    s = scrape(url)
    return {
        "opened": value(s, "swarm_node_sessions_opened_total"),
        "prefill": value(s, "swarm_node_tokens_total", phase="prefill"),
        "decode": value(s, "swarm_node_tokens_total", phase="decode"),
        "steps": total(s, "swarm_node_step_duration_seconds_count"),
    }


def _lines(audit: Path, n: int) -> list[dict[str, Any]]:
    """The audit log's lines once it holds at least ``n`` (a thread writes them)."""
    deadline = time.monotonic() + 30
    while True:
        lines = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            assert len(lines) >= n, lines
            return lines
        time.sleep(0.05)


def test_a_refused_prompt_never_reaches_a_node(swarm: Swarm) -> None:
    api, model = _api(swarm)
    before = _node(swarm)
    with pytest.raises(openai.BadRequestError) as refused:
        api.completions.create(model=model, prompt="Explain how to build a BOMB.", max_tokens=8)
    assert refused.value.status_code == 400 and refused.value.code == "content_policy_violation"
    assert "no-bombs" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi."}, {"role": "user", "content": "Say xyzzy."}], stream=True
        )
    assert refused.value.code == "content_policy_violation" and "'magic'" in refused.value.message  # the classifier
    assert _node(swarm) == before  # no session, no step, no token on the node


def test_a_completion_crossing_a_rule_is_stopped(swarm: Swarm) -> None:
    api, model = _api(swarm)
    prompt = "The capital of France is"
    before = _node(swarm)
    r = api.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and "paris" not in choice.text.lower()
    assert (choice.model_extra or {}).get("stop_reason") == "no-paris"
    after = _node(swarm)
    assert after["decode"] - before["decode"] < 12  # stopped at once, far from max_tokens

    stream = api.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True)
    pieces = list(stream)
    text = "".join(p.choices[0].text for p in pieces if p.choices)
    assert text == choice.text  # the same cut, streamed
    assert pieces[-1].choices[0].finish_reason == "content_filter"

    chat = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=40, stream=True
    )
    chunks = list(chat)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["content_filter"]
    assert "paris" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).lower()


def test_the_audit_log_has_a_line_per_request_and_no_text(swarm: Swarm) -> None:
    api, model = _api(swarm)
    _, audit = _files(swarm)
    seen = len(_lines(audit, 0))
    api.completions.create(model=model, prompt="Count: one, two,", max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model, prompt="build a bomb", max_tokens=3)
    lines = _lines(audit, seen + 2)
    allowed, refused = lines[seen:]
    fingerprint = "anonymous"  # key fingerprints: tests/coordinator/test_http_policy.py
    assert allowed["decision"] == "allowed" and allowed["rule"] is None and allowed["key"] == fingerprint
    assert allowed["completion_tokens"] == 3 and allowed["prompt_tokens"] > 3 and allowed["model"] == model
    assert allowed["prompt_sha256"] == hashlib.sha256(b"Count: one, two,").hexdigest()
    assert refused["decision"] == "refused" and refused["rule"] == "no-bombs" and refused["completion_tokens"] == 0
    assert {x["decision"] for x in lines} == {"allowed", "refused", "stopped"}
    text = audit.read_text()
    assert KEY not in text and "build a" not in text and "Count" not in text and "prompt\"" not in text

    state: Any = swarm.wait(lambda s: s["policy"] is not None, what="the policy panel")
    assert state["policy"]["refusals_by_key"][fingerprint] >= 3
    metrics = swarm.metrics()
    assert value(metrics, "swarm_gateway_policy_decisions_total", decision="refused", rule="no-bombs") >= 2
    assert value(metrics, "swarm_gateway_policy_decisions_total", decision="stopped", rule="no-paris") >= 3


def test_sighup_reloads_and_a_broken_file_keeps_the_old_rules(swarm: Swarm) -> None:
    api, model = _api(swarm)
    policy, _ = _files(swarm)
    policy.write_text(RULES + '\n[[rule]]\nid = "no-counting"\npattern = "count:"\napplies_to = "prompt"\n')
    swarm.coordinator.proc.send_signal(signal.SIGHUP)
    swarm.wait(lambda s: "no-counting" in s["policy"]["rules"], timeout=30, what="the reloaded rules")
    with pytest.raises(openai.BadRequestError, match="no-counting"):
        api.completions.create(model=model, prompt="Count: one, two,", max_tokens=3)

    policy.write_text('[[rule]]\nid = "broken"\npattern = "(unclosed"\n')
    swarm.coordinator.proc.send_signal(signal.SIGHUP)
    state = swarm.wait(lambda s: s["policy"]["reload_error"], timeout=30, what="the rejected reload")
    assert "broken" in state["policy"]["reload_error"] and "no-counting" in state["policy"]["rules"]
    with pytest.raises(openai.BadRequestError, match="no-counting"):  # the old rules stay
        api.completions.create(model=model, prompt="Count: one, two,", max_tokens=3)
    assert swarm.coordinator.proc.poll() is None
    assert "rejected on SIGHUP" in swarm.coordinator.log.read_text()


def test_the_dashboard_shows_policy_events_and_refusals_per_key(swarm: Swarm) -> None:
    from playwright.sync_api import expect, sync_playwright

    api, model = _api(swarm)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model, prompt="how do I build a bomb", max_tokens=3)
    fingerprint = "anonymous"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900}, ignore_https_errors=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(swarm.url + "/")
            expect(page.locator("#policy-card")).to_be_visible()
            expect(page.locator("#policy-keys tbody tr").first).to_contain_text(fingerprint)
            expect(page.locator('#policy-events li[data-kind="refused"]').first).to_contain_text("no-bombs")
            assert errors == []
        finally:
            browser.close()
