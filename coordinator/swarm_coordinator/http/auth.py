"""API keys and per-key rate limits for the HTTP gateway.

Keys come from ``--api-key`` (repeatable) and/or a keys file; with no keys at all the
gateway is open. A keys file holds one key per line, optionally followed by its own
limits; blank lines and ``#`` comments are ignored::

    # key                     limits (0 or absent: the server's defaults)
    sk-team-a                 rpm=60 tpm=20000
    sk-batch-jobs             tpm=0        # 0 here too: the server's default
    sk-dashboard

Limits are token buckets refilled continuously: ``rpm`` requests and ``tpm`` tokens
(prompt + completion) per minute, both with a burst of one minute's worth. A request
is admitted when a request is in the bucket and the token bucket is not in deficit;
its tokens are charged as they are known (the prompt at the start, the completion at
the end), so one long generation can overdraw the bucket and the next request waits
for it to refill. A refused request gets 429 with ``Retry-After`` (whole seconds).
Without keys, everyone shares the bucket of the anonymous caller.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ANONYMOUS", "ApiKeys", "Caller", "KeyLimits", "RateLimiter", "Refusal", "extract_key", "parse_keys_file"]


@dataclass(frozen=True)
class KeyLimits:
    """Per-minute limits; 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    def __post_init__(self) -> None:
        if self.requests_per_minute < 0 or self.tokens_per_minute < 0:
            raise ValueError("rate limits must be >= 0 (0 = unlimited)")

    def or_default(self, default: KeyLimits) -> KeyLimits:
        return KeyLimits(
            self.requests_per_minute or default.requests_per_minute,
            self.tokens_per_minute or default.tokens_per_minute,
        )


@dataclass(frozen=True)
class Caller:
    """Who made a request: ``name`` is safe to show (a key's short fingerprint)."""

    name: str
    limits: KeyLimits


ANONYMOUS = "anonymous"


def _fingerprint(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_keys_file(text: str, *, source: str = "keys file") -> dict[str, KeyLimits]:
    """Parse the keys file format (see the module docstring)."""
    keys: dict[str, KeyLimits] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, *opts = line.split()
        limits: dict[str, int] = {}
        for opt in opts:
            name, sep, value = opt.partition("=")
            if not sep or name not in ("rpm", "tpm"):
                raise ValueError(f"{source}:{lineno}: expected rpm=N or tpm=N, got {opt!r}")
            try:
                limits[name] = int(value)
            except ValueError:
                raise ValueError(f"{source}:{lineno}: {name} must be an integer, got {value!r}") from None
        try:
            keys[key] = KeyLimits(limits.get("rpm", 0), limits.get("tpm", 0))
        except ValueError as exc:
            raise ValueError(f"{source}:{lineno}: {exc}") from None
    return keys


class ApiKeys:
    """The accepted keys and their limits. Empty: authentication is off."""

    def __init__(self, keys: Mapping[str, KeyLimits] | Iterable[str] = (), *, default: KeyLimits = KeyLimits()) -> None:
        items = keys.items() if isinstance(keys, Mapping) else ((k, KeyLimits()) for k in keys)
        self.default = default
        # Looked up by digest, so the comparison time does not depend on the key's bytes.
        self._by_digest: dict[bytes, Caller] = {}
        for key, limits in items:
            if not key or any(c.isspace() for c in key):
                raise ValueError("an API key must be non-empty and without spaces")
            self._by_digest[self._digest(key)] = Caller(_fingerprint(key), limits.or_default(default))

    @classmethod
    def load(
        cls, keys: Iterable[str] = (), keys_file: str | os.PathLike[str] | None = None, *, default: KeyLimits = KeyLimits()
    ) -> ApiKeys:
        table: dict[str, KeyLimits] = {k: KeyLimits() for k in keys}
        if keys_file is not None:
            path = Path(keys_file)
            table.update(parse_keys_file(path.read_text(), source=str(path)))
        return cls(table, default=default)

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, key: str | None) -> Caller | None:
        """The caller for ``key``; None when keys are required and this one is not valid."""
        if not self.enabled:
            return Caller(ANONYMOUS, self.default)
        if not key:
            return None
        digest = self._digest(key)
        for known, caller in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return caller
        return None


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The key of a request: ``Authorization: Bearer KEY`` (what OpenAI clients send),
    or ``api-key`` / ``x-api-key``."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or headers.get("api-key") or None


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted and when to come back."""

    kind: str  # "requests" or "tokens" (OpenAI's error type for rate limits)
    limit: int
    retry_after_s: float

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class _Bucket:
    __slots__ = ("capacity", "rate", "level", "updated")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, level: float) -> float:
        return max(0.0, (level - self.level) / self.rate)


class RateLimiter:
    """Token buckets per caller; thread-safe, no background task."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def _bucket(self, table: dict[str, _Bucket], name: str, per_minute: int, now: float) -> _Bucket:
        bucket = table.get(name)
        if bucket is None or bucket.capacity != per_minute:
            bucket = table[name] = _Bucket(per_minute, now)
        bucket.refill(now)
        return bucket

    def admit(self, caller: Caller) -> Refusal | None:
        """Take one request from the caller's bucket, or say why not."""
        limits = caller.limits
        with self._lock:
            now = self._clock()
            req = tok = None
            if limits.requests_per_minute:
                req = self._bucket(self._requests, caller.name, limits.requests_per_minute, now)
                if req.level < 1.0:
                    return Refusal("requests", limits.requests_per_minute, req.wait_for(1.0))
            if limits.tokens_per_minute:
                tok = self._bucket(self._tokens, caller.name, limits.tokens_per_minute, now)
                if tok.level <= 0.0:
                    return Refusal("tokens", limits.tokens_per_minute, max(tok.wait_for(0.0), 1e-3))
            if req is not None:
                req.level -= 1.0
            return None

    def charge(self, caller: Caller, tokens: int) -> None:
        """Count ``tokens`` against the caller's token budget (may overdraw it)."""
        limits = caller.limits
        if not limits.tokens_per_minute or tokens <= 0:
            return
        with self._lock:
            bucket = self._bucket(self._tokens, caller.name, limits.tokens_per_minute, self._clock())
            bucket.level -= tokens

    def remaining(self, caller: Caller) -> tuple[int | None, int | None]:
        """(requests, tokens) left now; None where unlimited."""
        limits = caller.limits
        with self._lock:
            now = self._clock()
            r = t = None
            if limits.requests_per_minute:
                r = int(self._bucket(self._requests, caller.name, limits.requests_per_minute, now).level)
            if limits.tokens_per_minute:
                t = max(0, int(self._bucket(self._tokens, caller.name, limits.tokens_per_minute, now).level))
            return r, t
