"""MQTT brokers for the control plane: embedded in-process (amqtt) or a mosquitto process.

The coordinator embeds :class:`EmbeddedBroker` by default; ``--mqtt mqtt://host:port``
points it at an external broker instead. :class:`MosquittoBroker` runs Debian's
``mosquitto`` as a child process on loopback (tests, local swarms); install it with
``make deps-system``.

Neither broker persists retained messages: after a broker restart the nodes and the
coordinator re-announce themselves (see :class:`swarm_proto.presence.ReconnectingClient`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from swarm_coordinator.errors import BrokerError
from swarm_proto.daemon import Service

log = logging.getLogger(__name__)

__all__ = ["EmbeddedBroker", "MosquittoBroker", "find_mosquitto", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for brokers asked to bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker(Service):
    """An amqtt broker in this process's event loop; ``port=0`` picks a free port.

    ::

        async with EmbeddedBroker("127.0.0.1", 0) as broker:
            ...  # connect to broker.url
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # only anonymous auth: amqtt's default plugins add $SYS topics and packet logs
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    async def start(self) -> None:
        from amqtt.broker import Broker
        from amqtt.errors import AMQTTError

        if self._broker is not None:
            return
        broker = Broker(self._config())
        try:
            await broker.start()
        except (AMQTTError, OSError) as exc:
            raise BrokerError(f"embedded MQTT broker could not listen on {self.host}:{self.port}: {exc}") from exc
        self._broker = broker
        log.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("embedded MQTT broker on %s stopped", self.url)



def find_mosquitto() -> str | None:
    """Path of the mosquitto executable, or ``None`` (install: ``make deps-system``)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


class MosquittoBroker:
    """A mosquitto process on ``host:port`` with a throw-away config (no persistence).

    Usable as a sync or async context manager; :meth:`kill` stops it abruptly and
    :meth:`start` may be called again to restart it on the same port.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, executable: str | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.executable = executable or find_mosquitto()
        self._dir = tempfile.TemporaryDirectory(prefix="swarm-mosquitto-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self._dir.name) / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        if self.executable is None:
            raise BrokerError("mosquitto is not installed (make deps-system, or apt-get install mosquitto)")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "sys_interval 1\n"  # $SYS counters each second (the scale bench reads messages/s)
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}: {self._log_tail()}")
            time.sleep(0.02)
        log.info("mosquitto (pid %d) listening on %s", self._proc.pid, self.url)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-500:].strip() or "no log"
        except OSError:
            return "no log"

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing its clients' sessions cleanly."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> MosquittoBroker:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)
