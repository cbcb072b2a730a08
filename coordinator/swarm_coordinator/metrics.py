"""Prometheus metrics of the coordinator: its HTTP gateway and its view of the swarm.

Each :class:`CoordinatorMetrics` owns its own ``CollectorRegistry`` (no process-wide
globals, so two coordinators or a test can live in one process). The gateway's
counters and histograms are updated as requests run; the swarm's gauges are read from
the registry's state at scrape time by :class:`SwarmCollector`.

Names follow Prometheus conventions: ``swarm_`` prefix, base units (seconds),
``_total`` counters, histograms with ``_seconds`` / ``_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from swarm_coordinator.state import NodeLoad, SwarmState

__all__ = ["CONTENT_TYPE_LATEST", "CoordinatorMetrics", "SwarmCollector"]

# Latency buckets from a fast GPU token (a few ms) to a slow CPU prefill (tens of s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class SwarmCollector(Collector):
    """Gauges of the swarm as the registry sees it, computed at scrape time."""

    def __init__(self, state: Callable[[], SwarmState | None]) -> None:
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._state()
        if state is None:
            return
        nodes = GaugeMetricFamily("swarm_nodes", "Nodes known to the registry, by state", labels=["state"])
        counts: dict[str, int] = {s: 0 for s in ("starting", "loading", "ready", "draining", "offline")}
        for view in state.nodes.values():
            counts[view.status.state.value] = counts.get(view.status.state.value, 0) + 1
        for name, n in counts.items():
            nodes.add_metric([name], n)
        yield nodes

        serving = state.serving().coverage(state.num_layers)
        yield GaugeMetricFamily("swarm_layers", "Decoder layers of the served model", value=state.num_layers)
        yield GaugeMetricFamily(
            "swarm_layers_uncovered", "Layers no ready node serves", value=sum(1 for c in serving if c == 0)
        )
        yield GaugeMetricFamily(
            "swarm_layer_replicas_min", "Fewest ready nodes serving any one layer", value=min(serving, default=0)
        )

        per_node: dict[str, tuple[str, Callable[[NodeLoad], float]]] = {
            "swarm_node_active_sessions": ("Active sessions a node reports", lambda load: load.active_sessions),
            "swarm_node_queued_steps": ("Steps waiting on a node", lambda load: load.queued_steps),
            "swarm_node_kv_free_tokens": ("Token positions a node's KV cache can still take", lambda load: load.free_kv_tokens),
            "swarm_node_tokens_per_second": ("Decode throughput a node reports", lambda load: load.tokens_per_s),
        }
        for name, (doc, get) in per_node.items():
            family = GaugeMetricFamily(name, doc, labels=["node"])
            for view in state.nodes.values():
                if view.load is not None and view.online:
                    family.add_metric([view.node_id], float(get(view.load)))
            yield family
        up = GaugeMetricFamily("swarm_node_up", "1 when a node is online", labels=["node"])
        for view in state.nodes.values():
            up.add_metric([view.node_id], 1.0 if view.online else 0.0)
        yield up


class _ClientFailovers(Collector):
    """Failovers the gateway's own client library went through (read at scrape time)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "swarm_gateway_failovers", "Sessions of the gateway reopened on a new route after a failure", value=self._count()
        )


class CoordinatorMetrics:
    """The coordinator's metrics; ``exposition()`` renders them for ``/metrics``."""

    def __init__(self, state: Callable[[], SwarmState | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "swarm_gateway_requests", "HTTP API requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.generations = Counter(
            "swarm_gateway_generations",
            "Generations by how they ended: done, error (failed after starting), cancelled (the caller left)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("swarm_gateway_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter(
            "swarm_gateway_completion_tokens", "Tokens generated for API requests", registry=r
        )
        self.active = Gauge("swarm_gateway_active_requests", "Generations in progress", registry=r)
        self.request_seconds = Histogram(
            "swarm_gateway_request_duration_seconds",
            "Generation time from request to last token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "swarm_gateway_time_to_first_token_seconds", "Request to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.token_seconds = Histogram(
            "swarm_gateway_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.completion_sizes = Histogram(
            "swarm_gateway_completion_length_tokens", "Tokens generated per request", buckets=TOKEN_BUCKETS, registry=r
        )
        self.rate_limited = Counter(
            "swarm_gateway_rate_limited", "Requests refused with 429, by limit", ["limit"], registry=r
        )
        self.auth_failures = Counter("swarm_gateway_auth_failures", "Requests refused with 401", registry=r)
        self.queue_length = Gauge(
            "swarm_gateway_queue_length", "Generations waiting in line for room in the swarm", registry=r
        )
        self.queue_wait_seconds = Histogram(
            "swarm_gateway_queue_wait_seconds",
            "Time a generation waited in line for room (0 when the swarm had room)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.busy = Counter(
            "swarm_gateway_busy",
            "Busy answers: 'refused' by the swarm (waited on, never a failure), 'queue_full' and 'queue_timeout' (HTTP 429)",
            ["kind"],
            registry=r,
        )
        self.policy_decisions = Counter(
            "swarm_gateway_policy_decisions",
            "Generation requests by acceptable-use decision (allowed, refused, stopped) and rule id ('' when allowed)",
            ["decision", "rule"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "swarm_gateway_policy_reloads", "Policy file reloads by result (ok, error: the old rules stay)", ["result"], registry=r
        )
        self.policy_rules = Gauge("swarm_gateway_policy_rules", "Rules of the acceptable-use policy in use", registry=r)
        self.audit_dropped = Counter(
            "swarm_gateway_audit_dropped", "Audit log lines dropped because the disk could not keep up", registry=r
        )
        self.events = Counter("swarm_events", "Swarm events seen (joins, leaves, failovers, ...)", ["kind"], registry=r)
        self.failovers = Counter("swarm_failovers", "Failovers reported in the swarm", registry=r)
        if state is not None:
            r.register(SwarmCollector(state))

    def watch_client_failovers(self, count: Callable[[], int]) -> None:
        self.registry.register(_ClientFailovers(count))

    def watch_client_avoidance(self, avoided: Callable[[], int]) -> None:
        """Nodes the gateway's client avoids now (it saw them fail; busy ones never count)."""
        gauge = Gauge(
            "swarm_gateway_avoided_nodes",
            "Nodes the gateway's client library avoids now after seeing them fail",
            registry=self.registry,
        )
        gauge.set_function(lambda: float(avoided()))

    def count_events(self, kinds: Iterable[str]) -> None:
        for kind in kinds:
            self.events.labels(kind).inc()
            if kind == "failover":
                self.failovers.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
