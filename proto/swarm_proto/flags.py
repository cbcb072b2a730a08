"""Command-line flags that fall back to environment variables (`--max-length` <- `SWARM_MAX_LENGTH`).

Every daemon flag is declared through :func:`flag_adder` (`swarm-node`, `swarm-coordinator`
and the gateway's flags, standalone or mounted), so the rule has no exception: flag
`--x-y` reads `SWARM_X_Y` when it is not given. A repeatable flag (`action="append"`,
such as `--api-key`) reads a comma-separated list. Start-up around the flags is
:mod:`swarm_proto.daemon`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

__all__ = ["env_name", "flag_adder"]


def env_name(flag: str) -> str:
    """The environment variable a flag falls back to."""
    return "SWARM_" + flag.lstrip("-").replace("-", "_").upper()


def flag_adder(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> Callable[..., None]:
    """`add(flag, conv, default, help, **kw)`: a flag whose default comes from its variable when set."""

    def add(flag: str, conv: Callable[[str], Any], default: Any, help: str, **kw: Any) -> None:
        env = os.environ.get(env_name(flag))
        value: Any = default
        if env is not None and kw.get("action") == "append":
            value = [conv(item.strip()) for item in env.split(",") if item.strip()] or default
        elif env is not None:
            value = env
        parser.add_argument(flag, type=conv, default=value, help=f"{help} (env {env_name(flag)})", **kw)

    return add
