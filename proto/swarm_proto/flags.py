"""Command-line flags that fall back to environment variables (`--max-length` <- `SWARM_MAX_LENGTH`).

Shared by the daemons' CLIs (`swarm-node`, `swarm-coordinator`)."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable


def env_name(flag: str) -> str:
    """The environment variable a flag falls back to."""
    return "SWARM_" + flag.lstrip("-").replace("-", "_").upper()


def flag_adder(parser: argparse.ArgumentParser) -> Callable[..., None]:
    """`add(flag, conv, default, help, **kw)`: a flag whose default comes from its variable when set."""

    def add(flag: str, conv: Callable[[str], Any], default: Any, help: str, **kw: Any) -> None:
        env = os.environ.get(env_name(flag))
        value = default if env is None else env
        parser.add_argument(flag, type=conv, default=value, help=f"{help} (env {env_name(flag)})", **kw)

    return add
