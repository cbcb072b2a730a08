"""Two coordinators on one broker: the standby takes over the planning lease when the
active one is killed, and generations start through it.

Real processes: mosquitto, two ``swarm-coordinator`` daemons, one ``swarm-node`` that
joins with ``--coordinator A,B`` (serving the whole default model), and clients that
are given both addresses. The lease is watched from the broker like any coordinator
watches it (a listening registry, pinned to the swarm's coordinator key). Then a third
coordinator with a key of its own is refused: the node ignores its assignments, the
swarm's coordinators its lease. Plain, and with TLS and a token (mosquitto over TLS with
passwords and the ACL).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e.chaos import Daemon
from e2e.trust import Trust

from swarm_client.api import SwarmClient
from swarm_coordinator.broker import MosquittoBroker, find_mosquitto, free_port
from swarm_coordinator.registry import Registry, RegistryConfig
from swarm_proto.presence import Lease
from swarm_proto.presence_client import BrokerAddress
from swarm_proto.trust import Identity, mqtt_password

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


@dataclass
class Pair:
    broker: MosquittoBroker
    a: Daemon
    b: Daemon
    addresses: str
    node: Daemon
    tmp: Path
    trust: Trust
    password: str  # the coordinators' broker login ("" when the broker is open)
    others: list[Daemon]  # more coordinators started by the tests (stopped with the rest)

    @property
    def swarm_key(self) -> bytes:
        """The coordinator key every coordinator of the swarm shares, as nodes pinned it."""
        return Identity.load_or_create(self.tmp / "coord-a" / f"coordinator-{SWARM}.key").public

    def coordinator(self, name: str, model: Path, port: int) -> Daemon:
        return coordinator(name, model, port, self.broker, self.tmp, self.trust, self.password)

    def listener(self, pinned: bool = True) -> Listener:
        """A registry that watches the lease; ``pinned``: believes the swarm's key only."""
        config = RegistryConfig(self.broker.url, SWARM, "m", 30, 1, client_id="listener", token=self.trust.token,
                                coordinator_key=self.swarm_key if pinned else None)
        login = None
        if self.password:
            address = BrokerAddress.parse(self.broker.url)
            login = BrokerAddress(address.host, address.port, "coordinator", self.password, address.tls)
        client = self.trust.client
        return Listener(config, broker=login, tls_context=client.client_context() if client else None)

    def generate(self, model: Path) -> str:
        with SwarmClient.remote(coordinator=self.addresses, model=model, timeout=60, **self.trust.library()) as client:
            return client.generate(PROMPT, max_tokens=6).text


def coordinator(name: str, model: Path, port: int, broker: MosquittoBroker, tmp: Path, trust: Trust, password: str) -> Daemon:
    """A coordinator whose presence key lives in ``tmp/<name>`` (docs/security.md: the
    coordinators of one swarm share the coordinator key file)."""
    argv = [sys.executable, "-m", "swarm_coordinator.cli", "--model", str(model), "--port", str(port),
            "--http-port", "0", "--mqtt", broker.url, "--swarm-id", SWARM, "--settle", "1",
            "--coordinator-id", name, "--state-dir", str(tmp / name), *trust.flags(name)]
    env = {**trust.env, "SWARM_MQTT_PASSWORD": password}
    return Daemon(name, argv, tmp / f"{name}.log", env=env)


def watch_lease(pair: Pair, predicate: Callable[[Lease | None], bool], timeout: float) -> Lease | None:
    async def run() -> Lease | None:
        listener = pair.listener()
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


