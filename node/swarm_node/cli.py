"""``swarm-node``: serve a slice of a model's layers to the swarm.

Every flag falls back to an environment variable ``SWARM_<FLAG>`` (``--max-sessions``
-> ``SWARM_MAX_SESSIONS``), then to the default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from swarm_node.config import DEVICES, DTYPE_CHOICES, NodeConfig, parse_layers
from swarm_proto import daemon
from swarm_proto.flags import flag_adder
from swarm_proto.tls import add_tls_flags, exposed, exposure_warning, tls_from_args
from swarm_proto.weight_format import QUANTIZE_CHOICES

if TYPE_CHECKING:
    from swarm_node.agent import NodeAgent
    from swarm_node.server import NodeServer

log = logging.getLogger("swarm_node")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm-node", description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = NodeConfig.__dataclass_fields__
    add = flag_adder(p)

    add("--model", str, None, "Hugging Face folder or .gguf file")
    add("--layers", str, None, "layers to host, START:END (default: all)")
    add("--host", str, defaults["host"].default, "address to bind")
    add("--port", int, defaults["port"].default, "port to bind; 0 picks a free one")
    add("--device", str, defaults["device"].default, f"one of {', '.join(DEVICES)} (or cuda:N)")
    add("--dtype", str, defaults["dtype"].default, "compute dtype (auto: bfloat16 on CPU and CUDA; float32 is the exact dequantized path)", choices=list(DTYPE_CHOICES))
    add("--quantize", str, defaults["quantize"].default, "weights: auto keeps a GGUF file quantized (unless float32), none dequantizes, int8/int4 quantize a float checkpoint group-wise", choices=list(QUANTIZE_CHOICES))
    add("--threads", int, defaults["threads"].default, "torch CPU threads (0: torch's default)")
    add("--max-sessions", int, defaults["max_sessions"].default, "sessions held at once, at most (the capacity follows from --kv-budget)")
    add("--kv-budget", str, None, "bytes of KV cache for sessions, e.g. 256M (default: 16 sessions of --max-length)")
    add("--max-length", int, defaults["max_length"].default, "longest session in positions")
    add("--idle-timeout", float, defaults["idle_timeout"].default, "seconds before an idle session is freed")
    add("--open-idle-timeout", float, defaults["open_idle_timeout"].default, "seconds before a session that never got a step is freed")
    add("--idle-evict-after", float, defaults["idle_evict_after"].default, "when the node is full, sessions idle this many seconds give way to new ones")
    add("--max-pending-results", int, defaults["max_pending_results"].default, "results a tail holds for a client that does not read them, per session")
    add("--max-pending-result-bytes", str, None, "bytes of such results per session, e.g. 64M (default: 64M; a step's logits must fit)")
    add("--drain-timeout", float, defaults["drain_timeout"].default, "seconds SIGTERM waits for in-flight steps")
    add("--park-timeout", float, defaults["park_timeout"].default, "seconds a failed session's cache waits for a failover resume")
    add("--max-batch-tokens", int, defaults["max_batch_tokens"].default, "positions merged into one forward")
    add("--cuda-graphs", str, "on", "on CUDA, decode steps replay captured graphs (off: run them eagerly)", choices=["on", "off"])
    add("--token", str, "", "swarm token required on every call and sent to successors; prefer the env var, flags show in ps")
    add("--node-id", str, None, "identity reported to the swarm (default: host-pid)")
    add("--state-dir", str, "", "where a node with a --node-id keeps its presence key (default: <cache>/state)")
    add("--coordinator", str, None, "join the swarm of the coordinator at HOST:PORT (or the first that answers of HOST:PORT,HOST:PORT: active and standby) and host the layers it assigns")
    add("--memory-budget", str, None, "bytes of weights this node may hold, e.g. 2G (default: 80%% of free memory)")
    add("--speed", float, 0.0, "announce this decode speed (layer-steps/s) instead of measuring it")
    add("--advertise", str, "", "HOST[:PORT] other nodes and clients reach this node at (default: the bound address)")
    add("--probe-interval", float, 10.0, "seconds between round-trip probes to peers, reported for link-aware routing (0: off)")
    add("--metrics-port", int, None, "serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a port; default: off)")
    add_tls_flags(add)
    daemon.add_log_level(add)
    return p


def _bytes(text: str | None) -> int:
    from swarm_node.engine.speed import parse_bytes

    if not text:
        return 0
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise SystemExit(f"swarm-node: {exc}") from None


def config_from_args(ns: argparse.Namespace) -> NodeConfig:
    if not ns.model and ns.coordinator:
        from swarm_proto.store import resolve_model

        ns.model = str(resolve_model(None))  # the default model, as the coordinator's
    if not ns.model:
        raise SystemExit("swarm-node: --model (or SWARM_MODEL) is required")
    if ns.layers:
        start, end = parse_layers(ns.layers)
    else:
        from swarm_proto.model_args import read_args

        start, end = 0, read_args(ns.model).num_layers
    extra = {"node_id": ns.node_id} if ns.node_id else {}
    config = NodeConfig(
        model=ns.model,
        start=start,
        end=end,
        host=ns.host,
        port=ns.port,
        device=ns.device,
        dtype=ns.dtype,
        quantize=ns.quantize,
        threads=ns.threads,
        max_sessions=ns.max_sessions,
        max_length=ns.max_length,
        kv_budget=_bytes(ns.kv_budget),
        idle_timeout=ns.idle_timeout,
        drain_timeout=ns.drain_timeout,
        park_timeout=ns.park_timeout,
        open_idle_timeout=ns.open_idle_timeout,
        idle_evict_after=ns.idle_evict_after,
        max_pending_results=ns.max_pending_results,
        max_pending_result_bytes=_bytes(ns.max_pending_result_bytes) or NodeConfig.max_pending_result_bytes,
        max_batch_tokens=ns.max_batch_tokens,
        cuda_graphs=ns.cuda_graphs == "on",
        token=ns.token,
        metrics_port=ns.metrics_port,
        tls=tls_from_args(ns),
        **extra,
    )
    config.weight_format  # refuses --quantize int4 on a GGUF file, say, before anything starts
    return config


async def _run(config: NodeConfig, ns: argparse.Namespace) -> None:
    """Serve fixed layers (``--layers`` without ``--coordinator``), or join a swarm as an
    agent that (re)creates its server for the layers it is assigned."""
    from swarm_node.server import NodeServer

    if ns.coordinator:
        agent = _agent(config, ns)
        await _serve(config, agent, lambda: agent.server, lambda: f"swarm-node joined the swarm of {ns.coordinator}")
    else:
        node = NodeServer(config)
        await _serve(config, node, lambda: node, lambda: f"swarm-node listening on {node.address}")


async def _serve(
    config: NodeConfig,
    running: NodeServer | NodeAgent,
    server: Callable[[], NodeServer | None],
    started: Callable[[], str],
) -> None:
    """Start ``running``, say ``started()``, and drain it on SIGTERM/SIGINT; ``server``
    gives the current NodeServer to the metrics (an agent replaces it on reassignment)."""
    stop = daemon.stop_event()
    if exposed(config.host, token=config.token, tls=config.tls):
        log.warning("%s", exposure_warning("swarm-node", config.host))
    metrics = _start_metrics(config, server)
    await running.start()
    daemon.announce(started())
    await stop.wait()
    log.info("signal received: draining")
    await running.stop()
    _stop_metrics(metrics)


def _start_metrics(config: NodeConfig, server: Callable[[], Any]) -> tuple[Any, asyncio.Task[None]] | None:
    """Serve /metrics when --metrics-port is set; hooks follow the (re)created server."""
    if config.metrics_port is None:
        return None
    from swarm_node.metrics import MetricsServer, NodeMetrics

    metrics = NodeMetrics(config.node_id)
    exposition = MetricsServer(metrics.registry, config.host, config.metrics_port)
    url = exposition.start()
    daemon.announce(f"swarm-node metrics on {url}")
    return exposition, asyncio.get_running_loop().create_task(metrics.follow(server))


def _stop_metrics(metrics: tuple[Any, asyncio.Task[None]] | None) -> None:
    if metrics is not None:
        metrics[1].cancel()
        metrics[0].close()


def _agent(config: NodeConfig, ns: argparse.Namespace) -> NodeAgent:
    from swarm_node.agent import NodeAgent
    from swarm_node.engine.speed import parse_bytes
    from swarm_proto.trust import Identity, key_path

    # A named node keeps its key (an allow-list can name it); a host-pid id gets a fresh one.
    identity = Identity.load_or_create(key_path(ns.state_dir, f"node-{config.node_id}")) if ns.node_id else None
    return NodeAgent(
        config,
        coordinator=ns.coordinator,
        memory_budget=parse_bytes(ns.memory_budget) if ns.memory_budget else 0,
        speed=ns.speed,
        pinned=bool(ns.layers),
        advertise=ns.advertise,
        identity=identity,
        probe_interval=ns.probe_interval,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from swarm_node.errors import SwarmNodeError
    from swarm_proto.errors import SwarmProtoError

    errors = (SwarmNodeError, SwarmProtoError, OSError)
    return daemon.main("swarm-node", build_parser(), argv, config_from_args, _run, errors)


if __name__ == "__main__":
    sys.exit(main())
