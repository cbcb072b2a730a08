"""Mounting the gateway on a coordinator: its flags, and the app factory it calls.

``swarm-coordinator`` adds the gateway's flags to its parser and hands
:func:`coordinator_app` to ``CoordinatorServer(http_app=...)``::

    add_gateway_flags(parser)
    ...
    gateway = gateway_config_from_args(ns)
    server = CoordinatorServer(config, http_app=lambda c: coordinator_app(c, gateway))

The app's client (``AsyncSwarmClient.remote``, the one factory of remote clients) asks
the coordinator for routes over gRPC like any other client (so failover, reporting and
the coordinator's routing policy all apply) and reads the swarm's state and events
straight from the coordinator's registry.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from swarm_client.api import AsyncSwarmClient
from swarm_client.failover import FailoverPolicy
from swarm_client.verify import VerifyPolicy
from swarm_coordinator.http.app import GatewayConfig, create_app
from swarm_coordinator.http.guard import default_allowed_hosts
from swarm_coordinator.http.policy import load_policy
from swarm_proto.flags import flag_adder

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["add_gateway_flags", "coordinator_app", "gateway_config_from_args"]


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """``--api-key`` (repeatable), ``--api-keys-file``, ``--rate-limit-rpm/-tpm``,
    ``--queue-size``, ``--queue-timeout``, ``--model-id``, ``--max-body-bytes``, ``--max-concurrent``,
    ``--allowed-host``, ``--speculate``, ``--policy``, ``--policy-watch``, ``--audit-log``, ``--audit-log-text``;
    each falls back to its ``SWARM_<FLAG>`` environment variable
    (``SWARM_API_KEY`` holds a comma-separated list)."""
    add = flag_adder(parser.add_argument_group("HTTP gateway"))
    add("--api-key", str, None, "accept this API key on /v1 (repeatable, or comma-separated in the env var; "
        "none and no keys file: the API is open)", action="append", metavar="KEY")
    add("--api-keys-file", str, None, "file of API keys, one per line, optionally 'KEY rpm=N tpm=N'", metavar="PATH")
    add("--rate-limit-rpm", int, 0, "requests per minute per key, 0 = unlimited", metavar="N")
    add("--rate-limit-tpm", int, 0, "tokens (prompt + completion) per minute per key, 0 = unlimited", metavar="N")
    add("--queue-size", int, 64, "requests that may wait for room while the swarm is busy; one more gets 429",
        metavar="N")
    add("--queue-timeout", float, 60.0, "the longest a request waits for room before 429", metavar="SECONDS")
    add("--model-id", str, None, "the model id /v1/models lists (default: the model file's name)", metavar="NAME")
    add("--verify-rate", float, 0.05, "share of decode steps that trigger a spot check of the nodes' results "
        "on other nodes (docs/verification.md); 0 = off", metavar="P")
    add("--max-body-bytes", int, 2 << 20, "largest request body accepted; a bigger one gets 413", metavar="BYTES")
    add("--max-concurrent", int, 256, "generation requests in flight at once; one more gets 503 with Retry-After",
        metavar="N")
    add("--allowed-host", str, None, "a Host name the gateway answers to besides loopback names, the bound host and "
        "IP addresses (repeatable, or comma-separated in the env var; '*' turns the DNS-rebinding check off)",
        action="append", metavar="NAME")
    add("--speculate", int, 0, "speculative decoding for HTTP requests: draft up to K tokens a step by prompt "
        "lookup (0 = off; the tokens are the same either way)", metavar="K")
    add("--policy", str, None, "acceptable-use rules (TOML [[rule]] tables, see docs/gateway.md); reloaded on SIGHUP "
        "and when the file changes", metavar="FILE")
    add("--policy-watch", float, 1.0, "seconds between checks of the policy file for changes; 0: reload on SIGHUP only",
        metavar="SECONDS")
    add("--audit-log", str, None, "append one JSON line per generation request (decision, rule, key fingerprint, "
        "token counts, prompt hash)", metavar="FILE")
    add("--audit-log-text", _yes, False, "also write prompt and completion texts to the audit log",
        nargs="?", const=True, metavar="yes|no")


def _yes(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def gateway_config_from_args(ns: argparse.Namespace) -> GatewayConfig:
    """The gateway's config from its flags; ``allowed_hosts`` holds the defaults for the
    bound ``--host`` (loopback names, the host itself) plus ``--allowed-host``."""
    return GatewayConfig(
        model_id=getattr(ns, "model_id", None) or None,
        api_keys=tuple(getattr(ns, "api_key", None) or ()),
        api_keys_file=getattr(ns, "api_keys_file", None) or None,
        requests_per_minute=getattr(ns, "rate_limit_rpm", 0) or 0,
        tokens_per_minute=getattr(ns, "rate_limit_tpm", 0) or 0,
        queue_size=getattr(ns, "queue_size", 64),
        queue_timeout_s=getattr(ns, "queue_timeout", 60.0),
        verify_rate=getattr(ns, "verify_rate", 0.05),
        max_body_bytes=getattr(ns, "max_body_bytes", 2 << 20),
        max_concurrent=getattr(ns, "max_concurrent", 256),
        allowed_hosts=default_allowed_hosts(getattr(ns, "host", "") or "", getattr(ns, "allowed_host", None) or ()),
        speculate=getattr(ns, "speculate", 0) or 0,
        policy_file=_checked_policy(getattr(ns, "policy", None) or None),
        policy_watch_s=getattr(ns, "policy_watch", 1.0),
        audit_log=getattr(ns, "audit_log", None) or None,
        audit_log_text=_yes(str(getattr(ns, "audit_log_text", False))),
    )


def _checked_policy(path: str | None) -> str | None:
    """The policy file, validated now so that a bad one stops the daemon at start with
    its error (PolicyError names the file and the rule)."""
    if path:
        load_policy(path)
    return path


def coordinator_app(coordinator: Any, config: GatewayConfig | None = None) -> Starlette:
    """The gateway of a started ``CoordinatorServer``: its registry is the swarm view, and
    the client (built in a worker thread while the app starts) routes through it."""
    address = coordinator.address
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        address = f"127.0.0.1:{port}"
    model, token = str(coordinator.config.model), coordinator.config.token
    config = config or GatewayConfig()
    verify = VerifyPolicy(rate=config.verify_rate)
    # The daemon always checks Host: the loopback names, its bound host and the extra names.
    config = replace(
        config,
        allowed_hosts=default_allowed_hosts(coordinator.config.host, config.allowed_hosts or ()),
        warnings=(*config.warnings, *coordinator.warnings),
    )
    speculate = config.speculate

    def client() -> AsyncSwarmClient:
        # busy_at_start="raise": the gateway's line orders the generations waiting for room
        return AsyncSwarmClient.remote(
            coordinator=address, model=model, token=token, policy=FailoverPolicy(busy_at_start="raise"),
            tls=coordinator.config.tls,
            speculate=speculate, verify=verify,
        )

    app = create_app(client, coordinator.registry, config)
    registry = coordinator.registry
    app.state.gateway.metrics.watch_presence_drops(lambda: dict(registry.dropped))
    return app
