"""``swarm-coordinator``: the swarm's registry, layer assignment and routes.

Every flag falls back to an environment variable ``SWARM_<FLAG>`` (``--http-port`` ->
``SWARM_HTTP_PORT``), then to the default. By default the MQTT broker runs inside this
process (amqtt); ``--mqtt mqtt://host:port`` uses an external one (mosquitto).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from swarm_coordinator.config import CoordinatorConfig
from swarm_proto import daemon
from swarm_proto.flags import flag_adder
from swarm_proto.model_args import DTYPE_BYTES

log = logging.getLogger("swarm_coordinator")

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm-coordinator", description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = CoordinatorConfig.__dataclass_fields__
    add = flag_adder(p)

    add("--model", str, None, "model file/folder or known name the swarm serves (default: smollm2-135m)")
    add("--host", str, defaults["host"].default, "address to bind (0.0.0.0: every interface)")
    add("--port", int, defaults["port"].default, "gRPC port (GetRoute, ReportFailure, ListNodes); 0 picks one")
    add("--http-port", int, defaults["http_port"].default, "HTTP gateway port (OpenAI API, dashboard, metrics)")
    add("--mqtt", str, defaults["mqtt"].default, "'embedded' (broker in this process) or mqtt://host:port")
    add("--mqtt-port", int, defaults["mqtt_port"].default, "port of the embedded broker; 0 picks one")
    add("--swarm-id", str, defaults["swarm_id"].default, "the swarm's name (MQTT topics swarm/<id>/...)")
    add("--replicas", int, defaults["replicas"].default, "copies of each layer wanted, where memory allows")
    add("--min-gain", float, defaults["min_gain"].default, "reshuffle a working swarm only for more than this gain")
    add("--dtype", str, defaults["dtype"].default, "the nodes' compute dtype (sizes layers against memory budgets)",
        choices=list(DTYPE_BYTES))
    add("--node-timeout", float, defaults["node_timeout"].default, "seconds of silence before a node counts as offline")
    add("--forget-after", float, defaults["forget_after"].default,
        "seconds offline after which a node is forgotten and its retained status cleared")
    add("--settle", float, defaults["settle"].default, "seconds changes gather before a plan (a burst of joins: one plan)")
    add("--rebalance-interval", float, defaults["rebalance_interval"].default,
        "seconds between whole-swarm proposals (plans in between only repair and place newcomers)")
    add("--reload-budget", int, defaults["reload_budget"].default,
        "times a node may be moved off a range it hosts per --reload-window (coverage comes first)")
    add("--reload-window", float, defaults["reload_window"].default, "the reload budget's window, seconds")
    add("--coordinator-id", str, "", "this coordinator's name on the planning lease (unique per swarm; default: random)")
    add("--token", str, "", "swarm token required on every gRPC call and sent to the nodes; prefer the env var, flags show in ps")
    daemon.add_log_level(add)
    from swarm_coordinator.http.mount import add_gateway_flags

    add_gateway_flags(p)  # --api-key, --api-keys-file, --rate-limit-rpm/-tpm, --model-id
    return p


def config_from_args(ns: argparse.Namespace) -> CoordinatorConfig:
    from swarm_proto.store import resolve_model

    return CoordinatorConfig(
        model=str(resolve_model(ns.model)),
        host=ns.host,
        port=ns.port,
        http_port=ns.http_port,
        mqtt=ns.mqtt,
        mqtt_port=ns.mqtt_port,
        swarm_id=ns.swarm_id,
        replicas=ns.replicas,
        min_gain=ns.min_gain,
        dtype=ns.dtype,
        node_timeout=ns.node_timeout,
        forget_after=ns.forget_after,
        settle=ns.settle,
        rebalance_interval=ns.rebalance_interval,
        reload_budget=ns.reload_budget,
        reload_window=ns.reload_window,
        coordinator_id=ns.coordinator_id,
        token=ns.token,
    )


async def _run(config: CoordinatorConfig, ns: argparse.Namespace) -> None:
    from swarm_coordinator.http.mount import coordinator_app, gateway_config_from_args
    from swarm_coordinator.server import CoordinatorServer

    gateway = gateway_config_from_args(ns)
    server = CoordinatorServer(config, http_app=lambda coordinator: coordinator_app(coordinator, gateway))
    stop = daemon.stop_event()
    async with server:
        daemon.announce(
            f"swarm-coordinator listening on {server.address} mqtt={server.advertised_mqtt_url}"
            f" http={server.http_address or 'off'}"
        )
        await stop.wait()
        log.info("signal received: stopping")


def main(argv: Sequence[str] | None = None) -> int:
    from swarm_coordinator.errors import CoordinatorError
    from swarm_proto.errors import SwarmProtoError

    errors = (CoordinatorError, SwarmProtoError, OSError)
    return daemon.main("swarm-coordinator", build_parser(), argv, config_from_args, _run, errors)


if __name__ == "__main__":
    sys.exit(main())
