"""The WAN test bed: every party in its own network namespace, every link delayed.

:class:`WanBed` builds, as root on Linux:

- a bridge ``lswb<pid>`` with address ``10.<k>.0.1/24`` in the root namespace;
- one namespace per party (``lsw-<pid>-<name>``: the broker, the coordinator, each
  node, the client), each with a veth pair to the bridge and its own address
  ``10.<k>.0.<10+i>``;
- one delaying relay process (:mod:`relay`) that listens on each server's advertised
  ``IP:7001`` inside its namespace and forwards to the server's real ``IP:7000``,
  holding every chunk for the link's one-way delay (both directions);
- mosquitto in the broker's namespace, ``swarm-coordinator --mqtt`` on it, and
  ``swarm-node`` daemons that advertise their relay address (``--advertise``).

So every connection between two parties (client -> head, node -> successor, tail ->
client's Results stream, anyone -> broker or coordinator) crosses one relayed link, and
no process knows it is delayed. This kernel has no ``netem``, hence the relay.

Nothing leaks: names carry the creating process's pid; :meth:`WanBed.close` (also
registered with ``atexit``) kills the processes and deletes the namespaces and the
bridge; :func:`clean_stale` removes what a crashed run (a dead pid) left behind and runs
before every new bed.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

HERE = Path(__file__).resolve().parent
REAL_PORT = 7000  # what each server binds (its namespace's address)
RELAY_PORT = 7001  # what each server advertises (the relay, inside its namespace)
PREFIX = "lsw"


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _kill_netns_pids(ns: str) -> None:
    got = _ip("netns", "pids", ns, check=False)
    for word in got.stdout.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def clean_stale() -> list[str]:
    """Delete the namespaces, bridges and veths of beds whose creator is dead."""
    removed: list[str] = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-.+", name)
        if m and not _alive(int(m.group(1))):
            _kill_netns_pids(name)
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"\d+: ({PREFIX}[bv](\d+)[^:@]*)", line)
        if m and not _alive(int(m.group(2))):
            _ip("link", "delete", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


@dataclass
class Party:
    name: str
    ns: str
    ip: str
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None

    @property
    def address(self) -> str:
        """Where others reach this party's server: its relay."""
        return f"{self.ip}:{RELAY_PORT}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:]) if self.log else ""
        except OSError:
            return ""


