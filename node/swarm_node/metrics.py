"""Prometheus metrics of one node, and a tiny HTTP exposition for them (``--metrics-port``).

Counters and histograms are fed by two hooks: the scheduler reports every merged
forward pass and every step it finished (:meth:`NodeMetrics.observe_batch`,
:meth:`NodeMetrics.observe_step`), the service reports every session that ended
(:meth:`NodeMetrics.session_ended`). Gauges (sessions, queue, KV cache) are read
from the live server at scrape time, so they survive a reload of the layers.

Each :class:`NodeMetrics` owns its ``CollectorRegistry`` (no process globals).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from swarm_node.scheduler import Job
    from swarm_node.server import NodeServer

log = logging.getLogger(__name__)

__all__ = ["MetricsServer", "NodeMetrics", "outcome"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def outcome(reason: str) -> str:
    """The label for how a session ended, from the service's reason text."""
    if reason in ("closed", "upstream finished"):
        return "closed"
    if "wait unread" in reason:  # its client did not read its results (docs/limits.md)
        return "unread"
    if "evicted:" in reason:  # idle while the node was full
        return "evicted"
    if reason.startswith("refused"):  # a bad message or a step the node could not run
        return "invalid"
    if reason == "upstream went away":
        return "abandoned"
    if "idle for more than" in reason:
        return "expired"
    return "failed"


def _snapshot(table: dict[str, Any]) -> list[Any]:
    # Scrapes run on the exposition thread while the event loop changes the table.
    for _ in range(5):
        try:
            return list(table.values())
        except RuntimeError:
            continue
    return []


class _Live(Collector):
    """Gauges read from the server when scraped."""

    def __init__(self, server: NodeServer, node_id: str) -> None:
        self.server = server
        self.node_id = node_id

    def collect(self) -> Iterator[Any]:
        server = self.server
        service, scheduler = server.service, server.scheduler
        if service is None or scheduler is None:
            return
        cfg = service.config
        model = service.model
        info = InfoMetricFamily("swarm_node", "What this node serves")
        info.add_metric(
            [],
            {
                "node_id": self.node_id,
                "model": str(cfg.model),
                "start": str(model.start),
                "end": str(model.end),
                "device": str(model.device),
                "dtype": cfg.resolved_dtype,
                "address": server.address,
            },
        )
        yield info
        yield GaugeMetricFamily("swarm_node_layers", "Layers this node serves", value=model.end - model.start)
        sessions = _snapshot(service.sessions)
        yield GaugeMetricFamily("swarm_node_sessions_active", "Sessions open on this node", value=len(sessions))
        yield GaugeMetricFamily("swarm_node_sessions_max", "Sessions this node holds at most", value=cfg.max_sessions)
        yield CounterMetricFamily("swarm_node_sessions_opened", "Sessions opened on this node", value=service.opened)
        yield CounterMetricFamily(
            "swarm_node_sessions_refused", "Sessions refused busy (no KV room, no memory, at max sessions)", value=service.refused
        )
        yield GaugeMetricFamily("swarm_node_queued_steps", "Steps waiting for a forward pass", value=scheduler.queued)
        caches = [s.cache for s in sessions]
        yield GaugeMetricFamily(
            "swarm_node_kv_cache_bytes", "Memory held by the sessions' KV caches", value=sum(c.nbytes for c in caches)
        )
        yield GaugeMetricFamily(
            "swarm_node_kv_used_tokens", "Positions written in the sessions' KV caches", value=sum(c.length for c in caches)
        )
        yield GaugeMetricFamily(
            "swarm_node_kv_reserved_tokens",
            "Positions the open sessions reserved (their max length)",
            value=sum(c.max_length for c in caches),
        )
        yield GaugeMetricFamily(
            "swarm_node_kv_free_tokens",
            "Positions (over the hosted layers) new sessions can still reserve",
            value=service.free_kv_tokens(),
        )
        admission = service.admission
        yield GaugeMetricFamily("swarm_node_kv_budget_bytes", "KV cache memory sessions may reserve", value=admission.budget_bytes)
        yield GaugeMetricFamily("swarm_node_kv_reserved_bytes", "KV cache memory reserved by open and opening sessions", value=admission.reserved)
        yield GaugeMetricFamily("swarm_node_sessions_opening", "Sessions admitted and waiting for their KV cache", value=admission.opening)
        stats = scheduler.stats
        yield CounterMetricFamily("swarm_node_forward_passes", "Merged forward passes run", value=stats.batches)


