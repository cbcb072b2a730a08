"""MQTT brokers for the control plane: embedded in-process (amqtt) or a mosquitto process.

The coordinator embeds :class:`EmbeddedBroker` by default; ``--mqtt mqtt://host:port``
points it at an external broker instead. :class:`MosquittoBroker` runs Debian's
``mosquitto`` as a child process on loopback (tests, local swarms); install it with
``make deps-system``.

Neither broker persists retained messages: after a broker restart the nodes and the
coordinator re-announce themselves (see :class:`swarm_proto.presence.ReconnectingClient`).

Access: with a swarm token the embedded broker refuses anonymous clients. The
coordinator logs in as ``coordinator`` with a random password made at start (never
written anywhere); a node logs in with its node id as user name and
``swarm_proto.trust.mqtt_password(token, swarm id, node id)`` as password, and may
publish only its own ``node/<id>/status|load`` and ``events``, and subscribe to and
receive only its own ``assign/<id>``. Without a token the broker stays open (the
coordinator warns). :class:`MosquittoBroker` takes a password file and an ACL file
(:func:`mosquitto_password_line`, :data:`MOSQUITTO_ACL`) to apply the same rules.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from swarm_coordinator.errors import BrokerError
from swarm_proto.daemon import Service
from swarm_proto.trust import mqtt_password

log = logging.getLogger(__name__)

__all__ = [
    "ADMIN_USER",
    "MOSQUITTO_ACL",
    "EmbeddedBroker",
    "MosquittoBroker",
    "SwarmAuthPlugin",
    "find_mosquitto",
    "free_port",
    "mosquitto_password_line",
]

ADMIN_USER = "coordinator"

# mosquitto ACLs with the same rules as the embedded broker (%u: the user name = node id).
MOSQUITTO_ACL = """\
user coordinator
topic readwrite swarm/#

pattern write swarm/+/node/%u/status
pattern write swarm/+/node/%u/load
pattern write swarm/+/events
pattern read swarm/+/assign/%u
"""


def mosquitto_password_line(user: str, password: str, iterations: int = 101) -> str:
    """One line of a mosquitto 2 password file (``$7$``: PBKDF2-SHA512), made without
    ``mosquitto_passwd``."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"{user}:$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def _node_may(user: str, swarm_id: str, topic: str, action: Action) -> bool:
    prefix = f"swarm/{swarm_id}/"
    if action is Action.PUBLISH:
        return topic in (f"{prefix}node/{user}/status", f"{prefix}node/{user}/load", f"{prefix}events")
    return topic == f"{prefix}assign/{user}"  # subscribe / receive: its own assignment only


class SwarmAuthPlugin(BaseAuthPlugin):
    """amqtt authentication: the coordinator's random password, or a node's password
    derived from the swarm token; anonymous clients only when ``allow_anonymous``."""

    @dataclass
    class Config:
        swarm_id: str = "default"
        token: str = field(default="", repr=False)
        admin_password: str = field(default="", repr=False)
        allow_anonymous: bool = False

    async def authenticate(self, *, session: Session) -> bool | None:
        cfg = self.context.config
        assert isinstance(cfg, SwarmAuthPlugin.Config)
        user, password = session.username, session.password or ""
        if not user:
            return cfg.allow_anonymous
        if user == ADMIN_USER:
            return bool(cfg.admin_password) and hmac.compare_digest(password, cfg.admin_password)
        if not cfg.token or len(user) > 128:
            return cfg.allow_anonymous
        return hmac.compare_digest(password, mqtt_password(cfg.token, cfg.swarm_id, user))


def _swarm_broker_class() -> type[Any]:
    """amqtt's Broker with the topic rules applied inline.

    Not as an amqtt topic plugin: amqtt awaits plugins through ``asyncio.gather`` while
    it iterates its subscriptions to deliver a message, so a client subscribing at that
    moment breaks delivery for good ("dictionary changed size during iteration"). The
    rule below is decided without suspending, as amqtt does when no plugin is loaded."""
    from amqtt.broker import Broker

    class SwarmBroker(Broker):  # type: ignore[misc]
        swarm_id = "default"
        restricted = False  # a token is set: nodes keep to their own topics

        async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
            user = session.username if session is not None else None
            if not self.restricted or not user or user == ADMIN_USER:
                return True  # anonymous clients exist only when the swarm is open
            return _node_may(user, self.swarm_id, topic, action)

    return SwarmBroker


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

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        swarm_id: str = "default",
        token: str = "",
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.swarm_id = swarm_id
        self.token = token
        self.tls = tls  # (cert, key, ca) files: listen with TLS only
        self.admin_password = secrets.token_urlsafe(24)  # the coordinator's login; lives in memory only
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.tls is not None:
            cert, key, ca = self.tls
            listener.update(ssl=True, certfile=cert, keyfile=key, cafile=ca)
        auth = {"swarm_id": self.swarm_id, "token": self.token, "admin_password": self.admin_password,
                "allow_anonymous": not self.token}
        return {
            "listeners": {"default": listener},
            # only our plugins: amqtt's defaults add $SYS topics and packet logs
            "plugins": {f"{__name__}.SwarmAuthPlugin": auth},
        }

    async def start(self) -> None:
        from amqtt.errors import AMQTTError

        if self._broker is not None:
            return
        broker = _swarm_broker_class()(self._config())
        broker.swarm_id, broker.restricted = self.swarm_id, bool(self.token)
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

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        executable: str | None = None,
        users: dict[str, str] | None = None,
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        """``users`` (name -> password): refuse anonymous clients and apply
        :data:`MOSQUITTO_ACL` (the ``coordinator`` user may do anything). ``tls``: (cert,
        key, ca) files: listen with TLS only (``mqtts://``); clients are not asked for a
        certificate (they log in with ``users``)."""
        self.host = host
        self.port = port or free_port(host)
        self.users = users
        self.tls = tls
        self.executable = executable or find_mosquitto()
        self._dir = tempfile.TemporaryDirectory(prefix="swarm-mosquitto-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

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
        access = "allow_anonymous true\n"
        if self.users is not None:
            passwd, acl = Path(self._dir.name) / "passwd", Path(self._dir.name) / "acl"
            passwd.write_text("".join(mosquitto_password_line(u, p) + "\n" for u, p in self.users.items()))
            acl.write_text(MOSQUITTO_ACL)
            access = f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
        listener = f"listener {self.port} {self.host}\n"
        if self.tls is not None:
            # copies in the broker's own folder: mosquitto drops to its user, who must read the key
            folder = Path(self._dir.name)
            for source, name in zip(self.tls, ("server.pem", "server.key", "ca.pem")):
                shutil.copyfile(source, folder / name)
                os.chmod(folder / name, 0o600)
            listener += f"certfile {folder / 'server.pem'}\nkeyfile {folder / 'server.key'}\ncafile {folder / 'ca.pem'}\n"
        conf.write_text(
            listener
            + access
            + "persistence false\n"
            "sys_interval 1\n"  # $SYS counters each second (the scale bench reads messages/s)
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self._hand_to_mosquitto_user()
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

    def _hand_to_mosquitto_user(self) -> None:
        """Started as root, mosquitto drops to the ``mosquitto`` user: give it its files
        (the password file above all) instead of making them readable by everyone."""
        if os.geteuid() != 0:
            return
        try:
            account = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        folder = Path(self._dir.name)
        for path in (folder, *folder.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)

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
