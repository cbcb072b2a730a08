"""``swarm up``: a whole swarm on this machine, as processes, with one command.

It starts a coordinator (with its embedded MQTT broker) and ``N`` nodes that join it
with ``--coordinator``, waits until the model is covered (the coordinator hands out
a route), prints the endpoints and the split (which node hosts which layers) and
waits. Ctrl-C (or SIGTERM) stops the nodes (they drain), then the coordinator. If the
coordinator dies, everything stops.

Unless ``--memory-budget`` says otherwise, each node's budget is room for
``ceil(replicas * L / N)`` of the model's ``L`` layers (:func:`split_budget`), so the
model is split across the nodes, each layer held ``replicas`` times: one machine
shows what a swarm of machines does.

``--tls`` makes a swarm CA and a certificate for the coordinator, each node and a
client in ``<log dir>/certs`` (:mod:`swarm_proto.certs`), and a swarm token (kept from
``$SWARM_TOKEN``, or made and written to ``certs/token``, mode 0600): mutual TLS on
gRPC, MQTT over TLS, HTTPS, and signed presence admitted by the token.

The daemons are the same ``swarm-coordinator`` and ``swarm-node`` programs one runs
by hand, started as ``python -m`` with the same interpreter: this module imports
neither package (the client sits below the coordinator, and the node package needs
torch), only ``swarm_proto``. Their logs go to files in ``--log-dir`` (a temporary
folder by default).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.model_args import DTYPE_BYTES, read_args
from swarm_proto.store import resolve_model
from swarm_proto.tls import TlsFiles
from swarm_proto.transport import call_metadata
from swarm_proto.weight_format import compute_dtypes, format_layer_bytes, resolve

log = logging.getLogger(__name__)

__all__ = ["LocalSwarm", "UpConfig", "run", "split_budget"]


@dataclass(frozen=True)
class UpConfig:
    nodes: int = 3
    model: str = ""  # path or known name; "" = the default model
    host: str = "127.0.0.1"
    port: int = 0  # coordinator gRPC; 0 picks one
    http_port: int = 0
    mqtt_port: int = 0
    swarm_id: str = "local"
    threads: int = 0  # torch threads per node; 0 = cores / nodes
    memory_budget: str = ""  # per node, e.g. 1G; "" = split_budget(): the model split across the nodes
    dtype: str = "auto"  # the nodes' (auto: their default); nodes report their own bytes per layer
    replicas: int = 1  # copies of each layer
    timeout: float = 300.0  # seconds to wait for the model to be covered
    log_dir: str = ""
    ready_file: str = ""  # written with the coordinator's HOST:PORT once covered
    extra_node_args: tuple[str, ...] = field(default_factory=tuple)
    tls: bool = False  # a swarm CA, certificates and a token for everything started here

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("--nodes must be at least 1")
        if not 1 <= self.replicas <= self.nodes:
            raise ValueError(f"--replicas must be between 1 and --nodes ({self.nodes}), not {self.replicas}")
        if self.dtype != "auto" and self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r} (one of auto, {', '.join(DTYPE_BYTES)})")


def split_budget(num_layers: int, per_layer: int, nodes: int, replicas: int = 1) -> int:
    """Bytes of weights per node such that ``nodes`` nodes hold each of ``num_layers``
    layers ``replicas`` times and no fewer nodes can: room for
    ``ceil(replicas * num_layers / nodes)`` layers (at least one)."""
    layers = max(1, -(-replicas * num_layers // nodes))
    return layers * per_layer


class _Proc:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True, env=env
        )
        self.first_line = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    def _read(self) -> None:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        for line in out:
            if not self.first_line:
                self.first_line = line.strip()
                self._ready.set()
        self._ready.set()

    def wait_line(self, timeout: float) -> str:
        self._ready.wait(timeout)
        if not self.first_line:
            raise RuntimeError(f"{self.name} did not start (exit {self.proc.poll()}); log: {self.log_path}\n{self.tail()}")
        return self.first_line

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class LocalSwarm:
    """The processes of one ``swarm up``; ``start()`` returns once the model is covered."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="swarm-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.coordinator: _Proc | None = None
        self.nodes: list[_Proc] = []
        self.address = ""
        self.mqtt_url = ""
        self.http = ""
        self.cancel = threading.Event()  # set by Ctrl-C: stop waiting, start() raises
        self.certs: Path | None = None  # with --tls: the CA and certificates
        self.client_tls: TlsFiles | None = None
        self.token = os.environ.get("SWARM_TOKEN", "")
        self._env: dict[str, str] | None = None  # the daemons' environment when it differs from ours

    def _setup_tls(self) -> None:
        from swarm_proto.certs import init_ca, issue

        self.certs = self.log_dir / "certs"
        init_ca(self.certs)
        got = issue(self.certs, "client")
        self.client_tls = TlsFiles(str(got.cert), str(got.key), str(got.ca))
        if not self.token:
            self.token = secrets.token_urlsafe(24)
            path = self.certs / "token"
            path.touch(mode=0o600)
            path.write_text(self.token + "\n")
        self._env = {**os.environ, "SWARM_TOKEN": self.token}

    def _tls_args(self, name: str) -> list[str]:
        if self.certs is None:
            return []
        from swarm_proto.certs import issue

        got = issue(self.certs, name)
        return ["--tls-cert", str(got.cert), "--tls-key", str(got.key), "--tls-ca", str(got.ca)]

    def _channel(self) -> grpc.Channel:
        if self.client_tls is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.client_tls.channel_credentials())

    def start(self) -> None:
        cfg = self.config
        if importlib.util.find_spec("torch") is None:
            raise RuntimeError('the nodes need torch, which the base install leaves out: pip install "llama-swarm[node]"')
        py = sys.executable
        if cfg.tls:
            self._setup_tls()
        model = ["--model", cfg.model] if cfg.model else []
        budget = ["--memory-budget", cfg.memory_budget or str(self.node_budget())]
        self.coordinator = _Proc(
            "coordinator",
            [py, "-m", "swarm_coordinator.cli", *model, "--host", cfg.host, "--port", str(cfg.port),
             "--http-port", str(cfg.http_port), "--mqtt-port", str(cfg.mqtt_port), "--swarm-id", cfg.swarm_id,
             "--replicas", str(cfg.replicas), "--dtype", "bfloat16" if cfg.dtype == "auto" else cfg.dtype,
             *self._tls_args("coordinator")],
            self.log_dir / "coordinator.log",
            self._env,
        )
        line = self.coordinator.wait_line(60)
        # "swarm-coordinator listening on HOST:PORT mqtt=URL http=ADDR|off"
        words = line.split()
        self.address = words[3]
        self.mqtt_url = words[4].removeprefix("mqtt=")
        self.http = words[5].removeprefix("http=")
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nodes)
        for i in range(cfg.nodes):
            self.nodes.append(
                _Proc(
                    f"node-{i}",
                    [py, "-m", "swarm_node.cli", "--coordinator", self.address, *model, "--host", cfg.host,
                     "--port", "0", "--node-id", f"{cfg.swarm_id}-node-{i}", "--threads", str(threads),
                     "--dtype", cfg.dtype, *budget, *cfg.extra_node_args, *self._tls_args(f"{cfg.swarm_id}-node-{i}")],
                    self.log_dir / f"node-{i}.log",
                    self._env,
                )
            )
        self._wait_covered(cfg.timeout)
        if cfg.ready_file:
            Path(cfg.ready_file).write_text(self.address + "\n")

    def node_budget(self) -> int:
        """Each node's memory budget when none is given: the model split across them."""
        cfg = self.config
        path = resolve_model(cfg.model or None)
        args = read_args(path)
        # what a layer costs the nodes in their weight format (nodes on this machine: its CPU)
        fmt = resolve("auto", path, cfg.dtype, "cpu")
        per_layer = format_layer_bytes(args, compute_dtypes(cfg.dtype, fmt, "cpu")[1], fmt, path)
        return split_budget(args.num_layers, per_layer, cfg.nodes, cfg.replicas)

    def _wait_covered(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._channel() as channel:
            stub = swarm_pb2_grpc.CoordinatorStub(channel)
            while True:
                self._check_alive()
                if self.cancel.is_set():
                    raise KeyboardInterrupt
                try:
                    stub.GetRoute(swarm_pb2.RouteRequest(max_length=1), timeout=5, metadata=call_metadata(self.token))
                    return
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the model is not covered after {timeout:g} s: {exc.details()}") from exc  # type: ignore[attr-defined]
                time.sleep(0.3)

    def _check_alive(self) -> None:
        assert self.coordinator is not None
        for proc in [self.coordinator, *self.nodes]:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}; log {proc.log_path}:\n{proc.tail()}")

    def list_nodes(self) -> list[swarm_pb2.NodeInfo]:
        with self._channel() as channel:
            stub = swarm_pb2_grpc.CoordinatorStub(channel)
            return list(stub.ListNodes(swarm_pb2.ListNodesRequest(), timeout=5, metadata=call_metadata(self.token)).nodes)

    def describe(self) -> str:
        lines = [
            f"coordinator  {self.address}   (swarm generate --coordinator {self.address} \"...\")",
            f"mqtt broker  {self.mqtt_url}",
            f"http         {('https://' if self.certs else 'http://') + self.http if self.http != 'off' else 'off'}",
        ]
        if self.certs is not None and self.client_tls is not None:
            token = f"SWARM_TOKEN=$(cat {self.certs / 'token'})" if (self.certs / "token").exists() else "SWARM_TOKEN=..."
            lines.append(
                f"tls          {token} swarm generate --coordinator {self.address} --tls-cert {self.client_tls.cert}"
                f" --tls-key {self.client_tls.key} --tls-ca {self.client_tls.ca} \"...\""
            )
        nodes = sorted(self.list_nodes(), key=lambda n: (n.start, n.end, n.node_id))
        lines.append(f"split        the model's layers over {len(nodes)} node(s):")
        for n in nodes:
            lines.append(f"node         {n.address or '(loading)':<17} layers [{n.start}, {n.end})   {n.node_id} on {n.device}")
        lines.append(f"logs         {self.log_dir}")
        return "\n".join(lines)

    def wait(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set or the coordinator dies."""
        assert self.coordinator is not None
        while not stop.wait(0.5):
            if not self.coordinator.alive:
                log.error("the coordinator exited:\n%s", self.coordinator.tail())
                return
            for node in self.nodes:
                if not node.alive and node.proc.returncode not in (None, 0):
                    log.warning("%s exited with %s (log %s)", node.name, node.proc.returncode, node.log_path)
                    node.proc.returncode = 0  # report once

    def stop(self, timeout: float = 15.0) -> None:
        """Nodes first (they drain and say goodbye), then the coordinator."""
        for node in self.nodes:
            node.signal(signal.SIGTERM)
        for node in self.nodes:
            node.wait(timeout)
        if self.coordinator is not None:
            self.coordinator.signal(signal.SIGTERM)
            self.coordinator.wait(timeout)
        for proc in [*self.nodes, *([self.coordinator] if self.coordinator else [])]:
            proc.close()


def run(config: UpConfig, out: IO[str] = sys.stdout) -> int:
    """``swarm up``: start, print the endpoints, wait for Ctrl-C, stop everything."""
    swarm = LocalSwarm(config)
    stop = swarm.cancel
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        out.write(f"starting a coordinator and {config.nodes} node(s); logs in {swarm.log_dir}\n")
        out.flush()
        try:
            swarm.start()
        except KeyboardInterrupt:
            return 130
        out.write(swarm.describe() + "\nthe model is covered; Ctrl-C stops the swarm\n")
        out.flush()
        swarm.wait(stop)
        return 0 if stop.is_set() else 1
    finally:
        out.write("stopping the swarm\n")
        out.flush()
        swarm.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if config.ready_file:
            Path(config.ready_file).unlink(missing_ok=True)


