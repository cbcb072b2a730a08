"""Helpers of the gateway and dashboard end-to-end tests: real processes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from swarm_client.remote import Hop, RouteSession
from swarm_client.types import SampledToken
from swarm_node.sampler import SamplingParams

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


def local_cli(model: Path, prompt: str, *args: str) -> str:
    """What ``swarm generate --local`` prints (without the newline it ends with)."""
    done = subprocess.run(
        script("swarm") + ["generate", "--local", "--model", str(model), prompt, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    return done.stdout[:-1]


class StaticRoute:
    """An ``AsyncTokenSource`` over a fixed route of nodes (no coordinator, no failover)."""

    def __init__(self, hops: Sequence[Hop], *, max_context: int, eos_token_ids: Sequence[int]) -> None:
        self.hops = tuple(hops)
        self._max_context = max_context
        self._eos = tuple(eos_token_ids)

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    async def tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> AsyncIterator[SampledToken]:
        length = len(prompt_ids) + max_new_tokens
        async with RouteSession(self.hops, max_length=length, sampling=params, prompt_length=len(prompt_ids)) as s:
            out = await s.prefill(list(prompt_ids))
            for i in range(max_new_tokens):
                assert out.token is not None
                yield SampledToken(out.token, out.logprob)
                if i + 1 == max_new_tokens:
                    break
                out = await s.decode(out.token)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Fetch a Prometheus endpoint and parse it with the official text parser."""
    with urllib.request.urlopen(url, timeout=10) as resp:
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


def get_json(url: str) -> Any:
    import json

    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())
