"""Serve the gateway without a coordinator process of its own.

    python -m swarm_coordinator.http --local [--model PATH]            the model in this process
    python -m swarm_coordinator.http --route HOST:PORT=0:15,HOST:PORT=15:30
    python -m swarm_coordinator.http --coordinator HOST:PORT         routes from a coordinator

Same API, dashboard (without the swarm panels: there is no registry here) and metrics
as ``swarm-coordinator --http-port``; the gateway flags (``--api-key``, ...) apply.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from swarm_client.errors import SwarmError
from swarm_coordinator.http.app import create_app
from swarm_coordinator.http.mount import add_gateway_flags, gateway_config_from_args
from swarm_coordinator.http.serving import HttpServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swarm_coordinator.http", description=__doc__.splitlines()[0] if __doc__ else None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--local", action="store_true", help="run the whole model in this process")
    src.add_argument("--route", metavar="HOPS", help="a fixed route: HOST:PORT=START:END,... (no failover)")
    src.add_argument("--coordinator", metavar="HOST:PORT", help="ask this coordinator for routes")
    p.add_argument("--model", default=None, help="model file/folder or name (default: the default model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--token", default=os.environ.get("SWARM_TOKEN", ""), help="swarm token of the nodes and coordinator (default: $SWARM_TOKEN)")
    add_gateway_flags(p)
    return p


def _backend(ns: argparse.Namespace) -> object:
    from swarm_proto.store import resolve_model

    model = str(resolve_model(ns.model))
    if ns.local:
        from swarm_client.api import SwarmClient

        return SwarmClient.local(model)
    if ns.coordinator:
        from swarm_coordinator.http.mount import swarm_client

        return swarm_client(ns.coordinator, model, ns.token)
    from swarm_client.api import AsyncSwarmClient
    from swarm_client.failover import FailoverPolicy
    from swarm_client.routed import RoutedBackend, StaticRoutes, parse_route
    from swarm_client.tokenizer import load_tokenizer
    from swarm_proto.model_args import read_args

    args = read_args(model)
    backend = RoutedBackend(
        StaticRoutes(parse_route(ns.route), token=ns.token),
        max_context=args.max_position_embeddings,
        eos_token_ids=args.eos_token_ids,
        token=ns.token,
        policy=FailoverPolicy(busy_at_start="raise"),  # the gateway's line orders the waiting
    )
    return AsyncSwarmClient(backend, load_tokenizer(model))


async def _serve(ns: argparse.Namespace) -> None:
    backend = await asyncio.to_thread(_backend, ns)  # fail here, before serving, if the model is missing
    app = create_app(backend, None, gateway_config_from_args(ns))  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with HttpServer(app, ns.host, ns.port) as server:
        sys.stdout.write(f"gateway listening on {server.url}\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(ns.log_level).upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(ns))
    except (OSError, ValueError, SwarmError) as exc:
        raise SystemExit(f"gateway: {exc}") from exc
    return 0


if __name__ == "__main__":
    sys.exit(main())
