"""The control plane with real processes: a mosquitto broker, a ``swarm-coordinator`` and
``swarm-node --coordinator`` daemons on loopback, serving the default model.

One swarm is shared by the module and the tests run in order, each leaving the swarm
as the next expects: join and assignment, generation equal to ``--local``, a joiner
that does not reshuffle, a broker restart, a coordinator restart during a generation,
a node killed with SIGKILL. ``swarm up`` (embedded broker) is tested on its own.

The coordinator runs with torch hidden (``tests/without_torch.py``), as after
``pip install llama-swarm``; so does one client, which also imports every module of
the client and coordinator packages.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e.chaos import Daemon
from e2e.trust import Trust

from swarm_client.api import AsyncSwarmClient, SwarmClient
from swarm_coordinator.assignment import propose
from swarm_coordinator.broker import MosquittoBroker, find_mosquitto, free_port
from swarm_coordinator.planner import decide
from swarm_coordinator.registry import Registry, RegistryConfig
from swarm_coordinator.state import SwarmState
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.presence import NodeState
from swarm_proto.presence_client import BrokerAddress
from swarm_proto.trust import mqtt_password

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (make deps-system)"),
]

SWARM = "e2e"
KEEPALIVE = 5  # the nodes' MQTT keepalive (swarm_node.agent.NodeAgent default)
MB = 1 << 20
PROMPT = "The capital of France is"
WITHOUT_TORCH = str(Path(__file__).resolve().parents[1] / "without_torch.py")


NODE_IDS = ("fast", "mid", "slow", "late")


@dataclass
class Swarm:
    model: Path
    broker: MosquittoBroker
    coordinator: Daemon
    nodes: dict[str, Daemon]
    address: str
    tmp: Path
    trust: Trust
    broker_password: str  # the coordinator's broker login ("" when the broker is open)

    def node(self, name: str, speed: float, budget_mb: int) -> Daemon:
        argv = [sys.executable, "-m", "swarm_node.cli", "--coordinator", self.address, "--model", str(self.model),
                "--port", "0", "--node-id", name, "--threads", "1", "--speed", str(speed),
                "--memory-budget", f"{budget_mb}M", "--max-length", "512", *self.trust.flags(name)]
        proc = Daemon(name, argv, self.tmp / f"{name}.log", env=self.trust.env).start()
        self.nodes[name] = proc
        return proc

    def stub(self, channel: grpc.Channel) -> swarm_pb2_grpc.CoordinatorStub:
        return swarm_pb2_grpc.CoordinatorStub(channel)

    def list_nodes(self) -> dict[str, tuple[int, int]]:
        with self.trust.channel(self.address) as ch:
            nodes = self.stub(ch).ListNodes(swarm_pb2.ListNodesRequest(), timeout=5, metadata=self.trust.metadata).nodes
        return {n.node_id: (n.start, n.end) for n in nodes}

    def route(self) -> list[tuple[str, int, int]]:
        with self.trust.channel(self.address) as ch:
            request = swarm_pb2.RouteRequest(max_length=64)
            hops = self.stub(ch).GetRoute(request, timeout=5, metadata=self.trust.metadata).hops
        return [(h.node_id, h.start, h.end) for h in hops]

    def node_range(self, address: str) -> tuple[int, int]:
        with self.trust.channel(address) as ch:
            info = swarm_pb2_grpc.NodeStub(ch).Info(swarm_pb2.InfoRequest(), timeout=5, metadata=self.trust.metadata)
        return info.start, info.end

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``swarm ARGS`` as a client process of this swarm (its token and certificate)."""
        return subprocess.run(
            [sys.executable, "-m", "swarm_client.cli", *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **self.trust.client_env()},
        )

    def observe(self, predicate: Callable[[SwarmState], bool], timeout: float) -> SwarmState:
        """Watch the broker like a second coordinator would (retained messages + live)."""
        return asyncio.run(_observe(self, predicate, timeout))


