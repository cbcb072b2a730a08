"""Mounting the gateway on a coordinator: its flags, and the app factory it calls.

``swarm-coordinator`` adds the gateway's flags to its parser and hands
:func:`coordinator_app` to ``CoordinatorServer(http_app=...)``::

    add_gateway_flags(parser)
    ...
    gateway = gateway_config_from_args(ns)
    server = CoordinatorServer(config, http_app=lambda c: coordinator_app(c, gateway))

The app's client asks the coordinator for routes over gRPC like any other client
(so failover, reporting and the coordinator's routing policy all apply) and reads
the swarm's state and events straight from the coordinator's registry.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from swarm_coordinator.http.app import GatewayConfig, create_app

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from swarm_client.api import AsyncSwarmClient

__all__ = ["add_gateway_flags", "coordinator_app", "gateway_config_from_args"]


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """``--api-key`` (repeatable), ``--api-keys-file``, ``--rate-limit-rpm/-tpm``,
    ``--model-id``; each falls back to a ``SWARM_...`` environment variable."""
    env = os.environ.get
    keys = [k for k in env("SWARM_API_KEYS", "").split(",") if k]
    g = parser.add_argument_group("HTTP gateway")
    g.add_argument(
        "--api-key", action="append", default=keys or None, metavar="KEY",
        help="accept this API key on /v1 (repeatable; none and no keys file: the API is open) (env SWARM_API_KEYS, comma-separated)",
    )
    g.add_argument(
        "--api-keys-file", default=env("SWARM_API_KEYS_FILE"), metavar="PATH",
        help="file of API keys, one per line, optionally 'KEY rpm=N tpm=N' (env SWARM_API_KEYS_FILE)",
    )
    g.add_argument(
        "--rate-limit-rpm", type=int, default=int(env("SWARM_RATE_LIMIT_RPM", "0")), metavar="N",
        help="requests per minute per key, 0 = unlimited (env SWARM_RATE_LIMIT_RPM)",
    )
    g.add_argument(
        "--rate-limit-tpm", type=int, default=int(env("SWARM_RATE_LIMIT_TPM", "0")), metavar="N",
        help="tokens (prompt + completion) per minute per key, 0 = unlimited (env SWARM_RATE_LIMIT_TPM)",
    )
    g.add_argument(
        "--queue-size", type=int, default=int(env("SWARM_QUEUE_SIZE", "64")), metavar="N",
        help="requests that may wait for room while the swarm is busy; one more gets 429 (env SWARM_QUEUE_SIZE)",
    )
    g.add_argument(
        "--queue-timeout", type=float, default=float(env("SWARM_QUEUE_TIMEOUT", "60")), metavar="SECONDS",
        help="the longest a request waits for room before 429 (env SWARM_QUEUE_TIMEOUT)",
    )
    g.add_argument(
        "--model-id", default=env("SWARM_MODEL_ID"), metavar="NAME",
        help="the model id /v1/models lists (default: the model file's name) (env SWARM_MODEL_ID)",
    )


def gateway_config_from_args(ns: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        model_id=getattr(ns, "model_id", None) or None,
        api_keys=tuple(getattr(ns, "api_key", None) or ()),
        api_keys_file=getattr(ns, "api_keys_file", None) or None,
        requests_per_minute=getattr(ns, "rate_limit_rpm", 0) or 0,
        tokens_per_minute=getattr(ns, "rate_limit_tpm", 0) or 0,
        queue_size=getattr(ns, "queue_size", 64),
        queue_timeout_s=getattr(ns, "queue_timeout", 60.0),
    )


def swarm_client(coordinator_address: str, model: str, token: str = "") -> AsyncSwarmClient:
    """A client generating over the swarm of the coordinator at ``coordinator_address``
    (blocking: it reads the model's shape and loads its tokenizer); ``token``: the swarm's."""
    from swarm_client.api import AsyncSwarmClient
    from swarm_client.failover import FailoverPolicy
    from swarm_client.routed import CoordinatorRoutes, RoutedBackend
    from swarm_client.tokenizer import load_tokenizer
    from swarm_proto.model_args import read_args

    args = read_args(model)
    backend = RoutedBackend(
        CoordinatorRoutes(coordinator_address, token=token),
        max_context=args.max_position_embeddings,
        eos_token_ids=args.eos_token_ids,
        token=token,
        policy=FailoverPolicy(busy_at_start="raise"),  # the gateway's line orders the waiting
    )
    return AsyncSwarmClient(backend, load_tokenizer(model))


def coordinator_app(coordinator: Any, config: GatewayConfig | None = None) -> Starlette:
    """The gateway of a started ``CoordinatorServer``: its registry is the swarm view, and
    the client (built in a worker thread while the app starts) routes through it."""
    address = coordinator.address
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        address = f"127.0.0.1:{port}"
    model, token = str(coordinator.config.model), coordinator.config.token
    return create_app(lambda: swarm_client(address, model, token), coordinator.registry, config or GatewayConfig())
