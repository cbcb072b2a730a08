"""Resumable sessions: what a node keeps so that a failover replays only into the
replacement span of a route (docs/failover.md).

A session opened with ``resumable`` keeps, besides its KV cache, the token history and
(unless the node is the tail) the activations it sent on. When the session fails --
its successor died, its upstream went away, or a resume took it over -- the node
*parks* that state under the session id for ``park_timeout`` seconds instead of
freeing it. A later ``OpenSession{resume}`` with the same id and the same layers
adopts it.

An adopted cache is trusted only as far as the new upstream confirms it: the client
replays the history from position 0 as ``replay`` steps, and a node skips a replay
step (sends on the activations it kept instead of computing) only when the step
continues what is already confirmed, its positions are in the cache and its tokens
equal the ones recorded for them. Anything else is computed as usual (a rewind), so a
stale or foreign cache can cost time but never change a token.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

import torch

from swarm_node.convert import StepIn
from swarm_node.engine.kv_cache import KVCache
from swarm_node.session import NodeSession

__all__ = ["Held", "ParkingLot", "can_skip", "confirm", "new_outputs"]


@dataclass
class Held:
    """The state of a failed resumable session, waiting for a resume."""

    start: int
    end: int
    cache: KVCache
    history: list[int]
    outputs: torch.Tensor | None
    valid: int
    until: float
    capability: str = field(default="", repr=False)  # the session's secret: a resume must present it

    def adopt_into(self, session: NodeSession) -> None:
        session.history = self.history
        session.outputs = self.outputs
        session.valid = session.kept = self.valid
        session.verified = 0


class ParkingLot:
    """Held sessions by id, oldest dropped first beyond ``capacity``."""

    def __init__(self, timeout: float, capacity: int) -> None:
        self.timeout = timeout
        self.capacity = capacity
        self._held: dict[str, Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    @property
    def nbytes(self) -> int:
        return sum(h.cache.nbytes + (h.outputs.nbytes if h.outputs is not None else 0) for h in self._held.values())

    def park(self, session: NodeSession, now: float | None = None) -> bool:
        """Keep ``session``'s state; False when there is nothing worth keeping."""
        if not session.spec.resumable or session.valid == 0:
            return False
        now = time.monotonic() if now is None else now
        self._held.pop(session.sid, None)
        while len(self._held) >= self.capacity:
            del self._held[next(iter(self._held))]
        spec = session.spec
        self._held[session.sid] = Held(
            spec.start, spec.end, session.cache, session.history, session.outputs, session.valid, now + self.timeout,
            spec.capability,
        )
        return True

    def may_take(self, session_id: str, capability: str) -> bool:
        """False when ``session_id`` is held and ``capability`` is not its own."""
        held = self._held.get(session_id)
        return held is None or hmac.compare_digest(held.capability.encode(), capability.encode())

    def take(self, session_id: str, start: int, end: int, max_length: int, capability: str = "") -> Held | None:
        """The held state of ``session_id`` if it fits a session on [start, end) and
        ``capability`` is the session's (anyone else gets None and the state stays held)."""
        held = self._held.get(session_id)
        if held is None or not hmac.compare_digest(held.capability.encode(), capability.encode()):
            return None
        del self._held[session_id]
        if (held.start, held.end) != (start, end) or held.cache.max_length < max_length:
            return None
        return held

    def drop_oldest(self) -> bool:
        """Let go of the oldest held session (to make room for a live one); False if none."""
        if not self._held:
            return False
        del self._held[next(iter(self._held))]
        return True

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        gone = [sid for sid, h in self._held.items() if h.until <= now]
        for sid in gone:
            del self._held[sid]
        return len(gone)


def new_outputs(session: NodeSession, hidden_size: int) -> None:
    """Give a fresh resumable non-tail session its buffer of sent-on activations."""
    if session.spec.resumable and not session.model.is_tail:
        # CPU, where the scheduler leaves each step's output; pages are touched lazily.
        session.outputs = torch.empty((session.spec.max_length, hidden_size), dtype=session.model.dtype)


def can_skip(session: NodeSession, step: StepIn) -> bool:
    """Whether ``step`` (a replay) is already cached here, with the same tokens."""
    s, e = step.start_pos, step.start_pos + step.length
    if not step.replay or step.sample or step.return_logits:
        return False
    if s > session.verified or e > session.valid or e > session.cache.length:
        return False
    if not session.model.is_tail and session.outputs is None:
        return False
    return session.history[s:e] == step.tokens.tolist()


def confirm(session: NodeSession, step: StepIn, hidden: torch.Tensor | None) -> None:
    """Record a computed step: its activations (when kept) and how far the state agrees."""
    s, e = step.start_pos, step.start_pos + step.length
    if session.outputs is not None and hidden is not None:
        session.outputs[s:e] = hidden
    session.valid = e
    session.verified = e
