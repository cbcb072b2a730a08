"""llama-swarm wire protocol: ``swarm.proto``, its generated stubs and the tensor codec.

Imports stay light: ``swarm_pb2`` / ``swarm_pb2_grpc`` need only protobuf and grpcio,
and the torch-based codec lives in ``swarm_proto.codec`` (import it explicitly).
"""

from __future__ import annotations

from swarm_proto.errors import SwarmProtoError, WireError

# Bumped on any change that an older peer would misread (not on additive fields).
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "SwarmProtoError", "WireError"]
