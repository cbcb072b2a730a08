"""The pieces of failover that :class:`swarm_client.routed.RoutedBackend` puts together.

- :class:`FailoverPolicy`: how long to wait, how often to retry, which replay.
- :class:`StepClock`: the step timeout of one session (one generation: its clock
  is its own, never shared), derived from the route's expected latency: the
  coordinator's estimate for the route until the session has measured steps itself,
  then its own measurements (a step of ``T`` positions is expected to take
  ``step_s + (T-1) * position_s``); the timeout is a multiple of that, never under a
  floor.
- avoidance: nodes this client saw fail, avoided for a backoff that doubles with each
  repeated failure of the same node (:class:`swarm_proto.backoff.Backoff`, the same
  mechanism as the coordinator's); a node that refused for capacity ("busy") is never
  avoided.
- :func:`blame`: which hops a failure points at (the in-band error names one, blamed
  only if it does not answer a probe: a forged error cannot back off an honest node;
  a silent route is probed, and the hops that do not answer ``Info`` are the culprits).
- :func:`patch_route`: the old route with only the failed hops replaced, so that the
  survivors -- which keep the session's cache -- stay on it (span replay).
- :class:`FailoverRecord`: one failover's numbers, reported to the coordinator, which
  publishes them as a ``failover`` event.

See docs/failover.md for the protocol and the measurements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from swarm_client.remote import Hop, RouteError
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.tls import TlsFiles, secure_aio_channel
from swarm_proto.transport import DEFAULT_MAX_RECEIVE, Metadata, channel_options

if TYPE_CHECKING:
    from swarm_client.routed import NodeSummary

__all__ = ["FailoverPolicy", "FailoverRecord", "StepClock", "blame", "patch_route", "probe"]


@dataclass(frozen=True)
class FailoverPolicy:
    replay: str = "span"  # "span": survivors keep their caches; "full": a new session replays everything
    max_failovers: int = 8  # per generation
    no_route_wait: float = 30.0  # how long to wait for a route (a reassignment loading) before giving up
    open_timeout: float = 10.0  # opening a route (every hop answers Opened)
    step_timeout_floor: float = 1.0  # never time a step out faster than this ...
    step_timeout_factor: float = 10.0  # ... nor faster than this many times its expected latency
    step_timeout_max: float = 60.0  # and the timeout before anything was measured
    probe_timeout: float = 0.5  # a hop that does not answer Info within this is blamed for a silent route
    backoff_initial: float = 2.0  # a failed node is avoided this long, doubling per repeated failure
    backoff_max: float = 60.0
    retry_delay: float = 0.2  # between attempts to get a route
    busy_wait: float = 300.0  # how long a generation waits in all for room when routes are busy (the caller's timeout)
    busy_at_start: str = "wait"  # "raise": BusyError before the first token, for a caller that queues (the gateway)

    def __post_init__(self) -> None:
        if self.replay not in ("span", "full"):
            raise ValueError(f"replay must be 'span' or 'full', got {self.replay!r}")
        if self.busy_at_start not in ("wait", "raise"):
            raise ValueError(f"busy_at_start must be 'wait' or 'raise', got {self.busy_at_start!r}")
        if self.busy_wait < 0:
            raise ValueError("busy_wait must be >= 0")


class StepClock:
    """Expected step latency of one session from what it measured (exponential moving
    averages). State of a session: a clock shared by sessions on different routes would
    time one route out by another's speed."""

    def __init__(self, policy: FailoverPolicy, alpha: float = 0.2) -> None:
        self.policy = policy
        self.alpha = alpha
        self.step_s: float | None = None  # a decode step (one position), round trip
        self.position_s: float | None = None  # each further position of a longer step
        self.estimate_s = 0.0  # the coordinator's estimate of a decode step (0: none)
        self.stretch = 1.0  # doubled by every timeout of a route that was only slow

    def slower(self) -> None:
        """A step timed out on a route whose nodes all answer: give this session more time."""
        self.stretch *= 2.0

    def prior(self, expected_step_s: float) -> None:
        """The coordinator's estimate for the current route, used until a step was measured."""
        self.estimate_s = max(0.0, expected_step_s)

    def observe(self, positions: int, seconds: float) -> None:
        if positions <= 1:
            self.step_s = seconds if self.step_s is None else (1 - self.alpha) * self.step_s + self.alpha * seconds
        elif self.step_s is not None:
            per = max(0.0, seconds - self.step_s) / (positions - 1)
            self.position_s = per if self.position_s is None else (1 - self.alpha) * self.position_s + self.alpha * per

    def expected(self, positions: int) -> float | None:
        if self.step_s is None and positions <= 1 and self.estimate_s > 0:
            return self.estimate_s
        if self.step_s is None or (positions > 1 and self.position_s is None):
            return None
        return self.step_s + max(0, positions - 1) * (self.position_s or 0.0)

    def probe_timeout(self) -> float:
        """How long a hop may take to answer an Info probe: the policy's figure, or two
        measured decode steps where links are slow (a step costs at least a round trip
        to the route's head and back from its tail, so the bound scales with the RTT)."""
        expected = self.expected(1)
        return max(self.policy.probe_timeout, 2.0 * expected if expected is not None else 0.0)

    def timeout(self, positions: int = 1) -> float:
        p = self.policy
        expected = self.expected(positions)
        if expected is None:
            return p.step_timeout_max
        return min(p.step_timeout_max, max(p.step_timeout_floor, p.step_timeout_factor * expected) * self.stretch)


