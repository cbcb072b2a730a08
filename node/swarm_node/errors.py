"""Errors raised by the node package.

    SwarmNodeError
    ├── ModelFormatError      the model files cannot be used (unknown architecture,
    │                         missing tensor, truncated or corrupt file)
    ├── SliceRangeError       a layer range outside [0, num_layers) or empty
    ├── CacheOverflowError    positions past the KV cache's max length
    └── PositionError         positions out of order (a gap in the cache)
"""

from __future__ import annotations


class SwarmNodeError(Exception):
    """Base class of every error the node package raises on purpose."""


class ModelFormatError(SwarmNodeError):
    """The model's files or metadata cannot be turned into a model slice."""


class SliceRangeError(SwarmNodeError, ValueError):
    """A requested layer range does not fit the model."""


class CacheOverflowError(SwarmNodeError, ValueError):
    """A step would write past the end of a session's KV cache."""


class PositionError(SwarmNodeError, ValueError):
    """A step's start position leaves a gap after what the cache holds."""
