"""Exceptions raised by swarm_coordinator.

::

    Exception
     └── CoordinatorError          anything this package raises on purpose
          ├── CoverageError        the swarm cannot hold every layer of the model
          │                        (``uncovered`` names the layers, ``partial`` is the
          │                        best assignment that was possible)
          ├── NoRouteError         no chain of usable nodes covers [0, L)
          │                        (``uncovered`` names the layers nobody usable hosts)
          ├── BrokerError          the embedded or external MQTT broker failed to start
          └── PolicyError          an acceptable-use policy file is invalid (names the
                                   file and the rule; ``http.policy``)

Malformed MQTT payloads are not errors here: they are logged and ignored
(:class:`swarm_proto.presence.PayloadError` never escapes the registry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from swarm_proto.presence import LayerRange

if TYPE_CHECKING:
    from swarm_coordinator.state import Assignment


def format_ranges(ranges: Sequence[LayerRange]) -> str:
    return ", ".join(str(r) for r in ranges) or "none"


class CoordinatorError(Exception):
    """Base class of every exception raised by swarm_coordinator."""


class CoverageError(CoordinatorError):
    """Not enough (memory) capacity in the swarm to hold every layer once."""

    def __init__(self, message: str, uncovered: Sequence[LayerRange], partial: Assignment) -> None:
        super().__init__(message)
        self.uncovered = tuple(uncovered)
        self.partial = partial


class NoRouteError(CoordinatorError):
    """No chain of usable nodes covers the whole model."""

    def __init__(self, message: str, uncovered: Sequence[LayerRange]) -> None:
        super().__init__(message)
        self.uncovered = tuple(uncovered)


class BrokerError(CoordinatorError):
    """An MQTT broker (embedded or external process) did not start or stop."""


class PolicyError(CoordinatorError, ValueError):
    """An acceptable-use policy file (``--policy``) cannot be used: bad TOML, an unknown
    key, a bad pattern, a classifier that does not import, a duplicate id."""