@pytest.fixture(scope="module")
def pair(default_model: Path, tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("standby")
    tls, password = trust.files("broker"), ""
    if tls is None:
        broker = MosquittoBroker()
    else:
        password = secrets.token_urlsafe(16)
        users = {"coordinator": password, "solo": mqtt_password(trust.token, SWARM, "solo")}
        broker = MosquittoBroker(users=users, tls=(tls.cert, tls.key, tls.ca))
    broker.start()
    pa, pb = free_port(), free_port()
    addresses = f"127.0.0.1:{pa},127.0.0.1:{pb}"
    node = Daemon("node", [sys.executable, "-m", "swarm_node.cli", "--coordinator", addresses, "--model",
                           str(default_model), "--port", "0", "--node-id", "solo", "--threads", "1", "--speed", "100",
                           "--memory-budget", "600M", "--max-length", "256", *trust.flags("solo")],
                  tmp / "node.log", env=trust.env)
    a = coordinator("coord-a", default_model, pa, broker, tmp, trust, password)
    b = coordinator("coord-b", default_model, pb, broker, tmp, trust, password)
    s = Pair(broker, a, b, addresses, node, tmp, trust, password, [])
    try:
        s.a.start().line()
        watch_lease(s, lambda lease: lease is not None and lease.holder == "coord-a", 30)
        # the standby gets the active coordinator's key file: nodes pinned that key
        (tmp / "coord-b").mkdir(mode=0o700)
        key = f"coordinator-{SWARM}.key"
        shutil.copy2(tmp / "coord-a" / key, tmp / "coord-b" / key)
        s.b.start().line()
        node.start()
        yield s
    finally:
        for proc in (node, s.a, s.b, *s.others):
            proc.stop()
        broker.close()


def wait_generation(pair: Pair, model: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return pair.generate(model)
        except Exception:  # no route yet while the node loads
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_standby_takes_over_within_10s_of_a_sigkill(pair: Pair, default_model: Path) -> None:
    assert "Paris" in wait_generation(pair, default_model, 240)
    before = watch_lease(pair, lambda lease: lease is not None, 5)
    assert before is not None and before.holder == "coord-a"

    pair.a.kill()
    t0 = time.monotonic()
    after = watch_lease(pair, lambda lease: lease is not None and lease.holder == "coord-b", 10)
    took = time.monotonic() - t0
    assert after is not None and after.epoch > before.epoch
    assert took < 10.0, f"takeover took {took:.1f} s"
    # the standby plans now, and generations given both addresses start through it
    assert "Paris" in pair.generate(default_model)
    deadline = time.monotonic() + 10
    while not any("holds the lease: planning" in line for line in pair.b.log.read_text().splitlines()):
        assert time.monotonic() < deadline, pair.b.tail()
        time.sleep(0.2)


def test_a_coordinator_with_another_key_is_refused(pair: Pair, default_model: Path) -> None:
    """A third coordinator whose key is its own (its state dir lacks the swarm's key
    file), on the same broker with the same login: it believes no lease sealed by
    another key, so it claims one and plans; the node refuses its assignments, the
    swarm's coordinator (and any registry pinned to the swarm's key) its lease, and the
    swarm goes on under the coordinator that holds the key."""
    stranger = pair.coordinator("coord-x", default_model, free_port())
    pair.others.append(stranger)
    stranger.start().line()
    assert Identity.load_or_create(pair.tmp / "coord-x" / f"coordinator-{SWARM}.key").public != pair.swarm_key

    def logged(daemon: Daemon, *words: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in daemon.log.read_text().splitlines():
                if all(w in line for w in words):
                    return line
            assert time.monotonic() < deadline, f"{daemon.name} never logged {words}:\n{daemon.tail()}"
            time.sleep(0.2)

    logged(stranger, "holds the lease: planning")  # it claimed a lease of its own and planned
    logged(pair.node, "dropping assign of solo", "not the coordinator")
    logged(pair.b, "dropping lease of the swarm", "not the coordinator")

    async def pinned_view() -> tuple[Lease | None, int]:
        listener = pair.listener()  # a registry pinned to the swarm's key, as the coordinators are
        await listener.start(wait=10)
        try:
            await asyncio.sleep(1.0)  # the retained lease and what follows
            return listener.lease, listener.dropped["not the coordinator"]
        finally:
            await asyncio.wait_for(listener.stop(), 15)

    lease, dropped = asyncio.run(pinned_view())
    assert lease is None or lease.holder == "coord-b"  # never the stranger's
    assert dropped >= 1  # the stranger's retained lease, refused
    # The node still serves the layers the swarm's coordinator gave it, and generations
    # given the swarm's addresses go on.
    assert "Paris" in pair.generate(default_model)
    assert "lost the lease" not in pair.b.log.read_text()  # it plans on, the only coordinator the node obeys
