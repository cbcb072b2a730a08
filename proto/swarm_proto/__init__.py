"""llama-swarm wire protocol: ``swarm.proto``, its generated stubs and the tensor codec.

Imports stay light: ``swarm_pb2`` / ``swarm_pb2_grpc`` need only protobuf and grpcio,
and the torch-based codec lives in ``swarm_proto.codec`` (import it explicitly).
"""

from __future__ import annotations

import functools

from swarm_proto.errors import SwarmProtoError, WireError

# Bumped on any change that an older peer would misread (not on additive fields).
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "SwarmProtoError", "WireError", "version"]


@functools.cache
def version() -> str:
    """The installed llama-swarm release ("unknown" when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("llama-swarm")
    except PackageNotFoundError:
        return "unknown"