class NodeMetrics:
    """The metrics of one node; :meth:`attach` wires them into a started server."""

    def __init__(self, node_id: str, registry: CollectorRegistry | None = None) -> None:
        self.node_id = node_id
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tokens = Counter(
            "swarm_node_tokens", "Positions run through this node's layers, by phase", ["phase"], registry=r
        )
        self.sampled = Counter("swarm_node_sampled_tokens", "Tokens sampled here (the tail of a route)", registry=r)
        self.drafted = Counter(
            "swarm_node_drafted_tokens", "Drafted tokens verified here (speculative decoding, at the tail)", registry=r
        )
        self.steps = Counter(
            "swarm_node_steps", "Steps computed, by phase (verify: a step with drafted tokens)", ["phase"], registry=r
        )
        self.step_seconds = Histogram(
            "swarm_node_step_duration_seconds",
            "Time a step spends on this node: waiting for a batch plus the forward pass",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "swarm_node_forward_duration_seconds", "Time of one merged forward pass", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "swarm_node_batch_size_steps", "Steps merged into one forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "swarm_node_batch_size_tokens", "Positions in one forward pass", buckets=TOKEN_BUCKETS, registry=r
        )
        self.sessions_ended = Counter(
            "swarm_node_sessions_ended",
            "Sessions that ended here, by outcome (closed, failed, expired, abandoned, invalid, evicted, unread)",
            ["outcome"],
            registry=r,
        )
        for label in ("closed", "failed", "expired", "abandoned", "invalid", "evicted", "unread"):
            self.sessions_ended.labels(label)
        for phase in ("prefill", "decode", "verify"):
            self.tokens.labels(phase)
            self.steps.labels(phase)
        self._live: _Live | None = None

    def attach(self, server: NodeServer) -> None:
        """Read gauges from ``server`` and hook its scheduler and service (once started)."""
        if self._live is None:
            self._live = _Live(server, self.node_id)
            self.registry.register(self._live)
        else:
            self._live.server = server
        if server.scheduler is not None:
            server.scheduler.on_batch = self.observe_batch
            server.scheduler.on_step = self.observe_step
        if server.service is not None:
            server.service.on_session_end = self.session_ended

    async def follow(self, server: Callable[[], NodeServer | None], interval: float = 0.25) -> None:
        """Keep the hooks on whatever server ``server()`` returns (an agent creates its
        server once it has an assignment, and may replace it)."""
        while True:
            current = server()
            if current is not None and (
                self._live is None
                or self._live.server is not current
                or (current.scheduler is not None and current.scheduler.on_step != self.observe_step)
                or (current.service is not None and current.service.on_session_end != self.session_ended)
            ):
                self.attach(current)
            await asyncio.sleep(interval)

    # hooks (called on the event loop)

    def observe_batch(self, jobs: Sequence[Job], seconds: float) -> None:
        self.forward_seconds.observe(seconds)
        self.batch_size.observe(len(jobs))
        self.batch_tokens.observe(sum(j.length for j in jobs))

    def observe_step(self, job: Job, seconds: float) -> None:
        phase = "decode" if job.length == 1 else "verify" if job.draft else "prefill"
        self.steps.labels(phase).inc()
        self.tokens.labels(phase).inc(job.length)
        self.step_seconds.labels(phase).observe(seconds)
        if job.sample is not None:
            self.sampled.inc(1 + job.draft)
            self.drafted.inc(job.draft)

    def session_ended(self, reason: str) -> None:
        self.sessions_ended.labels(outcome(reason)).inc()


class MetricsServer:
    """Serves ``/metrics`` of a registry on its own thread (prometheus_client's server)."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> str:
        self._httpd, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = int(self._httpd.server_address[1])
        log.info("metrics on %s", self.url)
        return self.url

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
