"""Signed presence: node and coordinator keys, sealed MQTT payloads, and who to believe.

Every control-plane message is *sealed*: the publisher signs (Ed25519) the topic, the
payload of :mod:`swarm_proto.presence`, its public key, a proof of membership, a
per-connection nonce and a counter. A receiver opens the seal (:func:`open_sealed`)
and asks a :class:`PresenceGuard` whether to believe it. The guard holds these
invariants, whatever broker carries the messages (even a shared one):

- a node's status, load and events count only when sealed by an *admitted* key: one
  whose proof is ``HMAC(swarm token, key)`` (:func:`membership_proof`) or that is on
  the allow-list; with neither a token nor an allow-list the swarm is open and any key
  is admitted (the operator was warned at start);
- a node id belongs to the first admitted key seen for it; another key claiming it is
  refused, so nobody can speak (or say "offline") for a node they do not hold the key of;
- counters only grow per (node, topic kind): a replayed or reordered-older message is
  dropped. The one exception is the offline Last Will, which the broker publishes on
  the node's behalf long after it was sealed: it counts once, and only when it carries
  the node's *current* connection nonce (an old connection's Will cannot be replayed);
- assignments count only when sealed by the coordinator key the receiver pinned
  (from ``GetSwarmInfo``, or the first one seen);
- the coordinator lease (several coordinators, one planning) counts only when sealed
  by the coordinator key; the coordinators of one swarm share that key, so the nodes'
  pinned key stays right after a standby takes over;
- empty retained payloads (MQTT's "delete") are never believed: only the coordinator
  forgets a node, and it does so in its own memory. The one exception is the lease,
  whose deletion (its holder's Will) only frees it for the coordinators to claim;
- the number of node ids the guard tracks is bounded (``max_nodes``).

Every drop is counted by reason in :attr:`PresenceGuard.dropped` (the coordinator
exports them as ``swarm_presence_dropped_total{reason}``). This module does no I/O
except :meth:`Identity.load_or_create` reading or writing one key file.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm_proto.presence import (
    NodeState,
    NodeStatus,
    Payload,
    PayloadError,
    TopicKind,
    Topics,
    decode,
)

log = logging.getLogger(__name__)

__all__ = [
    "Identity",
    "PresenceGuard",
    "Seal",
    "Sealer",
    "decode_sealed",
    "key_path",
    "membership_proof",
    "mqtt_password",
    "open_sealed",
    "parse_key",
    "read_allowed_keys",
]

KEY_BYTES: Final = 32
MAX_COUNTER: Final = 2**63 - 1
_SIG_CONTEXT: Final = b"llama-swarm presence v1\x00"
_MAX_ENVELOPE: Final = 256 * 1024  # a load with 32 sessions is ~3 KB; anything far bigger is not ours


class Identity:
    """An Ed25519 key pair: a node's or the coordinator's identity on the control plane."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public: bytes = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """The key in ``path`` (PEM, PKCS#8), made there (mode 0600) on first use."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise PayloadError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = identity._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process just made
        except FileExistsError:
            return cls.load_or_create(path)
        finally:
            tmp.unlink()
        log.info("made a new presence key in %s (public %s)", path, identity.public.hex())
        return identity

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    @property
    def public_hex(self) -> str:
        return self.public.hex()


def key_path(state_dir: str, name: str) -> Path:
    """Where the key called ``name`` lives: ``state_dir``, else ``<cache>/state``."""
    from swarm_proto.store import cache_dir

    return (Path(state_dir).expanduser() if state_dir else cache_dir() / "state") / f"{name}.key"


def read_allowed_keys(path: str) -> frozenset[bytes]:
    """An allow-list file: one hex public key a line; ``#`` starts a comment."""
    if not path:
        return frozenset()
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return frozenset(parse_key(line) for line in lines if line)


def parse_key(text: str) -> bytes:
    """A public key as written in an allow-list: 64 hex digits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise PayloadError(f"not a hex public key: {text.strip()[:80]!r}") from None
    if len(key) != KEY_BYTES:
        raise PayloadError(f"a public key has {KEY_BYTES} bytes, got {len(key)}")
    return key


def membership_proof(token: str, swarm_id: str, key: bytes) -> bytes:
    """``HMAC-SHA256(token, swarm id + key)``: proves the key's holder knows the swarm token
    without sending the token (empty when the swarm has none)."""
    if not token:
        return b""
    return hmac.new(token.encode(), b"llama-swarm member\x00" + swarm_id.encode() + b"\x00" + key, hashlib.sha256).digest()


def mqtt_password(token: str, swarm_id: str, username: str) -> str:
    """The broker password of ``username`` in a swarm whose token is ``token``."""
    mac = hmac.new(token.encode(), b"llama-swarm mqtt\x00" + swarm_id.encode() + b"\x00" + username.encode(), hashlib.sha256)
    return mac.hexdigest()


@dataclass(frozen=True)
class Seal:
    """Who sealed a message, and when (in its own sequence)."""

    key: bytes
    proof: bytes
    conn: bytes  # random per MQTT connection of the sealer
    counter: int
    will: bool  # sealed ahead of time as the connection's Last Will


class Sealer:
    """Seals the messages of one publisher: one counter sequence, one nonce per connection.

    Counters are microseconds since the epoch, forced to grow, so a restarted publisher
    (same key, fresh process) continues above its old messages without keeping state.
    """

    def __init__(self, identity: Identity, proof: bytes = b"") -> None:
        self.identity = identity
        self.proof = proof
        self.conn = secrets.token_bytes(8)
        self._last = 0

    def new_connection(self) -> None:
        self.conn = secrets.token_bytes(8)

    def _next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last

    def seal(self, topic: str, body: bytes, *, will: bool = False) -> bytes:
        signed: bytes = msgpack.packb(
            {
                "topic": topic,
                "key": self.identity.public,
                "proof": self.proof,
                "conn": self.conn,
                "n": self._next(),
                "will": will,
                "body": body,
            },
            use_bin_type=True,
        )
        packed: bytes = msgpack.packb(
            {"v": 1, "sealed": signed, "sig": self.identity.sign(_SIG_CONTEXT + signed)}, use_bin_type=True
        )
        return packed


def open_sealed(topic: str, data: bytes) -> tuple[bytes, Seal | None]:
    """``(payload bytes, seal)``; an unsealed payload comes back with ``None``. A seal
    that does not verify, or was made for another topic, raises :class:`PayloadError`."""
    if not data or len(data) > _MAX_ENVELOPE:
        if data:
            raise PayloadError(f"{topic}: payload of {len(data)} bytes is too large")
        return data, None
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException):
        return data, None  # presence.decode reports it
    if not isinstance(outer, dict) or "sealed" not in outer:
        return data, None
    signed, sig = outer.get("sealed"), outer.get("sig")
    if not isinstance(signed, bytes) or not isinstance(sig, bytes):
        raise PayloadError(f"{topic}: malformed seal")
    try:
        inner = msgpack.unpackb(signed, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise PayloadError(f"{topic}: malformed seal ({exc})") from exc
    if not isinstance(inner, dict):
        raise PayloadError(f"{topic}: malformed seal")
    key, proof, conn, n = inner.get("key"), inner.get("proof"), inner.get("conn"), inner.get("n")
    body, will, sealed_topic = inner.get("body"), inner.get("will"), inner.get("topic")
    if not (
        isinstance(key, bytes) and len(key) == KEY_BYTES and isinstance(proof, bytes) and len(proof) <= 64
        and isinstance(conn, bytes) and len(conn) <= 32 and type(n) is int and 0 < n <= MAX_COUNTER
        and isinstance(body, bytes) and isinstance(will, bool)
    ):
        raise PayloadError(f"{topic}: malformed or out-of-range seal fields")
    if sealed_topic != topic:
        raise PayloadError(f"{topic}: sealed for another topic {str(sealed_topic)[:200]!r}")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, _SIG_CONTEXT + signed)
    except (InvalidSignature, ValueError):
        raise PayloadError(f"{topic}: bad signature") from None
    return body, Seal(key, proof, conn, n, will)


def decode_sealed(topics: Topics, topic: str, data: bytes) -> tuple[TopicKind, str | None, Payload | None, Seal | None]:
    """:func:`swarm_proto.presence.decode` behind a seal: ``(kind, node id, payload, seal)``."""
    topics.parse(topic)  # a foreign topic is refused before any crypto
    body, seal = open_sealed(topic, data)
    kind, node_id, payload = decode(topics, topic, body)
    return kind, node_id, payload, seal


class PresenceGuard:
    """Decides which sealed control-plane messages to believe (see the module docstring).

    ``coordinator_key``: whose assignments to believe (``None``: the first sealed one
    seen is pinned). ``own_key``: the receiver's own key (the coordinator believes its own
    events and assignments). ``require_seal=False`` lets unsealed messages through
    (observers of an old swarm; never the coordinator).
    """

    def __init__(
        self,
        swarm_id: str,
        *,
        token: str = "",
        allowed_keys: frozenset[bytes] = frozenset(),
        coordinator_key: bytes | None = None,
        own_key: bytes | None = None,
        require_seal: bool = True,
        max_nodes: int = 4096,
    ) -> None:
        self.swarm_id = swarm_id
        self.token = token
        self.allowed_keys = allowed_keys
        self.coordinator_key = coordinator_key
        self.own_key = own_key
        self.require_seal = require_seal
        self.max_nodes = max_nodes
        self.node_keys: dict[str, bytes] = {}  # node id -> its pinned key
        self._keys: set[bytes] = set()  # every pinned node key (for events)
        self._last: dict[tuple[bytes, str], int] = {}  # (key, topic kind or node id) -> last counter
        self._conn: dict[str, bytes] = {}  # node id -> nonce of its current connection
        self._will_used: dict[str, bytes] = {}  # node id -> the connection whose Will counted
        self.dropped: Counter[str] = Counter()

    @property
    def open(self) -> bool:
        """No token and no allow-list: any key may join (the operator was warned)."""
        return not self.token and not self.allowed_keys

    def admitted(self, key: bytes, proof: bytes) -> bool:
        if key in self.allowed_keys:
            return True
        if self.token:
            return hmac.compare_digest(proof, membership_proof(self.token, self.swarm_id, key))
        return self.open

    def _drop(self, reason: str, what: str) -> bool:
        self.dropped[reason] += 1
        log.warning("dropping %s: %s", what, reason)
        return False

    def check(self, kind: TopicKind, node_id: str | None, payload: Payload | None, seal: Seal | None) -> bool:
        """Whether to believe one decoded message; counts and logs what it refuses."""
        what = f"{kind.value} of {node_id or 'the swarm'}"
        if kind is TopicKind.LEASE:
            return self._check_lease(payload, seal, what)
        if payload is None:
            return self._drop("empty", what)
        if seal is None:
            return True if not self.require_seal else self._drop("unsigned", what)
        if kind is TopicKind.ASSIGN:
            return self._check_assign(seal, what)
        if kind is TopicKind.EVENTS:
            if seal.key not in self._keys and seal.key not in (self.own_key, self.coordinator_key):
                return self._drop("unknown key", what)
            return self._fresh(seal, "events", what)
        assert node_id is not None
        return self._check_node(kind, node_id, payload, seal, what)

    def _check_assign(self, seal: Seal, what: str) -> bool:
        if self.coordinator_key is None:
            if not self.admitted(seal.key, seal.proof):
                return self._drop("unknown key", what)
            self.coordinator_key = seal.key  # trust on first use
            log.info("pinned the coordinator key %s", seal.key.hex())
        if seal.key != self.coordinator_key:
            return self._drop("not the coordinator", what)
        return self._fresh(seal, what, what)

    def _check_lease(self, payload: Payload | None, seal: Seal | None, what: str) -> bool:
        if payload is None:
            return True  # the holder's Will or release: it only frees the lease (lease.py)
        if seal is None:
            return True if not self.require_seal else self._drop("unsigned", what)
        known = seal.key in (self.coordinator_key, self.own_key)
        if not known and (self.coordinator_key is not None or not self.admitted(seal.key, seal.proof)):
            return self._drop("not the coordinator", what)
        return True  # no counter order: claimants race, the broker orders them, lease.py goes by epoch

    def _check_node(self, kind: TopicKind, node_id: str, payload: Payload, seal: Seal, what: str) -> bool:
        pinned = self.node_keys.get(node_id)
        if pinned is None:
            if kind is not TopicKind.STATUS:
                return self._drop("unknown node", what)
            if not self.admitted(seal.key, seal.proof):
                return self._drop("not admitted", what)
            if len(self.node_keys) >= self.max_nodes:
                return self._drop("too many nodes", what)
            self.node_keys[node_id] = seal.key
            self._keys.add(seal.key)
        elif pinned != seal.key:
            return self._drop("key mismatch", what)
        slot = f"{kind.value}/{node_id}"
        if kind is TopicKind.STATUS and seal.will:
            offline = isinstance(payload, NodeStatus) and payload.state is NodeState.OFFLINE
            if not offline:
                return self._drop("will that is not offline", what)
            current = self._conn.get(node_id)
            stale = self._will_used.get(node_id) == seal.conn or (current is not None and current != seal.conn)
            if stale and seal.counter <= self._last.get((seal.key, slot), 0):
                return self._drop("replayed", what)
            self._will_used[node_id] = seal.conn
            self._last[(seal.key, slot)] = max(self._last.get((seal.key, slot), 0), seal.counter)
            return True
        if not self._fresh(seal, slot, what):
            return False
        if kind is TopicKind.STATUS:
            self._conn[node_id] = seal.conn
        return True

    def _fresh(self, seal: Seal, slot: str, what: str) -> bool:
        last = self._last.get((seal.key, slot), 0)
        if seal.counter == last:
            return False  # the same message again (a retained copy, a QoS 1 duplicate)
        if seal.counter < last:
            return self._drop("replayed", what)
        self._last[(seal.key, slot)] = seal.counter
        return True

    def forget(self, node_id: str) -> None:
        """Release a node id (the coordinator removed the node): another key may take it."""
        key = self.node_keys.pop(node_id, None)
        self._conn.pop(node_id, None)
        if key is not None and key not in self.node_keys.values():
            self._keys.discard(key)
        self._will_used.pop(node_id, None)
        for kind in (TopicKind.STATUS, TopicKind.LOAD):
            if key is not None:
                self._last.pop((key, f"{kind.value}/{node_id}"), None)
