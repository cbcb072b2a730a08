"""How every daemon (``swarm-node``, ``swarm-coordinator``, the standalone gateway)
starts and stops.

- ``add_log_level(add)``: the ``--log-level`` flag (``SWARM_LOG_LEVEL``), and
  ``setup_logging(level)``: our packages log at that level; every other library's
  loggers (amqtt's ``transitions.core`` state changes, grpc, uvicorn, ...) stay at
  WARNING unless the level is DEBUG, so an INFO log reads as the swarm's own story.
- ``Service``: what runs inside a daemon (servers, brokers, MQTT clients, a session along
  a route) is started and stopped as ``async with``; a start that fails stops what it
  began, so ``stop()`` must cope with a partial start.
- ``stop_event()``: an event that SIGTERM or SIGINT sets; the daemon drains and returns.
- ``announce(line)``: the one machine-readable line on stdout (``swarm-node listening on
  HOST:PORT``) that scripts and tests wait for.
- ``main(prog, parser, argv, configure, serve, errors)``: parse the flags, set up
  logging, build the daemon's config (a ``ValueError`` or ``SwarmProtoError`` there is a
  bad flag) and ``asyncio.run(serve(config, ns))``; the expected failures end the
  process with ``prog: message`` and exit status 1 instead of a traceback.

Flags themselves come from :func:`swarm_proto.flags.flag_adder` (``--x-y`` falls back to
``SWARM_X_Y``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from swarm_proto.errors import SwarmProtoError

__all__ = ["LOG_LEVELS", "OUR_LOGGERS", "Service", "add_log_level", "announce", "main", "setup_logging", "stop_event"]

C = TypeVar("C")
S = TypeVar("S", bound="Service")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The packages whose loggers follow --log-level; everything else is a third party.
OUR_LOGGERS = ("swarm_proto", "swarm_node", "swarm_client", "swarm_coordinator", "__main__")


class Service:
    """``start()`` / ``stop()`` as an async context manager (subclasses define both)."""

    async def start(self) -> object:  # what it returns (an address, say) is its own business
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: S) -> S:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def add_log_level(add: Callable[..., None]) -> None:
    """``--log-level`` through a ``flag_adder``."""
    add("--log-level", str.upper, "INFO", "logging level; DEBUG also shows other libraries' INFO lines",
        choices=LOG_LEVELS)


def setup_logging(level: str) -> None:
    """Log to stderr: our packages at ``level``, the rest at WARNING (or ``level`` when
    that is DEBUG, or quieter than WARNING)."""
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LOG_LEVELS)})")
    ours: int = getattr(logging, level.upper())
    others = ours if ours <= logging.DEBUG else max(ours, logging.WARNING)
    logging.basicConfig(level=others, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(ours)


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call it inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def announce(line: str) -> None:
    """One machine-readable line on stdout, flushed at once: scripts and tests wait for it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    configure: Callable[[argparse.Namespace], C],
    serve: Callable[[C, argparse.Namespace], Coroutine[Any, Any, None]],
    errors: tuple[type[BaseException], ...],
) -> int:
    """A daemon's whole life: flags, logging, config, serving until a signal. A bad flag
    or an expected failure (``errors``) ends the process with ``prog: message`` on
    stderr and status 1."""
    ns = parser.parse_args(argv)
    setup_logging(ns.log_level)
    try:
        config = configure(ns)
    except (ValueError, SwarmProtoError) as exc:
        raise SystemExit(f"{prog}: {exc}") from exc
    try:
        asyncio.run(serve(config, ns))
    except errors as exc:
        raise SystemExit(f"{prog}: {exc}") from exc
    return 0
