"""The gateway's line: generations waiting for room in the swarm, fair across API keys.

A generation enters through :meth:`FairQueue.enter`. While the swarm has room (no
generation was refused "busy" since the last one got in) and nobody waits, it goes
straight on. Otherwise it waits in line: FIFO within an API key, round robin over the
keys that wait, so one key's burst does not starve the others. A generation that the
swarm refuses busy comes back through :meth:`FairQueue.again` and waits at its place
(by arrival), at the front.

Turns are handed out when room is likely: a started generation that ends
(:meth:`finished`) lets the next one try; a waiter that got in (:meth:`started`) lets
the next one try too (there may be more room); and the head of the line tries by
itself after the swarm's retry hint (at most ``probe_s``), since room can also come
from clients this gateway does not see. A generation refused right after it was
given a turn tries once more after ``settle_s`` (a few hundredths of a second): the
room it was given is usually being freed along the route at that moment.

Bounds: at most ``max_waiting`` generations wait (one more, new or refused, is
refused at once with :class:`QueueFull`), and none waits longer than ``max_wait_s`` from its arrival
(:class:`QueueTimeout`); the gateway answers both with HTTP 429 and ``Retry-After``.

Invariants: a waiter is in the line until it is granted, gives up or is cancelled;
a cancelled waiter that had been granted passes its turn on; ``len(queue)`` counts
the waiters (new and returned).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FairQueue", "QueueBusy", "QueueFull", "QueueTimeout", "Ticket"]


class QueueBusy(Exception):
    """No room for the generation within the line's bounds (answered with 429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class QueueFull(QueueBusy):
    """The line is at its bound."""


class QueueTimeout(QueueBusy):
    """Waited the longest a generation may wait."""


@dataclass(order=True)
class _Waiter:
    seq: int
    key: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False, repr=False)


@dataclass
class Ticket:
    """A generation's place: its key, arrival order and time, and how long it waited."""

    key: str
    seq: int
    arrived: float
    deadline: float
    waited_s: float = 0.0
    granted: bool = False  # its last turn came from room freed (not from a head's try)


class FairQueue:
    """See the module docstring. Event loop only (no locks)."""

    def __init__(
        self,
        max_waiting: int = 64,
        max_wait_s: float = 60.0,
        *,
        probe_s: float = 1.0,
        settle_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_waiting < 0 or max_wait_s <= 0 or probe_s <= 0:
            raise ValueError("max_waiting must be >= 0, max_wait_s and probe_s > 0")
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.probe_s = probe_s
        self.settle_s = settle_s
        self._clock = clock
        self._lines: OrderedDict[str, list[_Waiter]] = OrderedDict()  # key -> its waiters by arrival
        self._seq = itertools.count()
        self._arrived: dict[int, float] = {}  # waiter seq -> arrival time
        self.full = False  # the swarm answered busy and nobody got in since
        self.hint_s = 1.0  # the swarm's last retry hint (seconds)
        self.running = 0  # generations started and not finished
        self.refused = 0  # QueueBusy raised (full or timed out)

    def __len__(self) -> int:
        return sum(len(w) for w in self._lines.values())

    def waiting_by_key(self) -> dict[str, int]:
        return {k: len(w) for k, w in self._lines.items()}

    def oldest_wait_s(self) -> float:
        """How long the longest waiter has been waiting (0 when none)."""
        return max((self._clock() - self._arrived[w.seq] for w in self._all()), default=0.0)

    def retry_after_s(self) -> float:
        """What to tell a refused caller: about when a turn comes free."""
        return max(1.0, self.hint_s)

    # -- entering and waiting --

    async def enter(self, key: str) -> Ticket:
        """Wait for a turn (or none, when there is room); raises :class:`QueueBusy`."""
        now = self._clock()
        ticket = Ticket(key, next(self._seq), now, now + self.max_wait_s)
        if not self.full and not self._lines:
            return ticket
        if len(self) >= self.max_waiting:
            self.refused += 1
            raise QueueFull(
                f"the swarm is busy and {len(self)} requests are waiting already; retry later",
                self.retry_after_s(),
            )
        await self._wait(ticket)
        return ticket

    async def again(self, ticket: Ticket, retry_after_s: float) -> None:
        """``ticket``'s generation was refused busy: wait at its place for another turn
        (within the same bounds as a new arrival: the line never holds more)."""
        self.full = True
        self.hint_s = max(0.05, retry_after_s)
        if len(self) >= self.max_waiting:
            self.refused += 1
            raise QueueFull(f"the swarm is busy and {len(self)} requests are waiting already; retry later", self.retry_after_s())
        quick, ticket.granted = ticket.granted, False
        await self._wait(ticket, first_s=self.settle_s if quick else None)

    def started(self, ticket: Ticket) -> None:
        """``ticket``'s generation got room: the next in line may try too."""
        self.running += 1
        if self._lines:
            self._grant()
        else:
            self.full = False

    def finished(self, ticket: Ticket) -> None:
        """A started generation ended: its room is free for the next in line."""
        self.running -= 1
        if self._lines:
            self._grant()
        else:
            self.full = False

    # -- internals --

    def _all(self) -> list[_Waiter]:
        return [w for line in self._lines.values() for w in line]

    def _head(self) -> _Waiter | None:
        for line in self._lines.values():
            return line[0]
        return None

    def _grant(self) -> None:
        """Give the turn to the head of the line: the first waiter of the key whose turn it is."""
        while self._lines:
            key, line = next(iter(self._lines.items()))
            waiter = line.pop(0)
            if line:
                self._lines.move_to_end(key)  # round robin over keys
            else:
                del self._lines[key]
            if not waiter.future.done():
                waiter.future.set_result(None)
                return

    def _remove(self, waiter: _Waiter) -> None:
        line = self._lines.get(waiter.key)
        if line is not None and waiter in line:
            line.remove(waiter)
            if not line:
                del self._lines[waiter.key]

    async def _wait(self, ticket: Ticket, first_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(ticket.seq, ticket.key, loop.create_future())
        line = self._lines.get(ticket.key)
        if line is None:
            line = self._lines[ticket.key] = []
            if ticket.seq < min((w.seq for w in self._all()), default=ticket.seq + 1):
                self._lines.move_to_end(ticket.key, last=False)  # a returning early arrival goes first
        bisect.insort(line, waiter)
        self._arrived[ticket.seq] = ticket.arrived
        t0 = self._clock()
        try:
            while True:
                left = ticket.deadline - self._clock()
                if left <= 0:
                    self._remove(waiter)
                    self.refused += 1
                    raise QueueTimeout(
                        f"the swarm is busy: no room within {self.max_wait_s:g} s; retry later", self.retry_after_s()
                    )
                timeout = min(left, self.hint_s, self.probe_s) if first_s is None else min(left, first_s)
                first_s = None
                try:
                    await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
                    ticket.granted = True
                    return
                except asyncio.TimeoutError:
                    if self._clock() < ticket.deadline and self._head() is waiter:
                        # nothing freed meanwhile: the head tries anyway
                        self._remove(waiter)
                        return
        except asyncio.CancelledError:
            if waiter.future.done():
                self._grant()  # our turn, unused: pass it on
            else:
                self._remove(waiter)
            raise
        finally:
            self._arrived.pop(ticket.seq, None)
            ticket.waited_s += self._clock() - t0
