"""Admission: whether a node has room for one more session, from its KV memory.

A session on layers ``[start, end)`` with max length ``S`` reserves
``kv_bytes(layers, S)`` = ``(end - start) * 2 * kv_heads * head_dim * element size``
bytes per position, times ``S`` rounded up to the KV pool's slot step (64). A node
admits a session when the reservations of its open sessions, of the sessions still
waiting for their cache ("opening") and of the parked caches (kept for a resume) plus
the new one fit its KV budget, and the count of those sessions, parked ones included,
stays under ``max_sessions`` (a bound on streams, tasks and caches, not the capacity). Parked caches give way first: the oldest are
dropped to make room before a live session is refused.

A refusal is "busy", not a failure: it carries a retry hint, the time in which a
session is expected to end here (the mean lifetime of recent sessions divided by
how many are open), so that callers wait about that long instead of blaming the node.

Invariants: ``reserved`` is the sum of the live reservations; a session id is
reserved at most once; ``free_bytes`` never goes negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Admission", "Busy", "kv_bytes", "slot_length"]

SLOT_STEP = 64  # the KV pool rounds slot lengths up to this (swarm_node.kv_cache)


def slot_length(max_length: int) -> int:
    """Positions a session of ``max_length`` holds in the pool."""
    return max(1, math.ceil(max_length / SLOT_STEP)) * SLOT_STEP


def kv_bytes(layers: int, max_length: int, *, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of keys and values a session holds for ``layers`` layers."""
    return layers * 2 * num_kv_heads * head_dim * element_size * slot_length(max_length)


@dataclass(frozen=True)
class Busy:
    """A refusal for capacity, with the hint of when to try again."""

    message: str
    retry_after_s: float


class Admission:
    """Reservations of KV memory by session id (open and opening sessions)."""

    MIN_RETRY_S = 0.1
    MAX_RETRY_S = 5.0

    def __init__(self, budget_bytes: int, max_sessions: int) -> None:
        if budget_bytes <= 0 or max_sessions <= 0:
            raise ValueError("the KV budget and max_sessions must be positive")
        self.budget_bytes = budget_bytes
        self.max_sessions = max_sessions
        self._reserved: dict[str, int] = {}
        self._opening: set[str] = set()
        self.reserved = 0
        self._lifetime_s: float | None = None  # moving average of how long sessions stay

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._reserved

    @property
    def sessions(self) -> int:
        return len(self._reserved)

    @property
    def opening(self) -> int:
        return len(self._opening)

    def free_bytes(self, parked_bytes: int = 0) -> int:
        return max(0, self.budget_bytes - self.reserved - parked_bytes)

    @property
    def free_sessions(self) -> int:
        return max(0, self.max_sessions - len(self._reserved))

    def refusal(self, nbytes: int, parked_bytes: int = 0, parked: int = 0) -> Busy | None:
        """Why a session needing ``nbytes`` cannot be admitted now (None: it can);
        ``parked`` caches count against ``max_sessions`` like open sessions."""
        n, opening = len(self._reserved), len(self._opening)
        state = f"{n - opening} open, {opening} waiting for their KV cache" + (f", {parked} parked" if parked else "")
        if nbytes > self.budget_bytes:
            # Can never fit: busy would be a lie; the caller must ask for less.
            raise ValueError(
                f"a session needing {nbytes / 1e6:.1f} MB of KV cache exceeds this node's "
                f"KV budget of {self.budget_bytes / 1e6:.1f} MB"
            )
        if n + parked >= self.max_sessions:
            return Busy(f"busy: {state} (at most {self.max_sessions})", self.retry_after_s())
        if self.reserved + parked_bytes + nbytes > self.budget_bytes:
            return Busy(
                f"busy: {state}; KV {self.reserved / 1e6:.1f} MB reserved of {self.budget_bytes / 1e6:.1f} MB, "
                f"this session needs {nbytes / 1e6:.1f} MB",
                self.retry_after_s(),
            )
        return None

    def reserve(self, session_id: str, nbytes: int) -> None:
        """Hold ``nbytes`` for ``session_id`` (call after :meth:`refusal` said None); it is
        opening until :meth:`opened`."""
        assert session_id not in self._reserved, session_id
        self._reserved[session_id] = nbytes
        self._opening.add(session_id)
        self.reserved += nbytes

    def opened(self, session_id: str) -> None:
        self._opening.discard(session_id)

    def release(self, session_id: str, lifetime_s: float | None = None) -> None:
        nbytes = self._reserved.pop(session_id, None)
        self._opening.discard(session_id)
        if nbytes is not None:
            self.reserved -= nbytes
        if lifetime_s is not None and lifetime_s >= 0:
            old = self._lifetime_s
            self._lifetime_s = lifetime_s if old is None else 0.8 * old + 0.2 * lifetime_s

    def retry_after_s(self) -> float:
        """When a session is expected to end here: the mean lifetime over the open count."""
        if self._lifetime_s is None:
            return 1.0
        per_end = self._lifetime_s / max(1, len(self._reserved))
        return min(self.MAX_RETRY_S, max(self.MIN_RETRY_S, per_end))
