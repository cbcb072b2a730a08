"""The dashboard's data: what the gateway is doing, what the swarm looks like, as JSON.

:class:`Activity` follows the gateway's generations (active sessions, recent ones,
per-second throughput and latency). :func:`swarm_sessions` lists every session the
swarm serves -- from the gateway, the CLI or the library alike -- out of the sessions
each node lists in its load (``swarm_proto.presence.SessionLoad``, at most
``MAX_LOAD_SESSIONS`` per node), one entry per session id with its hops.
:func:`snapshot` joins them with the registry's state and events into one JSON-ready dict; ``/dashboard/feed`` pushes a snapshot as
a server-sent event every second and at once whenever the registry changes, and the
page (``static/``) redraws from it.

The registry side is anything with a ``state`` (a :class:`SwarmState`) and ``events``
(recent :class:`Event` s): the MQTT :class:`~swarm_coordinator.registry.Registry`, or
a :class:`StaticView` when the gateway serves a fixed route or a local model.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from swarm_coordinator.http.queue import FairQueue
from swarm_coordinator.state import NodeView, SwarmState, runs
from swarm_proto.presence import Event

__all__ = ["Activity", "SessionInfo", "StaticView", "SwarmView", "snapshot", "swarm_sessions"]

SERIES_SECONDS = 180  # how much history the charts get
MAX_EVENTS = 200


@runtime_checkable
class SwarmView(Protocol):
    """What the dashboard and the metrics read from the registry."""

    @property
    def state(self) -> SwarmState: ...

    @property
    def events(self) -> Iterable[Event]: ...

    def changes(self) -> AsyncIterator[SwarmState]:
        """The state after each change; a view that cannot tell when it changes ends at
        once (its readers look when they read)."""
        ...


@dataclass
class StaticView:
    """A fixed swarm view (a static route or a local model), with events added by hand."""

    state: SwarmState
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=500))

    async def changes(self) -> AsyncIterator[SwarmState]:
        return  # changed by hand: nothing to announce
        yield self.state  # (makes this an async generator)


@dataclass
class SessionInfo:
    """One generation going through the gateway."""

    id: str
    endpoint: str
    caller: str
    prompt_tokens: int
    max_tokens: int
    started: float = field(default_factory=time.time)  # wall clock, for display
    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    ttft_s: float | None = None
    last: float = 0.0  # perf_counter of the latest token
    status: str = "running"  # running, done, error, cancelled
    finish_reason: str | None = None
    duration_s: float = 0.0

    def as_json(self, now: float) -> dict[str, Any]:
        elapsed = (self.duration_s or (now - self.t0)) if self.status != "running" else now - self.t0
        decode = elapsed - (self.ttft_s or 0.0)
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "caller": self.caller,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "tokens": self.tokens,
            "started": self.started,
            "elapsed_s": round(elapsed, 3),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1e3, 1),
            "tokens_per_s": round((self.tokens - 1) / decode, 2) if self.tokens > 1 and decode > 0 else 0.0,
            "status": self.status,
            "finish_reason": self.finish_reason,
        }


class _Second:
    __slots__ = ("t", "tokens", "itl_sum", "itl_n", "ttft_sum", "ttft_n", "requests", "errors")

    def __init__(self, t: int) -> None:
        self.t = t
        self.tokens = 0
        self.itl_sum = 0.0
        self.itl_n = 0
        self.ttft_sum = 0.0
        self.ttft_n = 0
        self.requests = 0
        self.errors = 0


class Activity:
    """Sessions and per-second series of the gateway (event loop only, no locks)."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self.active: dict[str, SessionInfo] = {}
        self.recent: deque[SessionInfo] = deque(maxlen=12)
        self._series: deque[_Second] = deque(maxlen=SERIES_SECONDS + 2)
        self.total_requests = 0
        self.total_tokens = 0

    def _bucket(self) -> _Second:
        t = int(self._clock())
        if not self._series or self._series[-1].t != t:
            self._series.append(_Second(t))
        return self._series[-1]

    def start(self, endpoint: str, caller: str, prompt_tokens: int, max_tokens: int) -> SessionInfo:
        info = SessionInfo(f"s{next(self._ids)}", endpoint, caller, prompt_tokens, max_tokens)
        self.active[info.id] = info
        self.total_requests += 1
        self._bucket().requests += 1
        return info

    def tokens(self, info: SessionInfo, n: int, now: float) -> None:
        """``n`` tokens of ``info`` arrived at ``now`` (perf_counter)."""
        bucket = self._bucket()
        if info.ttft_s is None:
            info.ttft_s = now - info.t0
            bucket.ttft_sum += info.ttft_s
            bucket.ttft_n += 1
        else:
            bucket.itl_sum += now - info.last
            bucket.itl_n += n
        info.tokens += n
        info.last = now
        bucket.tokens += n
        self.total_tokens += n

    def end(self, info: SessionInfo, status: str, finish_reason: str | None = None) -> None:
        self.active.pop(info.id, None)
        info.status = status
        info.finish_reason = finish_reason
        info.duration_s = time.perf_counter() - info.t0
        if status == "error":
            self._bucket().errors += 1
        self.recent.appendleft(info)

    def series(self, seconds: int = SERIES_SECONDS) -> list[dict[str, Any]]:
        """One point per second for the last ``seconds`` (the current second excluded,
        as it is still filling), zeros where nothing happened."""
        now = int(self._clock())
        by_t = {b.t: b for b in self._series}
        out: list[dict[str, Any]] = []
        for t in range(now - seconds, now):
            b = by_t.get(t)
            if b is None:
                out.append({"t": t, "tokens": 0, "requests": 0, "errors": 0, "itl_ms": None, "ttft_ms": None})
                continue
            out.append(
                {
                    "t": t,
                    "tokens": b.tokens,
                    "requests": b.requests,
                    "errors": b.errors,
                    "itl_ms": round(b.itl_sum / b.itl_n * 1e3, 2) if b.itl_n else None,
                    "ttft_ms": round(b.ttft_sum / b.ttft_n * 1e3, 1) if b.ttft_n else None,
                }
            )
        return out


