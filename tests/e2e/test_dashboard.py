"""The dashboard in a real browser (Debian's headless chromium, driven by Playwright).

A coordinator and three nodes run as processes. The page must show the three nodes
and full coverage, and a generation of the client library (which never passes the
gateway) among the sessions in the swarm, with its route; when a node is killed in the middle of a streamed generation it
must show the node offline, the events (leave, failover, reassignment) and coverage
restored, all without a reload, while the generation finishes with the same text
as without the failure; a prompt typed in the box must stream an answer. The test
saves a screenshot under bench/results/ (and the test's temp dir). It runs plain and
with TLS and a token (the page over HTTPS). A swarm bound to every interface with
neither must show the exposure warning.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e.chaos import add_tokenizer
from e2e.gateway_helpers import CHROMIUM, CHROMIUM_ARGS, Swarm, scrape, start_swarm, value
from e2e.trust import Trust
from helpers import make_tiny_model

from swarm_client import SwarmClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
STORY = "Write a short story about a lighthouse keeper and a storm."
MAX_TOKENS = 72


@pytest.fixture(scope="module")
def swarm(default_model: Path, tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[Swarm]:

    from swarm_proto.model_args import read_args
    from swarm_proto.weight_format import format_layer_bytes

    # Room for 16 of the 30 layers per node: one node cannot hold the model, so routes
    # span nodes, and any two can still cover it once the third is gone. The nodes run the
    # default (quantized, bfloat16 kernels): the failover below keeps the text because the
    # engine is batch-invariant (docs/engine.md), the replay computing what the steps did.
    budget = 16 * format_layer_bytes(read_args(default_model), "bfloat16", "gguf", default_model)
    swarm = start_swarm(
        default_model, 3, tmp_path_factory.mktemp("dashboard-swarm"), node_args=["--memory-budget", str(budget)],
        trust=trust,
    )
    try:
        yield swarm
    finally:
        swarm.stop()


def _victim(swarm: Swarm) -> str:
    """A node the streaming session runs on (live from the nodes' own /metrics)."""
    busy = [n for n, url in swarm.node_metrics.items() if value(scrape(url), "swarm_node_sessions_active") > 0]
    assert busy, "no node holds the streaming session"
    return sorted(busy)[-1]


def test_dashboard_follows_the_swarm_live(swarm: Swarm, default_model: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make deps-system)")
    from playwright.sync_api import expect, sync_playwright

    api: openai.OpenAI = swarm.openai("none", max_retries=0, timeout=300)
    model = api.models.list().data[0].id
    messages: Any = [{"role": "user", "content": STORY}]
    expected = api.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert expected.choices[0].finish_reason == "length"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # the browser does not know the test's swarm CA: it is the HTTPS, not the CA, under test here
        page = browser.new_page(viewport={"width": 1366, "height": 900}, ignore_https_errors=True)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(swarm.url + "/")

        # Three nodes, every layer covered.
        for node_id in swarm.nodes:
            expect(page.locator(f'#nodes tr[data-node-id="{node_id}"]')).to_have_attribute("data-state", "ready")
        expect(page.locator("#coverage")).to_have_attribute("data-uncovered", "0")
        expect(page.locator("#coverage .row.count .cell.gap")).to_have_count(0)
        expect(page.locator("#t-nodes")).to_have_text("3 / 3")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        expect(page.locator("#warnings")).to_be_hidden()  # bound to loopback: nothing exposed
        expect(page.locator("#nodes .pill.exposed")).to_have_count(0)
        page.evaluate("window.__sameDocument = true")

        # A session of the client library, held open after its first token: the nodes
        # list it in their loads, so the page shows it, with a route over two nodes or
        # more (one cannot hold the model), though the gateway has no request running.
        expect(page.locator("#swarm-sessions tbody tr")).to_have_count(0)
        with SwarmClient.remote(coordinator=swarm.address, model=default_model, **swarm.trust.library()) as library:
            events = library.stream(STORY, max_tokens=200, ignore_eos=True)
            assert next(events).token_ids
            row = page.locator("#swarm-sessions tbody tr")
            expect(row).to_have_count(1, timeout=30_000)
            expect(row).to_have_attribute("data-whole", "yes", timeout=30_000)  # every hop has reported it
            assert int(row.get_attribute("data-hops") or 0) >= 2
            expect(page.locator("#sessions tbody tr:not(.recent)")).to_have_count(0)
            events.close()  # type: ignore[attr-defined]
        expect(page.locator("#swarm-sessions tbody tr")).to_have_count(0, timeout=30_000)

        # Kill a node of the route while a generation streams through the gateway.
        streamed: list[str] = []
        failures: list[BaseException] = []
        ten_tokens = threading.Event()

        def stream() -> None:
            try:
                for chunk in api.chat.completions.create(
                    model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
                ):
                    if chunk.choices and chunk.choices[0].delta.content:
                        streamed.append(chunk.choices[0].delta.content)
                        if len(streamed) >= 10:
                            ten_tokens.set()
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)
            finally:
                ten_tokens.set()

        worker = threading.Thread(target=stream)
        worker.start()
        assert ten_tokens.wait(120)
        expect(page.locator("#sessions tbody tr:not(.recent)")).not_to_have_count(0)  # the live session
        victim = _victim(swarm)
        swarm.nodes[victim].kill()

        row = page.locator(f'#nodes tr[data-node-id="{victim}"]')
        expect(row).to_have_attribute("data-state", "offline", timeout=30_000)
        expect(page.locator(f'#events li[data-kind="leave"][data-node="{victim}"]')).to_have_count(1, timeout=30_000)
        expect(page.locator("#t-nodes")).to_have_text("2 / 3")
        # A reassignment after the leave (the list is newest first).
        page.wait_for_function(
            """victim => {
                const items = [...document.querySelectorAll("#events li")];
                const leave = items.findIndex(li => li.dataset.kind === "leave" && li.dataset.node === victim);
                return leave > 0 && items.slice(0, leave).some(li => li.dataset.kind === "reassign");
            }""",
            arg=victim,
            timeout=90_000,
        )
        for node_id in swarm.nodes:
            if node_id != victim:
                expect(page.locator(f'#nodes tr[data-node-id="{node_id}"]')).to_have_attribute(
                    "data-state", "ready", timeout=90_000
                )
        expect(page.locator("#coverage")).to_have_attribute("data-uncovered", "0", timeout=90_000)
        expect(page.locator(f'#coverage .row[data-node-id="{victim}"] .cell.serving')).to_have_count(0)

        worker.join(240)
        assert not worker.is_alive() and not failures, failures
        assert "".join(streamed) == expected.choices[0].message.content  # failover kept the text
        expect(page.locator('#events li[data-kind="failover"]')).not_to_have_count(0, timeout=30_000)
        metrics = swarm.metrics()
        assert value(metrics, "swarm_gateway_failovers_total") >= 1 and value(metrics, "swarm_failovers_total") >= 1
        assert value(metrics, "swarm_node_up", node=victim) == 0

        # A prompt typed in the box streams an answer.
        page.evaluate(
            """() => {
                window.__updates = 0;
                new MutationObserver(() => window.__updates++).observe(
                    document.getElementById("prompt-output"), {childList: true, characterData: true, subtree: true});
            }"""
        )
        page.fill("#prompt-input", "What is the capital of France?")
        page.click("#prompt-send")
        expect(page.locator("#prompt-stats")).to_contain_text("finished", timeout=120_000)
        assert "Paris" in page.locator("#prompt-output").inner_text()
        assert page.evaluate("window.__updates") > 2  # it arrived in pieces, not at once

        assert page.evaluate("window.__sameDocument") is True  # nothing above reloaded the page
        assert not errors, errors
        page.wait_for_timeout(1500)  # let the charts take a few more points
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, RESULTS / "dashboard.png")


