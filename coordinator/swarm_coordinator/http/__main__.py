"""Serve the gateway without a coordinator process of its own.

    python -m swarm_coordinator.http --local [--model PATH]            the model in this process
    python -m swarm_coordinator.http --route HOST:PORT=0:15,HOST:PORT=15:30
    python -m swarm_coordinator.http --coordinator HOST:PORT         routes from a coordinator

Same API, dashboard (without the swarm panels: there is no registry here) and metrics
as ``swarm-coordinator --http-port``; the gateway flags (``--api-key``, ...) apply. With
``--tls-cert/--tls-key/--tls-ca`` it reaches the swarm over mutual TLS and serves HTTPS
with that certificate, as the coordinator's own gateway does. Every
flag but the choice of source (``--local`` / ``--route`` / ``--coordinator``) falls back
to ``SWARM_<FLAG>``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from swarm_client.errors import SwarmError
from swarm_coordinator.http.app import create_app
from swarm_coordinator.http.mount import add_gateway_flags, gateway_config_from_args
from swarm_coordinator.http.serving import HttpServer
from swarm_proto import daemon
from swarm_proto.flags import flag_adder
from swarm_proto.tls import add_tls_flags, tls_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swarm_coordinator.http", description=__doc__.splitlines()[0] if __doc__ else None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--local", action="store_true", help="run the whole model in this process")
    src.add_argument("--route", metavar="HOPS", help="a fixed route: HOST:PORT=START:END,... (no failover)")
    src.add_argument("--coordinator", metavar="HOST:PORT", help="ask this coordinator for routes")
    add = flag_adder(p)
    add("--model", str, None, "model file/folder or name (default: the default model)")
    add("--host", str, "127.0.0.1", "address to bind")
    add("--port", int, 8000, "port to bind; 0 picks a free one")
    add("--token", str, "", "swarm token of the nodes and coordinator; prefer the env var, flags show in ps")
    add_tls_flags(add)
    daemon.add_log_level(add)
    add_gateway_flags(p)
    return p


def _backend(ns: argparse.Namespace) -> object:
    from swarm_proto.store import resolve_model

    model = str(resolve_model(ns.model))
    if ns.local:
        from swarm_client.api import SwarmClient

        return SwarmClient.local(model)
    from swarm_client.api import AsyncSwarmClient
    from swarm_client.failover import FailoverPolicy

    # busy_at_start="raise": the gateway's line orders the generations waiting for room
    policy = FailoverPolicy(busy_at_start="raise")
    return AsyncSwarmClient.remote(
        coordinator=ns.coordinator, route=ns.route, model=model, token=ns.token, policy=policy,
        speculate=getattr(ns, "speculate", 0) or 0, tls=tls_from_args(ns),
    )


async def _serve(_: object, ns: argparse.Namespace) -> None:
    backend = await asyncio.to_thread(_backend, ns)  # fail here, before serving, if the model is missing
    app = create_app(backend, None, gateway_config_from_args(ns))  # type: ignore[arg-type]
    stop = daemon.stop_event()
    async with HttpServer(app, ns.host, ns.port, tls=tls_from_args(ns)) as server:
        daemon.announce(f"gateway listening on {server.url}")
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    return daemon.main("gateway", build_parser(), argv, lambda ns: None, _serve, (OSError, ValueError, SwarmError))


if __name__ == "__main__":
    sys.exit(main())