def _range(r: Any) -> list[int] | None:
    return None if r is None else [r.start, r.end]


def _node(view: NodeView, now_mono: float) -> dict[str, Any]:
    status, load = view.status, view.load
    return {
        "id": view.node_id,
        "address": status.address,
        "model": status.model,
        "device": status.device,
        "state": status.state.value,
        "online": view.online,
        "hosted": _range(status.hosted),
        "serving": _range(view.serving),
        "assigned": _range(view.assigned),
        "speed": round(status.speed, 2),
        "memory_budget": status.memory_budget,
        "weight_format": status.weight_format,
        "layer_bytes": status.layer_bytes,
        "exposed": status.exposed,
        "load": None
        if load is None
        else {
            "active_sessions": load.active_sessions,
            "queued_steps": load.queued_steps,
            "free_kv_tokens": load.free_kv_tokens,
            "tokens_per_s": round(load.tokens_per_s, 2),
            "kv_tokens": load.kv_tokens,
            "free_sessions": load.free_sessions,
            "opening_sessions": load.opening_sessions,
        },
        "last_seen_s": round(now_mono - view.last_seen, 1) if view.last_seen else None,
    }


def exposure_warnings(nodes: Iterable[dict[str, Any]]) -> list[str]:
    """One line per online node listening beyond loopback with neither TLS nor a token."""
    return [
        f"node {n['id']} ({n['address']}) listens with neither TLS nor a swarm token: anyone who can reach it "
        "can read the activations it computes and call it"
        for n in sorted(nodes, key=lambda n: n["id"])
        if n["online"] and n["exposed"]
    ]


def coverage(state: SwarmState) -> list[int]:
    """How many ready nodes serve each layer."""
    return list(state.serving().coverage(state.num_layers))


