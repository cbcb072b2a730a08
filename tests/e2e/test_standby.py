"""Two coordinators on one broker: the standby takes over the planning lease when the
active one is killed, and generations start through it.

Real processes: mosquitto, two ``swarm-coordinator`` daemons, one ``swarm-node`` that
joins with ``--coordinator A,B`` (serving the whole default model), and clients that
are given both addresses. The lease is watched from the broker like any coordinator
watches it (a listening registry).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e.chaos import Daemon

from swarm_client.api import SwarmClient
from swarm_coordinator.broker import MosquittoBroker, find_mosquitto, free_port
from swarm_coordinator.registry import Registry, RegistryConfig
from swarm_proto.presence import Lease

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (make deps-system)"),
]

SWARM = "standby"
PROMPT = "The capital of France is"


class Listener(Registry):
    """A registry that only listens (no events of its own)."""

    async def _flush(self) -> None:
        self._outbox.clear()


def watch_lease(url: str, predicate: Callable[[Lease | None], bool], timeout: float) -> Lease | None:
    async def run() -> Lease | None:
        listener = Listener(RegistryConfig(url, SWARM, "m", 30, 1, client_id="listener"))
        await listener.start(wait=timeout)
        try:
            deadline = time.monotonic() + timeout
            while not predicate(listener.lease):
                if time.monotonic() > deadline:
                    raise AssertionError(f"lease still {listener.lease!r} after {timeout:g} s")
                seen = listener.lease_seen
                await asyncio.wait([asyncio.ensure_future(seen.wait())], timeout=0.2)
            return listener.lease
        finally:
            await asyncio.wait_for(listener.stop(), 15)

    return asyncio.run(run())


@dataclass
class Pair:
    broker: MosquittoBroker
    a: Daemon
    b: Daemon
    addresses: str
    node: Daemon


def coordinator(name: str, model: Path, port: int, broker: str, tmp: Path) -> Daemon:
    argv = [sys.executable, "-m", "swarm_coordinator.cli", "--model", str(model), "--port", str(port),
            "--http-port", "0", "--mqtt", broker, "--swarm-id", SWARM, "--settle", "1", "--coordinator-id", name]
    return Daemon(name, argv, tmp / f"{name}.log")


@pytest.fixture(scope="module")
def pair(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("standby")
    broker = MosquittoBroker()
    broker.start()
    pa, pb = free_port(), free_port()
    a = coordinator("coord-a", default_model, pa, broker.url, tmp)
    b = coordinator("coord-b", default_model, pb, broker.url, tmp)
    addresses = f"127.0.0.1:{pa},127.0.0.1:{pb}"
    node = Daemon("node", [sys.executable, "-m", "swarm_node.cli", "--coordinator", addresses, "--model",
                           str(default_model), "--port", "0", "--node-id", "solo", "--threads", "1", "--speed", "100",
                           "--memory-budget", "600M", "--max-length", "256"], tmp / "node.log")
    try:
        a.start().line()
        watch_lease(broker.url, lambda lease: lease is not None and lease.holder == "coord-a", 30)
        b.start().line()
        node.start()
        yield Pair(broker, a, b, addresses, node)
    finally:
        for proc in (node, a, b):
            proc.stop()
        broker.close()


def generate(addresses: str, model: Path) -> str:
    with SwarmClient.remote(coordinator=addresses, model=model, timeout=60) as client:
        return client.generate(PROMPT, max_tokens=6).text


def wait_generation(addresses: str, model: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return generate(addresses, model)
        except Exception:  # no route yet while the node loads
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_standby_takes_over_within_10s_of_a_sigkill(pair: Pair, default_model: Path) -> None:
    assert "Paris" in wait_generation(pair.addresses, default_model, 240)
    before = watch_lease(pair.broker.url, lambda lease: lease is not None, 5)
    assert before is not None and before.holder == "coord-a"

    pair.a.kill()
    t0 = time.monotonic()
    after = watch_lease(pair.broker.url, lambda lease: lease is not None and lease.holder == "coord-b", 10)
    took = time.monotonic() - t0
    assert after is not None and after.epoch > before.epoch
    assert took < 10.0, f"takeover took {took:.1f} s"
    # the standby plans now, and generations given both addresses start through it
    assert "Paris" in generate(pair.addresses, default_model)
    deadline = time.monotonic() + 10
    while not any("holds the lease: planning" in line for line in pair.b.log.read_text().splitlines()):
        assert time.monotonic() < deadline, pair.b.tail()
        time.sleep(0.2)
