"""Control-plane pieces without a network: planning decisions, failure backoff, config,
the node's speed measurement and size parsing, the daemons' flags."""

from __future__ import annotations

import argparse

import pytest

from swarm_coordinator.assignment import AssignmentPolicy, plan
from swarm_coordinator.config import CoordinatorConfig
from swarm_coordinator.planner import decide
from swarm_coordinator.state import Assignment, LayerRange, NodeState, NodeStatus, NodeView, SwarmState
from swarm_node.agent import _broker
from swarm_node.engine.speed import measure, parse_bytes
from swarm_proto.flags import env_name
from swarm_proto.model_args import ModelArgs, layer_bytes, model_id
from swarm_proto.presence import Assign

MB = 1 << 20


def view(node_id: str, speed: float, budget_layers: int, *, hosted: LayerRange | None = None, pinned: bool = False,
         assign: LayerRange | None = None, state: NodeState = NodeState.READY) -> NodeView:
    status = NodeStatus(node_id, address=f"{node_id}:1", model="m", hosted=hosted, memory_budget=budget_layers * MB,
                        speed=speed, state=state, pinned=pinned)
    return NodeView(status, assign=Assign(node_id, "m", assign) if assign else None)


def swarm(*views: NodeView) -> SwarmState:
    return SwarmState.of("m", 30, MB, views)


def test_decide_follows_speed_and_memory() -> None:
    state = swarm(view("a", 300, 30), view("b", 200, 30), view("c", 100, 6))
    a = decide(state)
    assert a is not None and a.covers(30)
    sizes = {n: len(r) for n, r in a.items()}
    assert sizes["c"] <= 6 and sizes["a"] > sizes["b"] > 0
    assert a == plan(state)


def test_decide_leaves_pinned_nodes_alone() -> None:
    state = swarm(view("a", 100, 30), view("p", 100, 30, hosted=LayerRange(0, 10), pinned=True))
    a = decide(state)
    assert a is not None and "p" not in a and a["a"] == LayerRange(0, 30)


def test_decide_partial_when_memory_is_short_and_none_without_nodes() -> None:
    assert decide(swarm()) is None
    a = decide(swarm(view("a", 100, 10), view("b", 100, 5)))
    assert a is not None and not a.covers(30)
    assert sum(len(r) for _, r in a.items()) == 15


def test_joining_node_does_not_reshuffle_below_the_threshold() -> None:
    base = [view("a", 100, 30, assign=LayerRange(0, 10)), view("b", 100, 30, assign=LayerRange(10, 20)),
            view("c", 100, 30, assign=LayerRange(20, 30))]
    slow = decide(swarm(*base, view("d", 20, 30, state=NodeState.STARTING)))
    assert slow is not None
    assert {n: slow[n] for n in "abc"} == {"a": LayerRange(0, 10), "b": LayerRange(10, 20), "c": LayerRange(20, 30)}
    # a node six times as fast, which as a partial replica would leave the weakest layers
    # as they are, is worth a reshuffle
    fast = decide(swarm(*base, view("d", 600, 15, state=NodeState.STARTING)), AssignmentPolicy(min_gain=0.2))
    assert fast is not None and fast.covers(30)
    assert Assignment({n: fast[n] for n in "abc" if n in fast}) != Assignment(
        {"a": LayerRange(0, 10), "b": LayerRange(10, 20), "c": LayerRange(20, 30)}
    )


def test_config_checks() -> None:
    CoordinatorConfig(model="m")
    for bad in (dict(mqtt="localhost"), dict(replicas=0), dict(swarm_id="a/b"), dict(port=70000), dict(dtype="int8")):
        with pytest.raises(Exception):
            CoordinatorConfig(model="m", **bad)  # type: ignore[arg-type]


def test_sizes_and_names() -> None:
    assert parse_bytes("512M") == 512 * MB and parse_bytes("1.5g") == int(1.5 * (1 << 30)) and parse_bytes("100") == 100
    for bad in ("", "G", "12 parsecs", "-1G"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert model_id("/x/y/SmolLM2.gguf") == "SmolLM2.gguf" and model_id("/models/tiny/") == "tiny"
    assert _broker("mqtt://0.0.0.0:1999", "10.1.2.3").host == "10.1.2.3"
    assert _broker("mqtt://broker:1883", "10.1.2.3").host == "broker"


def test_speed_measurement_is_sane() -> None:
    args = ModelArgs(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=16)
    assert layer_bytes(args, "float32") == 4 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64)
    s = measure(args, budget_s=0.05)
    assert s.decode > 0 and s.prefill > s.decode  # a chunk of prompt uses the hardware better than one token


def _daemon_parsers() -> dict[str, argparse.ArgumentParser]:
    from swarm_coordinator.cli import build_parser as coordinator
    from swarm_coordinator.http.__main__ import build_parser as gateway
    from swarm_node.cli import build_parser as node

    return {"swarm-node": node(), "swarm-coordinator": coordinator(), "gateway": gateway()}


def test_every_daemon_flag_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's rule, checked: each flag falls back to SWARM_<FLAG> (the standalone
    gateway's choice of source, a required either/or, is the one exception)."""
    sources = {"--local", "--route", "--coordinator"}
    for prog, parser in _daemon_parsers().items():
        for action in parser._actions:
            flags = [f for f in action.option_strings if f.startswith("--")]
            if not flags or flags[0] == "--help" or (prog == "gateway" and flags[0] in sources):
                continue
            assert f"(env {env_name(flags[0])})" in (action.help or ""), f"{prog} {flags[0]}"
    monkeypatch.setenv("SWARM_API_KEY", "k1,k2")
    monkeypatch.setenv("SWARM_RATE_LIMIT_RPM", "7")
    ns = _daemon_parsers()["swarm-coordinator"].parse_args([])
    assert ns.api_key == ["k1", "k2"] and ns.rate_limit_rpm == 7