class WanBed:
    """Namespaces, a bridge and the relay; :meth:`spawn` runs a process in a party's
    namespace. Use as a context manager, or call :meth:`close`."""

    def __init__(self, names: Sequence[str], tmp: Path, *, delay: float = 0.0,
                 delays: Mapping[tuple[str, str], float] | None = None) -> None:
        self.pid = os.getpid()
        self.tmp = tmp
        self.delay = delay
        self.delays = dict(delays or {})  # (client party, server party) -> one-way seconds
        k = 100 + self.pid % 150
        self.bridge = f"{PREFIX}b{self.pid}"
        self.bridge_ip = f"10.{k}.0.1"
        self.parties = {n: Party(n, f"{PREFIX}-{self.pid}-{n}", f"10.{k}.0.{10 + i}") for i, n in enumerate(names)}
        self.relay: subprocess.Popen[str] | None = None
        self._procs: list[subprocess.Popen[str]] = []
        self._built = False

    def __enter__(self) -> Self:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- building ---------------------------------------------------------------------

    def build(self) -> WanBed:
        if os.geteuid() != 0:
            raise RuntimeError("the WAN bed needs root (network namespaces)")
        clean_stale()
        atexit.register(self.close)
        self._built = True
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, party in enumerate(self.parties.values()):
            host_end, inner = f"{PREFIX}v{self.pid}x{i}", f"{PREFIX}v{self.pid}y{i}"
            _ip("netns", "add", party.ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", party.ns)
            _ip("-n", party.ns, "link", "set", inner, "name", "eth0")
            _ip("-n", party.ns, "addr", "add", f"{party.ip}/24", "dev", "eth0")
            _ip("-n", party.ns, "link", "set", "eth0", "up")
            _ip("-n", party.ns, "link", "set", "lo", "up")
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
        return self

    def _relay_delays(self) -> dict[str, float]:
        return {f"{self.parties[src].ip}|{dst}": d for (src, dst), d in self.delays.items()}

    def set_delay(self, delay: float, delays: Mapping[tuple[str, str], float] | None = None) -> None:
        """Change the links' delays while everything runs (the relay rereads them)."""
        assert self.relay is not None and self.relay.stdout is not None
        self.delay, self.delays = delay, dict(delays or {})
        path = self.tmp / "relay.json"
        config = json.loads(path.read_text())
        config.update(delays=self._relay_delays(), default_delay=delay)
        path.write_text(json.dumps(config))
        self.relay.send_signal(signal.SIGHUP)
        if "relay reloaded" not in self.relay.stdout.readline():
            raise RuntimeError("the relay did not reload its delays")

    def start_relay(self, servers: Sequence[str], real_ports: Mapping[str, int] | None = None) -> None:
        """Relay listeners for the named server parties (their advertised addresses)."""
        real_ports = real_ports or {}
        delays = self._relay_delays()
        config = {
            "listeners": [
                {"netns": self.parties[s].ns, "ip": self.parties[s].ip, "port": RELAY_PORT,
                 "real_port": real_ports.get(s, REAL_PORT), "name": s}
                for s in servers
            ],
            "delays": delays,
            "default_delay": self.delay,
        }
        path = self.tmp / "relay.json"
        path.write_text(json.dumps(config))
        log = (self.tmp / "relay.log").open("a")
        self.relay = subprocess.Popen([sys.executable, str(HERE / "relay.py"), str(path)], stdout=subprocess.PIPE,
                                      stderr=log, text=True)
        self._procs.append(self.relay)
        assert self.relay.stdout is not None
        line = self.relay.stdout.readline()
        if "relay ready" not in line:
            raise RuntimeError(f"the relay did not start: {(self.tmp / 'relay.log').read_text()[-2000:]}")

    def one_way(self, src: str, dst: str) -> float:
        return self.delays.get((src, dst), self.delay)

    # --- processes --------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], *, log_name: str | None = None,
              stdout: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
        """Run ``argv`` in party ``name``'s namespace (``ip netns exec`` execs it: the pid
        is the program's)."""
        party = self.parties[name]
        party.log = self.tmp / f"{log_name or name}.log"
        with party.log.open("a") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", party.ns, *argv], stdout=stdout, stderr=log, text=True)
        party.proc = proc
        self._procs.append(proc)
        return proc

    def start_broker(self, name: str = "broker") -> None:
        party = self.parties[name]
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(f"listener {REAL_PORT} {party.ip}\nallow_anonymous true\npersistence false\n")
        exe = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "mosquitto"
        self.spawn(name, [exe, "-c", str(conf)], stdout=subprocess.DEVNULL)

    def start_coordinator(self, model: Path, *, name: str = "coordinator", broker: str = "broker",
                          extra: Sequence[str] = ()) -> str:
        party = self.parties[name]
        argv = [sys.executable, "-m", "swarm_coordinator.cli", "--model", str(model), "--host", party.ip,
                "--port", str(REAL_PORT), "--http-port", "0", "--mqtt", f"mqtt://{self.parties[broker].address}",
                "--swarm-id", "wan", "--settle", "0.5", "--node-timeout", "6", "--log-level", "WARNING", *extra]
        proc = self.spawn(name, argv)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"coordinator did not start: {party.tail()}")
        return party.address

    def start_node(self, name: str, model: Path, layers: str, *, coordinator: str = "coordinator",
                   extra: Sequence[str] = ()) -> subprocess.Popen[str]:
        party = self.parties[name]
        argv = [sys.executable, "-m", "swarm_node.cli", "--coordinator", self.parties[coordinator].address,
                "--model", str(model), "--host", party.ip, "--port", str(REAL_PORT), "--advertise", party.address,
                "--node-id", name, "--layers", layers, "--threads", "1", "--log-level", "WARNING", *extra]
        return self.spawn(name, argv, stdout=subprocess.DEVNULL)

    def kill(self, name: str) -> None:
        proc = self.parties[name].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)

    # --- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()
        if self._built:
            for party in self.parties.values():
                _kill_netns_pids(party.ns)
                _ip("netns", "delete", party.ns, check=False)
            for i in range(len(self.parties)):
                _ip("link", "delete", f"{PREFIX}v{self.pid}x{i}", check=False)
            _ip("link", "delete", self.bridge, check=False)
            self._built = False
