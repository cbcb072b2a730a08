"""Exceptions raised by swarm_proto.

::

    Exception
     └── SwarmProtoError          anything this package raises on purpose
          └── WireError (also ValueError)
                                  a received message is malformed or unsupported:
                                  unknown dtype or codec, wrong byte count, bad shape,
                                  too many elements. The receiver answers it with
                                  INVALID_ARGUMENT; it never means the sender's node died.
          └── ModelFormatError    a model's files or metadata cannot be used (unknown
                                  architecture, missing tensor, truncated or corrupt file)
"""

from __future__ import annotations


class SwarmProtoError(Exception):
    """Base class of every exception raised by swarm_proto."""


class WireError(SwarmProtoError, ValueError):
    """A message on the wire is malformed or uses something this side does not support."""


class ModelFormatError(SwarmProtoError):
    """The model's files or metadata cannot be turned into a model (or a slice of one)."""
