"""Helpers of the gateway and dashboard end-to-end tests: real processes on 127.0.0.1,
plain or with mutual TLS and a swarm token (:class:`~e2e.trust.Trust`)."""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.trust import Trust
from prometheus_client.parser import text_string_to_metric_families

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def script(name: str) -> list[str]:
    """The console script ``name`` of this venv, or ``python -m`` its module."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return [str(path)]
    module = {"swarm-node": "swarm_node.cli", "swarm": "swarm_client.cli", "swarm-coordinator": "swarm_coordinator.cli"}
    return [sys.executable, "-m", module[name]]


@dataclass
class Proc:
    """A daemon process whose stdout lines are collected by a thread."""

    proc: subprocess.Popen[str]
    log: Path
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(cls, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Proc:
        proc = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env={**os.environ, **(env or {})}
        )
        self = cls(proc, log)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, marker: str, timeout: float = 120.0) -> str:
        """The first stdout line containing ``marker`` (after it, the rest of the line)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if marker in line:
                        return line.split(marker, 1)[1].strip()
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    break
                self._cond.wait(min(left, 0.5))
        raise AssertionError(f"no {marker!r} from {self.proc.args}:\n{self.log.read_text()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@functools.cache
def local_cli(model: Path, prompt: str, *args: str) -> str:
    """What ``swarm generate --local`` prints (without the newline it ends with);
    remembered, as the plain and TLS passes of a module compare with the same text."""
    done = subprocess.run(
        script("swarm") + ["generate", "--local", "--model", str(model), prompt, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    return done.stdout[:-1]


@dataclass
class Swarm:
    """A coordinator (with its gateway) and nodes that joined it, all real processes."""

    coordinator: Proc
    address: str  # gRPC host:port of the coordinator
    url: str  # http://host:port of its gateway
    nodes: dict[str, Proc]
    node_metrics: dict[str, str]  # node id -> its /metrics URL
    key: str = ""  # an API key of the gateway, when it has keys (the dashboard needs one then)
    trust: Trust = field(default_factory=Trust)

    @property
    def ssl(self) -> ssl.SSLContext | None:
        """What an HTTPS caller of the gateway needs (None when plain)."""
        return self.trust.ssl_context()

    def openai(self, key: str, url: str = "", **kwargs: Any) -> Any:
        """An OpenAI client of the gateway (or of the gateway at ``url``)."""
        return self.trust.openai((url or self.url) + "/v1", key, **kwargs)

    def async_openai(self, key: str, url: str = "", **kwargs: Any) -> Any:
        return self.trust.async_openai((url or self.url) + "/v1", key, **kwargs)

    def metrics(self, key: str = "", url: str = "") -> Samples:
        """The gateway's /metrics, parsed."""
        return scrape((url or self.url) + "/metrics", key, context=self.ssl)

    def state(self) -> Any:
        """One dashboard snapshot."""
        return get_json(self.url + "/dashboard/state", self.key, context=self.ssl)

    def wait(self, predicate: Any, timeout: float = 120.0, what: str = "the swarm") -> Any:
        """Poll ``/dashboard/state`` until ``predicate(state)`` is true; returns that state."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            try:
                state = self.state()
                if predicate(state):
                    return state
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; last state: {state and state['nodes']}")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.coordinator.stop()


def ready(n: int) -> Any:
    """Predicate: ``n`` nodes ready and every layer served."""

    def check(state: Any) -> bool:
        return sum(1 for x in state["nodes"] if x["state"] == "ready") >= n and not state["uncovered"] and bool(state["coverage"])

    return check


def start_swarm(
    model: Path,
    n_nodes: int,
    logs: Path,
    *,
    coordinator_args: Sequence[str] = (),
    node_args: Sequence[str] = (),
    node_timeout: float = 3.0,
    key: str = "",
    coordinator_env: dict[str, str] | None = None,
    trust: Trust | None = None,
) -> Swarm:
    """``swarm-coordinator`` with its gateway on a free port, and ``n_nodes`` nodes (one
    torch thread each, metrics on) that join it; returns once the model is covered.
    ``trust``: plain (the default), or TLS and a token for every daemon."""
    trust = trust or Trust()
    coord = Proc.start(
        script("swarm-coordinator")
        + ["--model", str(model), "--port", "0", "--http-port", "0", "--mqtt-port", "0"]
        + ["--node-timeout", str(node_timeout), *coordinator_args, *trust.flags("coordinator")],
        logs / "coordinator.log",
        env={**trust.env, **(coordinator_env or {})},
    )
    nodes: dict[str, Proc] = {}
    try:
        line = coord.wait_line("swarm-coordinator listening on")
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        address, url = line.split()[0], f"{trust.scheme}://{fields['http']}"
        for i in range(n_nodes):
            node_id = f"node-{i}"
            nodes[node_id] = Proc.start(
                script("swarm-node")
                + ["--coordinator", address, "--model", str(model), "--port", "0", "--threads", "1"]
                + ["--node-id", node_id, "--metrics-port", "0", *node_args, *trust.flags(node_id)],
                logs / f"{node_id}.log",
                env=trust.env,
            )
        metrics = {node_id: proc.wait_line("metrics on") for node_id, proc in nodes.items()}
        swarm = Swarm(coord, address, url, nodes, metrics, key, trust)
        swarm.wait(ready(n_nodes), timeout=240, what=f"{n_nodes} nodes covering the model")
        return swarm
    except BaseException:
        for proc in nodes.values():
            proc.kill()
        coord.kill()
        raise


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, key: str = "", *, context: ssl.SSLContext | None = None) -> Samples:
    """Fetch a Prometheus endpoint (with an API key when the gateway has keys; ``context``
    for HTTPS) and parse it with the official text parser."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10, context=context) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def get_json(url: str, key: str = "", *, context: ssl.SSLContext | None = None) -> Any:
    import json

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10, context=context) as resp:
        return json.loads(resp.read())