def swarm_sessions(state: SwarmState) -> list[dict[str, Any]]:
    """Every session the online nodes report, merged by id: its hops in layer order, the
    longest position (the tail's: tokens so far), the client's prompt and budget; the
    longest-running first."""
    merged: dict[str, dict[str, Any]] = {}
    for view in state.nodes.values():
        if not view.online or view.load is None:
            continue
        for x in view.load.sessions:
            entry = merged.setdefault(
                x.session_id,
                {"id": x.session_id, "hops": [], "position": 0, "prompt_tokens": 0, "max_new_tokens": 0,
                 "age_s": 0.0, "idle_s": math.inf},
            )
            entry["hops"].append({"node": view.node_id, "layers": [x.start, x.end]})
            entry["position"] = max(entry["position"], x.position)
            entry["prompt_tokens"] = max(entry["prompt_tokens"], x.prompt_tokens)
            entry["max_new_tokens"] = max(entry["max_new_tokens"], x.max_new_tokens)
            entry["age_s"] = round(max(entry["age_s"], x.age_s), 1)
            entry["idle_s"] = round(min(entry["idle_s"], x.idle_s), 1)
    out = sorted(merged.values(), key=lambda e: (-e["age_s"], e["id"]))
    for entry in out:
        entry["hops"].sort(key=lambda h: (h["layers"][0], h["node"]))
        entry["covers"] = _chain_end(entry["hops"])
        entry["generated"] = max(0, entry["position"] - entry["prompt_tokens"]) if entry["prompt_tokens"] else None
    return out


def _chain_end(hops: Sequence[dict[str, Any]]) -> int:
    """How far the hops run end to end from layer 0 (the whole model when it is L)."""
    end = 0
    for hop in hops:
        start, stop = hop["layers"]
        if start <= end:
            end = max(end, stop)
    return end


def _runs_of_zero(counts: Sequence[int]) -> list[list[int]]:
    return [[r.start, r.end] for r in runs(c == 0 for c in counts)]


def snapshot(
    view: SwarmView | None,
    activity: Activity,
    *,
    model_id: str,
    auth_required: bool,
    now_mono: float | None = None,
    queue: FairQueue | None = None,
    policy: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything the dashboard shows, JSON-ready. ``warnings``: the coordinator's own
    (an exposed bind); one is added per online node that says it is exposed."""
    now_perf = time.perf_counter()
    mono = time.monotonic() if now_mono is None else now_mono
    state = view.state if view is not None else None
    nodes = [_node(v, mono) for v in state.nodes.values()] if state is not None else []
    counts = coverage(state) if state is not None else []
    events = list(view.events)[-MAX_EVENTS:] if view is not None else []
    reported = sum(n["load"]["tokens_per_s"] for n in nodes if n["online"] and n["load"]) if nodes else 0.0
    in_swarm = swarm_sessions(state) if state is not None else []
    return {
        "time": time.time(),
        "model": model_id,
        "swarm": None if state is None else {"model": state.model, "num_layers": state.num_layers},
        "auth_required": auth_required,
        "warnings": [*warnings, *exposure_warnings(nodes)],
        "nodes": nodes,
        "coverage": counts,
        "uncovered": _runs_of_zero(counts),
        "events": [
            {"kind": e.kind.value, "node": e.node_id, "detail": e.detail, "ts": e.ts if math.isfinite(e.ts) else 0.0}
            for e in reversed(events)
        ],
        "sessions": [s.as_json(now_perf) for s in activity.active.values()],
        "recent": [s.as_json(now_perf) for s in activity.recent],
        "swarm_sessions": in_swarm,
        "series": activity.series(),
        "queue": None
        if queue is None
        else {
            "waiting": len(queue),
            "by_key": queue.waiting_by_key(),
            "oldest_wait_s": round(queue.oldest_wait_s(), 2),
            "full": queue.full,
            "refused": queue.refused,
            "limit": queue.max_waiting,
        },
        "policy": policy,  # the acceptable-use panel (policy_gate.PolicyGate.snapshot), None without a gateway
        "totals": {
            "requests": activity.total_requests,
            "tokens": activity.total_tokens,
            "active": len(activity.active),
            "swarm_sessions": len(in_swarm),
            "nodes_online": sum(1 for n in nodes if n["online"]),
            "nodes": len(nodes),
            "reported_tokens_per_s": round(reported, 2),
        },
    }