class Observer(Registry):
    """A registry that only listens: it must not add its own join/leave events to the swarm's."""

    async def _flush(self) -> None:
        self._outbox.clear()


async def _observe(swarm: Swarm, predicate: Callable[[SwarmState], bool], timeout: float) -> SwarmState:
    url = swarm.broker.url
    config = RegistryConfig(url, SWARM, "SmolLM2-135M-Instruct.Q4_1.gguf", 30, 14_160_384, client_id="observer",
                            token=swarm.trust.token)
    login = None
    if swarm.broker_password:  # the broker refuses anonymous clients: log in as the coordinator does
        address = BrokerAddress.parse(url)
        login = BrokerAddress(address.host, address.port, "coordinator", swarm.broker_password, address.tls)
    client = swarm.trust.client
    registry = Observer(config, broker=login, tls_context=client.client_context() if client else None)
    try:
        await registry.start(wait=timeout)
        return await registry.wait_until(predicate, timeout)
    finally:
        try:
            await asyncio.wait_for(registry.stop(), 15)
        except asyncio.TimeoutError:
            pass  # a slow goodbye of the test's own observer is not the swarm's problem


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except grpc.RpcError as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def coordinator_proc(model: Path, port: int, broker: str, tmp: Path, trust: Trust, password: str) -> Daemon:
    argv = [sys.executable, WITHOUT_TORCH, "-m", "swarm_coordinator.cli", "--model", str(model), "--port", str(port),
            "--http-port", "0", "--mqtt", broker, "--swarm-id", SWARM, "--settle", "3", *trust.flags("coordinator")]
    env = {**trust.env, "SWARM_MQTT_PASSWORD": password}
    return Daemon("coordinator", argv, tmp / "coordinator.log", env=env)


def trusted_broker(trust: Trust) -> tuple[MosquittoBroker, str]:
    """mosquitto as the swarm's trust asks: open and in clear, or with TLS, a password
    file (the coordinator, and each node's password derived from the token) and the ACL.
    Returns it (not started) and the coordinator's broker password."""
    tls = trust.files("broker")
    if tls is None:
        return MosquittoBroker(), ""
    password = secrets.token_urlsafe(16)
    users = {"coordinator": password, **{n: mqtt_password(trust.token, SWARM, n) for n in NODE_IDS}}
    return MosquittoBroker(users=users, tls=(tls.cert, tls.key, tls.ca)), password