def hop_key(hop: Hop) -> str:
    """What a failure is held against: the process at that address (a node restarted
    on another port is a new process; one restarted on the same port is avoided)."""
    return hop.address


@dataclass
class FailoverRecord:
    """One failover: where, and what it cost (the stall split into its parts)."""

    session_id: str
    node_id: str
    address: str
    code: str
    message: str
    history_tokens: int  # positions the session held when it failed
    mode: str  # "span" | "full"
    detect_s: float = 0.0  # the failed step's send -> the failure known
    reroute_s: float = 0.0  # -> a new route found and opened
    replay_s: float = 0.0  # -> the next token back
    replayed_tokens: int = 0  # positions recomputed on the new route
    replayed_layers: int = 0  # ... by this many of its layers (the fresh spans'; all of them for a full replay)
    kept: tuple[int, ...] = ()  # per hop of the new route: positions it kept
    hops: tuple[Hop, ...] = ()  # the new route
    attempts: int = 1  # routes tried until one worked
    t_failed: float = field(default=0.0, repr=False)  # monotonic clock marks
    t_detected: float = field(default=0.0, repr=False)
    t_opened: float = field(default=0.0, repr=False)

    @property
    def stall_s(self) -> float:
        return self.detect_s + self.reroute_s + self.replay_s

    def summary(self) -> str:
        where = self.node_id or self.address
        return (
            f"session {self.session_id[:12]}: {where} failed ({self.code}); stall {self.stall_s:.3f} s "
            f"(detect {self.detect_s:.3f}, reroute {self.reroute_s:.3f}, replay {self.replay_s:.3f}), "
            f"{self.mode} replay of {self.replayed_tokens}/{self.history_tokens} tokens into {self.replayed_layers} layers"
        )


async def probe(hops: Sequence[Hop], timeout: float, metadata: Metadata = None, tls: TlsFiles | None = None) -> list[Hop]:
    """The hops that do not answer ``Info`` within ``timeout`` (frozen, gone)."""

    async def silent(hop: Hop) -> bool:
        channel = secure_aio_channel(hop.address, tls, channel_options(DEFAULT_MAX_RECEIVE))
        try:
            await swarm_pb2_grpc.NodeStub(channel).Info(swarm_pb2.InfoRequest(), timeout=timeout, metadata=metadata)
            return False
        except grpc.aio.AioRpcError:
            return True
        finally:
            await channel.close(grace=None)

    answers = await asyncio.gather(*(silent(h) for h in hops))
    return [h for h, bad in zip(hops, answers) if bad]


async def blame(
    error: RouteError, hops: Sequence[Hop], probe_timeout: float, metadata: Metadata = None, tls: TlsFiles | None = None
) -> list[Hop]:
    """The hops of ``hops`` that ``error`` points at.

    An in-band error names the hop where the route broke, but any node upstream of it
    could have written that error: the named hop is blamed only when a probe confirms
    it (it does not answer ``Info`` within ``probe_timeout``), else nobody is (the
    failover goes on, the named node is neither avoided nor reported). A step timeout
    names nobody: the hops are probed and the silent ones blamed (none when all
    answer: the route was only slow, and is tried again)."""
    named = [h for h in hops if (error.node_id and h.node_id == error.node_id) or (error.address and h.address == error.address)]
    if named and error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
        return await probe(named[:1], probe_timeout, metadata, tls)
    return await probe(hops, probe_timeout, metadata, tls)


def patch_route(
    hops: Sequence[Hop], failed: Collection[Hop], nodes: Iterable[NodeSummary], avoid: Collection[str]
) -> tuple[Hop, ...] | None:
    """``hops`` with each failed hop's layers taken over by other nodes, or None.

    A replacement never repeats a node of the route (one node holds one copy of a
    session) and prefers the node covering most of the gap, then the least busy. The
    surviving hops keep exactly their layers, so a resume finds their caches."""
    used = {h.node_id for h in hops if h.node_id} | {h.address for h in hops}
    pool = [
        n
        for n in nodes
        if n.address and n.end > n.start and not {n.node_id, n.address} & (set(avoid) | used)
    ]
    out: list[Hop] = []
    for hop in hops:
        if hop not in failed:
            out.append(hop)
            continue
        pos = hop.start
        while pos < hop.end:
            here = [n for n in pool if n.start <= pos < n.end]
            if not here:
                return None
            best = min(here, key=lambda n: (-min(n.end, hop.end), n.active_sessions, n.node_id))
            end = min(best.end, hop.end)
            out.append(Hop(best.address, pos, end, best.node_id))
            pool.remove(best)
            pos = end
    return tuple(out)
