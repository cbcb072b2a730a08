"""Wire types both ends of a session share, and their protobuf form: a route's hops,
the sampling settings a generation carries, the OpenSession a sender builds, and the
gRPC status an in-band error names. No torch: the client builds these too.

The node's side of the conversion (validating what it receives) is
``swarm_node.convert``; this module only builds what a sender sends.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from swarm_proto import PROTOCOL_VERSION, swarm_pb2

__all__ = [
    "MAX_CAPABILITY",
    "Generation",
    "Hop",
    "OpenSpec",
    "SamplingParams",
    "check_address",
    "code_name",
    "hop_to_proto",
    "open_to_proto",
    "printable",
    "sampling_to_proto",
    "session_label",
    "status_code",
    "wire_code",
]


@dataclass(frozen=True)
class SamplingParams:
    """How the tail picks the next token. The defaults are greedy decoding."""

    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1.0 -> off
    repetition_penalty: float = 1.0  # 1.0 -> off
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Hop:
    address: str
    start: int
    end: int
    node_id: str = ""


@dataclass(frozen=True)
class Generation:
    """Session-wide sampling settings the tail needs beyond the sampler's own."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = 0  # 0 = unlimited
    top_logprobs: int = 0
    prompt_length: int = 0


@dataclass(frozen=True)
class OpenSpec:
    """An OpenSession, validated."""

    session_id: str
    max_length: int
    start: int
    end: int
    downstream: tuple[Hop, ...]
    generation: Generation
    wire_codec: str  # one of swarm_proto.codec.CODECS
    resumable: bool = False  # park the cache after a failure (docs/failover.md)
    resume: bool = False  # adopt the cache held under session_id
    capability: str = field(default="", repr=False)  # the session's secret: Results and resume need it


def sampling_to_proto(gen: Generation) -> swarm_pb2.SamplingParams:
    p = gen.sampling
    return swarm_pb2.SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed,
        stop_token_ids=gen.stop_token_ids,
        max_new_tokens=gen.max_new_tokens,
        top_logprobs=gen.top_logprobs,
    )


def open_to_proto(spec: OpenSpec, downstream: Sequence[Hop]) -> swarm_pb2.OpenSession:
    """The OpenSession this node sends to its successor ``downstream[0]``."""
    first = downstream[0]
    return swarm_pb2.OpenSession(
        session_id=spec.session_id,
        max_length=spec.max_length,
        downstream=[hop_to_proto(h) for h in downstream[1:]],
        sampling=sampling_to_proto(spec.generation),
        wire_dtype=spec.wire_codec,
        prompt_length=spec.generation.prompt_length,
        start=first.start,
        end=first.end,
        resumable=spec.resumable,
        resume=spec.resume,
        protocol_version=PROTOCOL_VERSION,
        capability=spec.capability,
    )


def session_label(session_id: str) -> str:
    """What the swarm publishes of a session id (load reports, events, the dashboard): a
    digest, the same on every hop, that names the session without handing out its id."""
    return "s-" + hashlib.sha256(session_id.encode()).hexdigest()[:12]


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with every non-printable one replaced: safe to
    show on a dashboard or write to a log line (peers choose these strings)."""
    cut = text[:limit]
    clean = "".join(c if c.isprintable() else "?" for c in cut)
    return clean + ("..." if len(text) > limit else "")


MAX_CAPABILITY = 128  # characters of a session capability
_GRPC_SCHEMES = frozenset({"unix", "unix-abstract", "dns", "ipv4", "ipv6", "vsock", "xds", "passthrough", "google-c2p"})
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*\.?$")


def check_address(address: str) -> str:
    """``address`` if it is ``host:port`` (an IPv4 address, ``[IPv6]`` or a DNS name, and
    a port in 1..65535), else ValueError. gRPC also dials ``unix:``, ``dns:``, ``ipv4:``
    ... targets; a peer-named address must never reach those (a node would connect to a
    local socket or resolver the caller picked, and send it the swarm token)."""
    host, sep, port = address.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ValueError(f"address {address[:80]!r} is not host:port")
    if host.lower() in _GRPC_SCHEMES:  # "unix:80" is a socket path to gRPC, not host "unix"
        raise ValueError(f"address {address[:80]!r} names a gRPC resolver, not a host")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"address {address[:80]!r}: {host[:60]!r} is not an IPv6 address") from None
        return address
    if not _HOSTNAME.match(host):
        raise ValueError(f"address {address[:80]!r}: {host[:60]!r} is neither an IPv4 address nor a host name")
    return address


def hop_to_proto(hop: Hop) -> swarm_pb2.Hop:
    return swarm_pb2.Hop(address=hop.address, start=hop.start, end=hop.end, node_id=hop.node_id)


# The one mapping between gRPC statuses and the numbers the wire carries (ErrorCode in
# swarm.proto mirrors grpc.StatusCode; tests/proto/test_stubs.py checks it).
_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def status_code(code: int | swarm_pb2.Error) -> grpc.StatusCode:
    """The gRPC status of a wire code or an in-band Error (UNKNOWN for OK and for codes
    we do not know: an error always names a failure)."""
    number = code.code if isinstance(code, swarm_pb2.Error) else code
    status = _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN if status is grpc.StatusCode.OK else status


def wire_code(status: grpc.StatusCode) -> int:
    """The number ``status`` travels as (``Error.code``, ``FailureReport.code``)."""
    return int(status.value[0])


def code_name(code: int) -> str:
    """A wire code for a log line: the status's name, or the number when it is not one."""
    status = _STATUS_BY_NUMBER.get(code)
    return status.name if status is not None else str(code)
