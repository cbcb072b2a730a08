"""Backoff for things that failed: one mechanism for the client and the coordinator.

A :class:`Backoff` holds, per key (a node's address for a client, its id for the
coordinator), how often it failed and until when it is avoided: the first failure
avoids it ``initial`` seconds, each repeated one twice as long, up to ``maximum``; a
key quiet for ``forget_after`` seconds starts again from one. The map is bounded
(``capacity`` keys, the stalest dropped first), since keys come from reports that
callers send.

Only failures go in: a node that refused for capacity ("busy", a RESOURCE_EXHAUSTED
with a retry hint) is healthy and is never recorded here (see docs/failover.md).

Invariants: ``avoided(now)`` holds exactly the keys whose last failure's backoff has
not run out at ``now``; ``count(key)`` is 0 for a key never recorded or forgotten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass
class _Entry:
    count: int
    last: float
    until: float


class Backoff:
    """Keys avoided for a doubling backoff after each failure (``now`` defaults to the monotonic clock)."""

    def __init__(
        self, initial: float = 2.0, maximum: float = 60.0, forget_after: float = 300.0, capacity: int = 4096
    ) -> None:
        if initial <= 0 or maximum < initial or forget_after <= 0 or capacity <= 0:
            raise ValueError("backoff needs 0 < initial <= maximum, forget_after > 0 and capacity > 0")
        self.initial, self.maximum, self.forget_after, self.capacity = initial, maximum, forget_after, capacity
        self._entries: dict[str, _Entry] = {}

    def record(self, key: str, now: float | None = None) -> float:
        """Count a failure of ``key``; returns how long it is now avoided."""
        now = time.monotonic() if now is None else now
        entry = self._entries.pop(key, None)
        count = 1 if entry is None or now - entry.last > self.forget_after else entry.count + 1
        backoff = min(self.maximum, self.initial * 2.0 ** (count - 1))
        while len(self._entries) >= self.capacity:
            del self._entries[next(iter(self._entries))]  # insertion order: the stalest first
        self._entries[key] = _Entry(count, now, now + backoff)
        return backoff

    def avoided(self, now: float | None = None) -> set[str]:
        """The keys avoided at ``now`` (forgetting those quiet for ``forget_after``)."""
        now = time.monotonic() if now is None else now
        for key in [k for k, e in self._entries.items() if now - e.last > self.forget_after]:
            del self._entries[key]
        return {k for k, e in self._entries.items() if e.until > now}

    def count(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.count if entry is not None else 0

    def __len__(self) -> int:
        return len(self._entries)