def test_an_exposed_coordinator_and_node_are_flagged_on_the_dashboard(tmp_path: Path) -> None:
    """Bound to every interface with neither TLS nor a token: the dashboard says so in
    its warning banner, for the coordinator and for the node, and marks the node's row.
    (A tiny model: only the exposure matters here; the ports are open for seconds.)"""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make deps-system)")
    from playwright.sync_api import expect, sync_playwright

    tiny = add_tokenizer(make_tiny_model(tmp_path, "llama3"))
    logs = tmp_path / "logs"
    logs.mkdir()
    swarm = start_swarm(
        tiny, 1, logs, coordinator_args=["--host", "0.0.0.0"], node_args=["--host", "0.0.0.0", "--advertise", "127.0.0.1"]
    )
    try:
        assert "neither TLS nor a swarm token" in swarm.coordinator.log.read_text()  # said at start, too
        assert "neither TLS nor a swarm token" in swarm.nodes["node-0"].log.read_text()
        url = swarm.url.replace("0.0.0.0", "127.0.0.1")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 900})
                page.goto(url + "/")
                banner = page.locator("#warnings")
                expect(banner).to_be_visible()
                expect(banner.locator("li")).to_have_count(2)
                expect(banner).to_contain_text("swarm-coordinator listening on 0.0.0.0 with neither TLS nor a swarm token")
                expect(banner).to_contain_text("node node-0 (127.0.0.1:")
                expect(page.locator('#nodes tr[data-node-id="node-0"] .pill.exposed')).to_be_visible()
            finally:
                browser.close()
    finally:
        swarm.stop()