@pytest.fixture(scope="module")
def swarm(default_model: Path, tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[Swarm]:
    tmp = tmp_path_factory.mktemp("control-plane")
    broker, password = trusted_broker(trust)
    broker.start()
    port = free_port()
    coordinator = coordinator_proc(default_model, port, broker.url, tmp, trust, password)
    s = Swarm(default_model, broker, coordinator, {}, f"127.0.0.1:{port}", tmp, trust, password)
    try:
        # Nodes first: they wait for the coordinator, so all three join within one settle window.
        s.node("fast", 300, 300)  # room for 21 layers of 14.2 MB
        s.node("mid", 200, 200)  # 14
        s.node("slow", 100, 100)  # 7
        coordinator.start().line()
        yield s
    finally:
        for proc in [*s.nodes.values(), s.coordinator]:
            proc.stop()
        broker.close()


def test_nodes_load_the_layers_they_are_assigned(swarm: Swarm) -> None:
    wait_for("a route over the whole model", swarm.route, timeout=120)
    state = swarm.observe(lambda s: all(v.serving for v in s.online()) and len(s.online()) == 3, 30)
    assignment = state.current_assignment()
    # the layer counts follow the rule: shares of speed within memory, all three in one plan
    assert assignment == propose(state) == decide(state)
    assert {n: len(assignment[n]) for n in assignment} == {"fast": 15, "mid": 10, "slow": 5}
    assert assignment.covers(30)
    # ... and what each node process actually serves is what it was assigned
    for view in state.online():
        assert view.serving == assignment[view.node_id]
        assert swarm.node_range(view.address) == (view.serving.start, view.serving.end)
    assert swarm.list_nodes() == {n: (r.start, r.end) for n, r in assignment.items()}
    # each node measures round trips to its peers (the peer list from the coordinator,
    # over mutual TLS in a TLS swarm) and reports them in its load
    def measured(s: SwarmState) -> bool:
        online = s.online()
        return len(online) == len(swarm.nodes) and all(v.load is not None and v.load.peer_rtts for v in online)

    swarm.observe(measured, 60)


def test_generation_through_the_coordinator_equals_local(swarm: Swarm) -> None:
    out = swarm.cli("generate", "--coordinator", swarm.address, PROMPT, "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    with SwarmClient.local(swarm.model) as local:
        want = local.generate(PROMPT, max_tokens=12).text
    assert out.stdout == want + "\n"
    assert "Paris" in want


_WITHOUT_TORCH_CLIENT = """
import importlib, json, os, pkgutil, sys
import swarm_client, swarm_coordinator
from swarm_client import SwarmClient
from swarm_client.cli import main
from swarm_proto.tls import TlsFiles

address, model, prompt = sys.argv[1:]
modules = [m.name for p in (swarm_client, swarm_coordinator) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in modules:
    importlib.import_module(name)
env = os.environ  # the token and certificate (SWARM_TOKEN, SWARM_TLS_*), as the CLI reads them
tls = TlsFiles(env["SWARM_TLS_CERT"], env["SWARM_TLS_KEY"], env["SWARM_TLS_CA"]) if env.get("SWARM_TLS_CERT") else None
with SwarmClient.remote(coordinator=address, model=model, tls=tls) as client:
    text = client.generate(prompt, max_tokens=12).text
status = main(["generate", "--coordinator", address, "--model", model, prompt, "--max-tokens", "12"])
torch = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
print(json.dumps({"modules": modules, "text": text, "cli": status, "torch": torch}))
"""


def test_client_and_coordinator_run_without_torch(swarm: Swarm, tmp_path: Path) -> None:
    """The coordinator of this swarm runs with torch hidden; so does this client, with
    an empty model cache (its tokenizer is converted from the GGUF without torch)."""
    import json

    env = {**os.environ, **swarm.trust.client_env(), "SWARM_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, WITHOUT_TORCH, "-c", _WITHOUT_TORCH_CLIENT, swarm.address, str(swarm.model), PROMPT],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cli_text, report_line = out.stdout.rsplit("\n", 2)[-3:-1]
    report = json.loads(report_line)
    assert report["torch"] == []
    assert "PyTorch was not found" not in out.stderr  # transformers' advice, beside the point for a client
    assert {"swarm_client.cli", "swarm_client.remote", "swarm_coordinator.server", "swarm_coordinator.http.app"} <= set(report["modules"])
    with SwarmClient.local(swarm.model) as local:
        want = local.generate(PROMPT, max_tokens=12).text
    assert report["text"] == want and report["cli"] == 0 and cli_text == want
    assert (tmp_path / "tokenizers").is_dir()  # converted here, without torch
    assert "No module named 'torch'" not in swarm.coordinator.log.read_text()


def test_a_joiner_does_not_reshuffle_a_covered_swarm(swarm: Swarm) -> None:
    before = swarm.list_nodes()
    swarm.node("late", 50, 100)
    state = swarm.observe(lambda s: "late" in s.nodes and s.nodes["late"].serving is not None, 90)
    after = state.current_assignment()
    assert {n: (after[n].start, after[n].end) for n in before} == before  # gain below the 20 % threshold
    # within what its budget holds in its weight format (quantized SmolLM2: ~3.6 MB a layer)
    late = state.nodes["late"]
    assert late.status.layer_bytes > 0 and late.status.weight_format == "Q4_1"
    assert len(after["late"]) <= late.capacity(state.bytes_per_layer)


def test_broker_restart_everyone_reannounces(swarm: Swarm) -> None:
    swarm.broker.kill()
    time.sleep(1.0)
    swarm.broker.start()  # same port, no persistence: it knows nothing
    names = set(swarm.nodes)

    def back(s: SwarmState) -> bool:
        ready = {v.node_id for v in s.online() if v.status.state is NodeState.READY}
        return ready == names and all(v.assign is not None for v in s.online())

    state = swarm.observe(back, 60)  # statuses from the nodes, assignments from the coordinator
    assert state.current_assignment().covers(30)
    wait_for("a route after the broker restart", swarm.route, timeout=30)


def test_coordinator_restart_leaves_a_running_generation_alone(swarm: Swarm) -> None:
    with SwarmClient.local(swarm.model) as local:
        want = local.generate("Once upon a time", max_tokens=48, ignore_eos=True).token_ids

    async def generate() -> Any:
        async with AsyncSwarmClient.remote(coordinator=swarm.address, model=swarm.model, **swarm.trust.library()) as client:
            return await client.generate("Once upon a time", max_tokens=48, ignore_eos=True)

    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(asyncio.run(generate())))
    worker.start()
    time.sleep(1.5)  # the session is open and decoding
    swarm.coordinator.kill()
    swarm.coordinator.start().line()
    t0 = time.monotonic()
    nodes = wait_for("the registry back from retained messages", lambda: len(swarm.list_nodes()) == len(swarm.nodes), 10)
    assert nodes and time.monotonic() - t0 < 5.0
    worker.join(120)
    assert result and result[0].token_ids == want
    wait_for("a route from the new coordinator", swarm.route, timeout=10)


def test_a_killed_node_goes_offline_and_its_layers_are_covered_again(swarm: Swarm) -> None:
    victim = "slow"
    lost = swarm.list_nodes()[victim]
    swarm.nodes[victim].kill()
    t0 = time.monotonic()
    swarm.observe(lambda s: victim in s.nodes and not s.nodes[victim].online, KEEPALIVE * 1.5 + 1)
    assert time.monotonic() - t0 <= KEEPALIVE * 1.5 + 1  # the Last Will, well within the keepalive interval

    def covered_without_victim() -> list[tuple[str, int, int]]:
        route = swarm.route()
        return route if victim not in [n for n, _, _ in route] else []

    wait_for("layers reassigned and covered again", covered_without_victim, timeout=60)
    state = swarm.observe(lambda s: s.current_assignment().covers(30), 10)
    assert victim not in state.current_assignment()
    assert any(r.start <= lost[0] and lost[1] <= r.end or r.start < lost[1] for _, r in state.current_assignment().items())
    # new sessions route around the dead node and still produce the right text
    out = swarm.cli("generate", "--coordinator", swarm.address, PROMPT, "--max-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_swarm_up_starts_covers_and_stops(default_model: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    up = subprocess.Popen(
        [sys.executable, "-m", "swarm_client.cli", "up", "--nodes", "2", "--threads", "1", "--model", str(default_model),
         "--ready-file", str(ready), "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for("swarm up to cover the model", ready.exists, timeout=180)
        address = ready.read_text().strip()
        out = subprocess.run(
            [sys.executable, "-m", "swarm_client.cli", "generate", "--coordinator", address, PROMPT, "--max-tokens", "4"],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0 and "Paris" in out.stdout, out.stderr
        up.send_signal(signal.SIGINT)
        text, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 0, text
    assert "the model is covered" in text and "stopping the swarm" in text
    # the default budgets split the model: 15 of the 30 layers on each node, printed
    split = sorted(re.findall(r"^node .* layers \[(\d+), (\d+)\)", text, re.MULTILINE))
    assert split == [("0", "15"), ("15", "30")], text
    assert not ready.exists()
    for log in (tmp_path / "logs").glob("node-*.log"):
        assert "stopped after draining" in log.read_text()
