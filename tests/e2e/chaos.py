"""Chaos helpers: a swarm of real processes on loopback that tests can kill, freeze and
restart, and a way to generate over it while doing so.

:class:`ChaosSwarm` runs a ``swarm-coordinator`` (embedded broker) and ``swarm-node
--coordinator`` daemons. Nodes are named; ``kill``/``freeze``/``thaw`` send signals,
``restart`` starts a killed node again under the same id (on a new port), and
``wait_nodes`` waits until the coordinator lists the named nodes serving. Generation
goes through :class:`swarm_client.routed.RoutedBackend` on token ids (tiny random
models have no tokenizer). A :class:`~e2e.trust.Trust` makes it a TLS swarm with a
token; :class:`EventWatch` follows the swarm's events on the coordinator's dashboard
(the broker of a swarm with a token admits only the swarm's own logins).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from e2e.trust import Trust

from swarm_client.failover import FailoverPolicy
from swarm_client.routed import CoordinatorRoutes, RoutedBackend
from swarm_client.verify import VerifyPolicy
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.presence import Event, EventKind
from swarm_proto.tls import TlsFiles
from swarm_proto.transport import call_metadata
from swarm_proto.wire import SamplingParams

GREEDY = SamplingParams(repetition_penalty=1.3)  # greedy; the penalty keeps a random model from looping
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)


@dataclass
class Daemon:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None  # extra environment variables (a test hook such as SWARM_TEST_LIE, a token)

    def start(self) -> Daemon:
        self.lines = []
        with self.log.open("a") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n")
            log.flush()
            env = {**os.environ, **self.env} if self.env else None
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        lines = self.lines
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: lines.extend(line.strip() for line in out), daemon=True).start()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def line(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.lines:
            if not self.alive or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)
        return self.lines[0]

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return ""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    layers: str | None = None  # "A:B" pins the node; None: the coordinator assigns
    speed: float = 100.0
    budget: str | None = None  # --memory-budget
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the node process


class ChaosSwarm:
    """A coordinator and named nodes on loopback, as processes."""

    def __init__(
        self,
        model: Path,
        tmp: Path,
        *,
        replicas: int = 1,
        swarm_id: str = "chaos",
        max_length: int = 512,
        settle: float = 0.5,
        token: str = "",
        mqtt: str = "",
        tls: bool = False,
        trust: Trust | None = None,
    ) -> None:
        """``token``: the swarm token (SWARM_TOKEN of every daemon); ``mqtt``: an external
        broker for the coordinator (``mqtt://user:pass@host:port``) instead of the embedded one;
        ``tls``: a swarm CA in ``tmp/certs`` and a certificate for every daemon and the client
        (mutual TLS on gRPC, MQTT over TLS, HTTPS). ``trust`` (the e2e fixture's) replaces
        ``token`` and ``tls``."""
        if trust is None:
            trust = Trust("plain", token=token)
            if tls:
                from swarm_proto.certs import init_ca

                init_ca(tmp / "certs")
                trust = Trust("tls", tmp / "certs", token)
        self.trust = trust
        self.token = trust.token
        self.mqtt = mqtt
        self.certs: Path | None = trust.certs
        self.client_tls: TlsFiles | None = trust.client
        self.env = trust.env if trust.token else None
        self.model = model
        self.settle = settle
        self.max_length = max_length
        self.tmp = tmp
        self.replicas = replicas
        self.swarm_id = swarm_id
        self.coordinator: Daemon | None = None
        self.address = ""
        self.http = ""
        self.mqtt_url = ""
        self.specs: dict[str, NodeSpec] = {}
        self.daemons: dict[str, Daemon] = {}

    def start(self, nodes: Sequence[NodeSpec], timeout: float = 90.0) -> ChaosSwarm:
        argv = [sys.executable, "-m", "swarm_coordinator.cli", "--model", str(self.model), "--host", "127.0.0.1",
                "--port", "0", "--http-port", "0", "--mqtt-port", "0", "--swarm-id", self.swarm_id,
                "--replicas", str(self.replicas), "--settle", str(self.settle), "--node-timeout", "4", "--log-level", "WARNING"]
        if self.mqtt:
            argv += ["--mqtt", self.mqtt]
        argv += self._tls_flags("coordinator")
        self.coordinator = Daemon("coordinator", argv, self.tmp / "coordinator.log", env=self.env).start()
        words = self.coordinator.line(timeout).split()
        self.address, self.http = words[3], words[5].removeprefix("http=")
        self.mqtt_url = words[4].removeprefix("mqtt=").replace("0.0.0.0", "127.0.0.1")
        for spec in nodes:
            self.add(spec)
        self.wait_nodes([s.name for s in nodes], timeout)
        return self

    def add(self, spec: NodeSpec) -> Daemon:
        self.specs[spec.name] = spec
        argv = [sys.executable, "-m", "swarm_node.cli", "--coordinator", self.address, "--model", str(self.model),
                "--host", "127.0.0.1", "--port", "0", "--node-id", spec.name, "--threads", "1",
                "--speed", str(spec.speed), "--max-length", str(self.max_length), "--park-timeout", "30"]
        if spec.layers:
            argv += ["--layers", spec.layers]
        if spec.budget:
            argv += ["--memory-budget", spec.budget]
        argv += self._tls_flags(spec.name)
        env = {**(self.env or {}), **dict(spec.env)} or None
        daemon = Daemon(spec.name, argv, self.tmp / f"{spec.name}.log", env=env).start()
        self.daemons[spec.name] = daemon
        return daemon

    def _tls_flags(self, name: str) -> list[str]:
        return self.trust.flags(name)

    def channel(self, address: str) -> grpc.Channel:
        """A blocking channel to a daemon of this swarm (mutual TLS when the swarm has it)."""
        return self.trust.channel(address)

    # --- chaos ------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        self.daemons[name].signal(signal.SIGKILL)

    def freeze(self, name: str) -> None:
        self.daemons[name].signal(signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        self.daemons[name].signal(signal.SIGCONT)

    def restart(self, name: str) -> None:
        """Start ``name`` again (killed first if it still runs); returns at once."""
        daemon = self.daemons[name]
        daemon.signal(signal.SIGCONT)
        daemon.kill()
        daemon.start()

    # --- what the coordinator sees ------------------------------------------------------

    def nodes(self) -> dict[str, swarm_pb2.NodeInfo]:
        with self.channel(self.address) as channel:
            stub = swarm_pb2_grpc.CoordinatorStub(channel)
            listed = stub.ListNodes(swarm_pb2.ListNodesRequest(), timeout=5, metadata=call_metadata(self.token)).nodes
        return {n.node_id: n for n in listed}

    def wait_nodes(self, names: Sequence[str], timeout: float = 60.0) -> dict[str, swarm_pb2.NodeInfo]:
        """Until every named node is listed as serving (restarted ones at their new address)."""
        deadline = time.monotonic() + timeout
        while True:
            for name in names:
                if not self.daemons[name].alive:
                    raise AssertionError(f"{name} exited:\n{self.daemons[name].tail()}")
            nodes = self.nodes()
            if all(n in nodes and nodes[n].end > nodes[n].start and nodes[n].address and self._current(n, nodes[n])
                   for n in names):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes {sorted(names)} not all serving after {timeout:g} s: {sorted(nodes)}")
            time.sleep(0.1)

    def _current(self, name: str, info: swarm_pb2.NodeInfo) -> bool:
        """The listed address is the running process's (not a killed one's, retained)."""
        try:
            with self.channel(info.address) as channel:
                got = swarm_pb2_grpc.NodeStub(channel).Info(
                    swarm_pb2.InfoRequest(), timeout=1, metadata=call_metadata(self.token)
                )
            return got.node_id == name
        except grpc.RpcError:
            return False

    @property
    def url(self) -> str:
        """The coordinator's HTTP side (the gateway: HTTPS when the swarm has TLS)."""
        return f"{self.trust.scheme}://{self.http}"

    def metrics(self) -> str:
        with self.trust.urlopen(f"{self.url}/metrics", timeout=5) as reply:
            text: str = reply.read().decode()
        return text

    def close(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        if self.coordinator is not None:
            self.coordinator.stop()

    def observer(self) -> EventWatch:
        """The swarm's events as the coordinator's dashboard shows them (async context
        manager): ``.events`` holds those seen from then on. It reads the dashboard, not
        the broker: with a swarm token the broker admits only the swarm's own logins."""
        return EventWatch(self)

    # --- generating -------------------------------------------------------------------

    def backend(self, policy: FailoverPolicy | None = None, verify: VerifyPolicy | None = None) -> RoutedBackend:
        """A client of the swarm. Spot checks are off unless ``verify`` asks: they hold
        tokens back until checked, and the chaos tests time their kills by the tokens
        the caller has received."""
        verify = verify or VerifyPolicy(rate=0.0)
        return RoutedBackend(
            CoordinatorRoutes(self.address, token=self.token, tls=self.client_tls), max_context=self.max_length,
            eos_token_ids=(), policy=policy, token=self.token, tls=self.client_tls, verify=verify,
        )


class EventWatch:
    """Polls the coordinator's ``/dashboard/state`` and keeps the events that appear
    after it started (newest last), as :class:`Event` s."""

    def __init__(self, swarm: ChaosSwarm, interval: float = 0.1) -> None:
        self.swarm = swarm
        self.interval = interval
        self.events: list[Event] = []
        self._seen: set[tuple[str, str, str, float]] = set()
        self._task: asyncio.Task[None] | None = None

    def _poll(self) -> list[dict[str, Any]]:
        with self.swarm.trust.urlopen(f"{self.swarm.url}/dashboard/state", timeout=5) as reply:
            events: list[dict[str, Any]] = json.loads(reply.read())["events"]
        return events[::-1]  # the dashboard lists the newest first

    def _take(self, listed: list[dict[str, Any]], keep: bool) -> None:
        for e in listed:
            key = (e["kind"], e["node"], e["detail"], e["ts"])
            if key not in self._seen:
                self._seen.add(key)
                if keep:
                    self.events.append(Event(EventKind(e["kind"]), e["node"], e["detail"], ts=e["ts"]))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._take(await asyncio.to_thread(self._poll), keep=True)
            except OSError:
                continue  # the coordinator may be restarting

    async def __aenter__(self) -> EventWatch:
        self._take(await asyncio.to_thread(self._poll), keep=False)  # what happened before is not ours
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def generate(
    backend: RoutedBackend,
    prompt: Sequence[int],
    params: SamplingParams,
    max_new: int,
    on_token: Callable[[int], Awaitable[None] | None] | None = None,
) -> list[int]:
    """Token ids generated over the swarm; ``on_token(i)`` runs after the i-th token."""
    out: list[int] = []
    async for t in backend.tokens(prompt, params, max_new):
        out.append(t.token_id)
        if on_token is not None:
            maybe = on_token(len(out))
            if asyncio.iscoroutine(maybe):
                await maybe
    return out


def add_tokenizer(model: Path, vocab: int = 320) -> Path:
    """Give a tiny random model a word-level tokenizer (``w0 .. w<vocab-1>``), so that
    the coordinator's HTTP gateway can start on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    core = Tokenizer(models.WordLevel(words, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(model)
    return model


def prompts(n: int, vocab: int = 320, seed: int = 7) -> list[list[int]]:
    """``n`` deterministic prompts of various lengths (3 to 60 tokens)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 60))] for _ in range(n)]
