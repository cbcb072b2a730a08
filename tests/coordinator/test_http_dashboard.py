"""The dashboard's data and feed, and the coordinator's /metrics, over a scripted backend.

The snapshot is a pure function of a swarm view and the gateway's activity; the feed
and /metrics are read from a real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm_client import SwarmClient
from swarm_client.tokenizer import Tokenizer
from swarm_coordinator.http import GatewayConfig, StaticView, ThreadedHttpServer, create_app
from swarm_coordinator.http.dashboard import Activity, coverage, snapshot, swarm_sessions
from swarm_coordinator.state import NodeView, SwarmState
from swarm_proto.presence import Assign, Event, EventKind, LayerRange, NodeLoad, NodeState, NodeStatus, SessionLoad
from coordinator.test_http_api import REPLY, ByteHF, Script

MODEL = "tiny"


def node(node_id: str, start: int, end: int, state: NodeState = NodeState.READY, assigned: tuple[int, int] | None = None) -> NodeView:
    status = NodeStatus(node_id, f"127.0.0.1:{5000 + start}", MODEL, LayerRange(start, end), "cpu", 10**9, 100.0, state)
    assign = Assign(node_id, MODEL, LayerRange(*assigned)) if assigned else None
    return NodeView(status, NodeLoad(1, 0, 4096, 12.5), assign, time.monotonic())


def three_nodes(*, c_state: NodeState = NodeState.READY) -> StaticView:
    views = [node("a", 0, 4), node("b", 4, 8), node("c", 0, 8, c_state)]
    return StaticView(SwarmState.of(MODEL, 8, 1, views))


def test_snapshot_shows_nodes_coverage_and_events() -> None:
    view = StaticView(SwarmState.of(MODEL, 8, 1, [node("a", 0, 4), node("b", 4, 6), node("c", 5, 8, NodeState.OFFLINE)]))
    view.events.append(Event(EventKind.JOIN, "a", "hello", ts=1.0))
    view.events.append(Event(EventKind.LEAVE, "c", "offline", ts=2.0))
    snap = snapshot(view, Activity(), model_id="m", auth_required=True)
    assert snap["model"] == "m" and snap["auth_required"] and snap["swarm"] == {"model": MODEL, "num_layers": 8}
    assert snap["coverage"] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert snap["uncovered"] == [[6, 8]]
    by_id = {n["id"]: n for n in snap["nodes"]}
    assert by_id["a"]["serving"] == [0, 4] and by_id["a"]["state"] == "ready" and by_id["a"]["online"]
    assert by_id["c"]["serving"] is None and not by_id["c"]["online"] and by_id["c"]["hosted"] == [5, 8]
    assert by_id["a"]["load"]["free_kv_tokens"] == 4096
    assert [e["kind"] for e in snap["events"]] == ["leave", "join"]  # newest first
    assert snap["totals"]["nodes_online"] == 2 and snap["totals"]["nodes"] == 3
    json.dumps(snap)  # JSON-ready


def test_sessions_of_the_swarm_merge_what_each_hop_reports() -> None:
    """A session from the library or the CLI never passes the gateway: the nodes list
    it in their loads, and the dashboard shows it once, with its route."""

    def with_sessions(view: NodeView, *sessions: SessionLoad, online: bool = True) -> NodeView:
        load = NodeLoad(len(sessions), 0, 4096, 1.0, sessions)
        status = view.status if online else replace(view.status, state=NodeState.OFFLINE)
        return NodeView(status, load, view.assign, view.last_seen)

    lib = "5f2c0e8a9b7d4c1e8f3a2b6c9d0e1f2a"
    views = [
        with_sessions(node("a", 0, 4), SessionLoad(lib, 0, 4, 20, 12, 32, 4.0, 0.1), SessionLoad("cli", 0, 4, 7, 7, 0, 1.0, 0.5)),
        with_sessions(node("b", 4, 8), SessionLoad(lib, 4, 8, 21, 12, 32, 3.9, 0.05)),
        with_sessions(node("c", 0, 8), SessionLoad("gone", 0, 8, 9, 3, 16, 9.0, 0.0), online=False),
    ]
    state = SwarmState.of(MODEL, 8, 1, views)
    listed = swarm_sessions(state)
    assert [s["id"] for s in listed] == [lib, "cli"]  # longest-running first; an offline node's are gone
    first = listed[0]
    assert first["hops"] == [{"node": "a", "layers": [0, 4]}, {"node": "b", "layers": [4, 8]}]
    assert first["covers"] == 8 and first["position"] == 21 and first["generated"] == 9
    assert first["max_new_tokens"] == 32 and first["age_s"] == 4.0 and first["idle_s"] == 0.1
    assert listed[1]["covers"] == 4  # its tail has not reported yet
    snap = snapshot(StaticView(state), Activity(), model_id="m", auth_required=False)
    assert snap["swarm_sessions"] == listed and snap["totals"]["swarm_sessions"] == 2 and snap["totals"]["active"] == 0
    json.dumps(snap)


def test_coverage_counts_replicas_and_ignores_loading_nodes() -> None:
    state = SwarmState.of(
        MODEL, 6, 1, [node("a", 0, 6), node("b", 0, 3), node("c", 3, 6, NodeState.LOADING, assigned=(3, 6))]
    )
    assert coverage(state) == [2, 2, 2, 1, 1, 1]


def test_activity_series_and_sessions() -> None:
    now = [1000.5]
    act = Activity(clock=lambda: now[0])
    info = act.start("chat.completions", "key-1", prompt_tokens=7, max_tokens=20)
    act.tokens(info, 1, info.t0 + 0.2)  # first token
    act.tokens(info, 2, info.t0 + 0.3)
    assert [s.id for s in act.active.values()] == [info.id]
    now[0] = 1001.2
    act.end(info, "done", "stop")
    now[0] = 1002.0
    points = act.series(3)
    assert [p["t"] for p in points] == [999, 1000, 1001]
    assert points[1]["tokens"] == 3 and points[1]["requests"] == 1
    assert points[1]["ttft_ms"] == pytest.approx(200.0) and points[1]["itl_ms"] == pytest.approx(50.0)
    assert points[0]["itl_ms"] is None and not act.active and act.recent[0].finish_reason == "stop"
    assert act.total_tokens == 3


def _client(delay: float = 0.0) -> SwarmClient:
    return SwarmClient(Script(delay), Tokenizer(ByteHF(), source="/m/tiny"))  # type: ignore[arg-type]


@pytest.fixture
def served() -> Any:
    view = three_nodes()
    with ThreadedHttpServer(lambda: create_app(lambda: _client(0.001), view, GatewayConfig(feed_interval_s=5.0))) as server:
        yield server, view


def _read_snapshots(response: Any) -> Any:
    for block in response.iter_text():
        for part in block.split("\n\n"):
            lines = part.strip().splitlines()
            if len(lines) == 2 and lines[0] == "event: snapshot" and lines[1].startswith("data: "):
                yield json.loads(lines[1][6:])


def test_feed_pushes_changes_without_waiting_for_the_tick(served: Any) -> None:
    server, view = served
    with httpx2.Client(base_url=server.url, timeout=10) as http:
        assert "llama-swarm" in http.get("/").text
        assert http.get("/static/app.js").status_code == 200
        with http.stream("GET", "/dashboard/feed") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            snaps = _read_snapshots(resp)
            first = next(snaps)
            assert [n["id"] for n in first["nodes"]] == ["a", "b", "c"] and first["uncovered"] == []

            def change() -> None:
                view.state = view.state.with_node(node("c", 0, 8, NodeState.OFFLINE))
                view.events.append(Event(EventKind.LEAVE, "c", "offline"))
                server.gateway.poke()

            t0 = time.monotonic()
            server.call(change)
            second = next(snaps)
            assert time.monotonic() - t0 < 2.0  # the feed's tick is 5 s: the change woke it
            assert {n["id"]: n["online"] for n in second["nodes"]} == {"a": True, "b": True, "c": False}
            assert second["events"][0]["kind"] == "leave" and second["events"][0]["node"] == "c"
            assert second["coverage"] == [1] * 8


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move(served: Any) -> None:
    server, view = served
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    before = _samples(httpx2.get(server.url + "/metrics").text)
    assert before[("swarm_nodes", (("state", "ready"),))] == 3
    assert before[("swarm_layer_replicas_min", ())] == 2 and before[("swarm_layers_uncovered", ())] == 0
    stream = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == REPLY
    api.completions.create(model="tiny", prompt="x", max_tokens=4)
    server.call(lambda: view.events.append(Event(EventKind.FAILOVER, "b", "replayed 12 tokens")))
    after = _samples(httpx2.get(server.url + "/metrics").text)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("swarm_gateway_requests_total", endpoint="chat.completions", status="200") == 1
    assert moved("swarm_gateway_requests_total", endpoint="completions", status="200") == 1
    assert moved("swarm_gateway_completion_tokens_total") == len(REPLY) + 1 + 4
    assert moved("swarm_gateway_prompt_tokens_total") > 0
    assert moved("swarm_gateway_time_to_first_token_seconds_count") == 2
    assert moved("swarm_gateway_inter_token_latency_seconds_count") == len(REPLY) + 3
    assert moved("swarm_gateway_request_duration_seconds_count", endpoint="completions") == 1
    assert moved("swarm_failovers_total") == 1 and moved("swarm_events_total", kind="failover") == 1
    assert after[("swarm_gateway_active_requests", ())] == 0
    assert after[("swarm_node_tokens_per_second", (("node", "a"),))] == 12.5

    health = httpx2.get(server.url + "/healthz").json()
    assert health == {"status": "ok", "model": "tiny", "nodes_online": 3, "uncovered_layers": 0}
    state = httpx2.get(server.url + "/dashboard/state").json()
    assert state["totals"]["requests"] == 2 and [s["status"] for s in state["recent"]] == ["done", "done"]


def test_a_caller_that_hangs_up_ends_the_generation() -> None:
    script = Script(delay=0.05)
    client = SwarmClient(script, Tokenizer(ByteHF(), source="/m/tiny"))  # type: ignore[arg-type]
    with ThreadedHttpServer(lambda: create_app(client, None, GatewayConfig())) as server:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 30, "stream": True}
        with httpx2.Client(base_url=server.url, timeout=10) as http:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())
        deadline = time.monotonic() + 5
        while script.closed == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert script.closed == 1  # the backend's token stream was closed early
        state = httpx2.get(server.url + "/dashboard/state").json()
        assert state["totals"]["active"] == 0 and state["recent"][0]["status"] == "cancelled"
        assert state["recent"][0]["tokens"] < 30


def test_a_client_that_fails_to_start_answers_503_and_the_rest_keeps_serving() -> None:
    def broken() -> SwarmClient:
        raise FileNotFoundError("no such model")

    with ThreadedHttpServer(lambda: create_app(broken, three_nodes(), GatewayConfig())) as server:
        resp = httpx2.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert resp.status_code == 503 and "no such model" in resp.json()["error"]["message"]
        assert httpx2.get(server.url + "/dashboard/state").json()["totals"]["nodes"] == 3
        assert httpx2.get(server.url + "/metrics").status_code == 200


def test_every_v1_request_is_counted_by_status(served: Any) -> None:
    server, _ = served
    with httpx2.Client(base_url=server.url, timeout=10) as http:
        http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -2})
        http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        http.get("/v1/models")
        samples = _samples(http.get("/metrics").text)
    count = {k[1]: v for k, v in samples.items() if k[0] == "swarm_gateway_requests_total"}
    assert count[(("endpoint", "completions"), ("status", "200"))] == 1
    assert count[(("endpoint", "completions"), ("status", "400"))] == 1
    assert count[(("endpoint", "chat.completions"), ("status", "404"))] == 1
    assert count[(("endpoint", "models"), ("status", "200"))] == 1
    assert samples[("swarm_gateway_generations_total", (("endpoint", "completions"), ("outcome", "done")))] == 1


def test_an_open_feed_does_not_hold_up_shutdown() -> None:
    server = ThreadedHttpServer(lambda: create_app(_client(), three_nodes(), GatewayConfig()))
    server.start()
    http = httpx2.Client(base_url=server.url, timeout=10)
    with http.stream("GET", "/dashboard/feed") as resp:
        next(_read_snapshots(resp))
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 1.5  # uvicorn's graceful timeout is 2 s
    http.close()
