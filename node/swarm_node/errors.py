"""Errors raised by the node package.

    SwarmNodeError
    ├── SliceRangeError       a layer range outside [0, num_layers) or empty
    ├── CacheOverflowError    positions past the KV cache's max length
    └── PositionError         positions out of order (a gap in the cache)

A model whose files cannot be used raises ``swarm_proto.errors.ModelFormatError``
(re-exported here): reading a model's shape is shared by every package.
"""

from __future__ import annotations

from swarm_proto.errors import ModelFormatError

__all__ = ["CacheOverflowError", "ModelFormatError", "PositionError", "SliceRangeError", "SwarmNodeError"]


class SwarmNodeError(Exception):
    """Base class of every error the node package raises on purpose."""


class SliceRangeError(SwarmNodeError, ValueError):
    """A requested layer range does not fit the model."""


class CacheOverflowError(SwarmNodeError, ValueError):
    """A step would write past the end of a session's KV cache."""


class PositionError(SwarmNodeError, ValueError):
    """A step's start position leaves a gap after what the cache holds."""
