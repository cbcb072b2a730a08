"""Protobuf <-> domain dataclasses for the node: the only module that reads or builds
``swarm_pb2`` messages field by field.

Every ``*_from_proto`` validates what it can know without session state and raises
``ProtocolError`` (with the gRPC status it deserves) on anything malformed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from swarm_node.config import NodeConfig
from swarm_proto import PROTOCOL_VERSION, codec, swarm_pb2
from swarm_proto.commit import MAX_K
from swarm_proto.errors import WireError
from swarm_proto.model_args import ModelArgs
from swarm_proto.wire import MAX_CAPABILITY, Generation, Hop, OpenSpec, SamplingParams, check_address, wire_code

if TYPE_CHECKING:
    from swarm_node.scheduler import BatchStats

MAX_SESSION_ID = 128
MAX_DRAFT = 64  # drafted tokens a step may carry: each is a sampled row of vocabulary size at the tail
MAX_COMMITS = 64  # commitments a step may carry: one per hop of the route before this node


class ProtocolError(Exception):
    """A received message cannot be served; carries the status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # > 0: busy (a refusal for capacity), not a failure


def busy(message: str, retry_after_s: float) -> ProtocolError:
    """A refusal for capacity: RESOURCE_EXHAUSTED with a retry hint (``Error.retry_after_ms``)."""
    return ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s=max(0.001, retry_after_s))


def invalid(message: str) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class StepIn:
    """A Step, validated and decoded. ``hidden`` is None at the head."""

    step_id: int
    start_pos: int
    tokens: torch.Tensor  # [T] int64
    hidden: torch.Tensor | None  # [T, C]
    sample: bool
    return_logits: bool
    replay: bool = False  # a failover replay: may be skipped where already cached
    draft: int = 0  # the last `draft` tokens are drafted guesses for the tail to verify (speculation)
    commits: tuple[swarm_pb2.Commitment, ...] = ()  # upstream hops' commitments, relayed
    sample_all: bool = False  # tail: sample after every position (a verifier's recomputation)
    next_token: int | None = None  # with sample_all: the token after the chunk

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class StepResult:
    """What the tail reports for one step."""

    session_id: str
    step_id: int
    position: int
    token: int | None = None
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()
    finished: bool = False
    logits: torch.Tensor | None = None  # [T, V] float32
    accepted: tuple[tuple[int, float], ...] = ()  # drafts the tail's samples confirmed, before `token`
    commits: tuple[swarm_pb2.Commitment, ...] = ()  # every hop's, head first (spot checks)
    sampled: tuple[int, ...] = ()  # sample_all: the token after each position
    sampled_logprobs: tuple[float, ...] = ()  # ... its raw log-probability
    given_logprobs: tuple[float, ...] = ()  # ... and that of the token that actually follows (NaN: unknown)


# --- sampling -----------------------------------------------------------------------


def sampling_from_proto(msg: swarm_pb2.SamplingParams) -> Generation:
    for name in ("temperature", "top_p", "repetition_penalty"):
        if not math.isfinite(getattr(msg, name)):
            raise invalid(f"sampling.{name} must be finite")
    top_p = msg.top_p if 0.0 < msg.top_p < 1.0 else 1.0
    penalty = msg.repetition_penalty if msg.repetition_penalty != 0.0 else 1.0
    if msg.top_k < 0 or msg.max_new_tokens < 0 or msg.top_logprobs < 0:
        raise invalid("sampling.top_k, max_new_tokens and top_logprobs must be >= 0")
    if msg.top_logprobs > 20:
        raise invalid(f"sampling.top_logprobs is at most 20, got {msg.top_logprobs}")
    try:
        params = SamplingParams(
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=top_p,
            repetition_penalty=penalty,
            seed=msg.seed,
        )
    except ValueError as exc:
        raise invalid(f"sampling: {exc}") from exc
    return Generation(
        sampling=params,
        stop_token_ids=tuple(msg.stop_token_ids),
        max_new_tokens=msg.max_new_tokens,
        top_logprobs=msg.top_logprobs,
    )


# --- open ---------------------------------------------------------------------------


def open_from_proto(msg: swarm_pb2.OpenSession, *, start: int, end: int, num_layers: int, max_length: int) -> OpenSpec:
    """Validate an OpenSession for a node hosting [start, end) of ``num_layers``; the
    session may ask for any part of that range (the spec carries what it asked for)."""
    if msg.protocol_version != PROTOCOL_VERSION:
        sender = f"wire protocol {msg.protocol_version}" if msg.protocol_version else "an unversioned wire protocol (0)"
        raise ProtocolError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the sender speaks {sender}, this node speaks wire protocol {PROTOCOL_VERSION}: "
            "run the same llama-swarm release on both sides",
        )
    sid = msg.session_id
    if not sid or len(sid) > MAX_SESSION_ID or not sid.isprintable():
        raise invalid(f"session_id must be 1..{MAX_SESSION_ID} printable characters")
    if not 0 < msg.max_length <= max_length:
        raise ProtocolError(
            grpc.StatusCode.OUT_OF_RANGE if msg.max_length > max_length else grpc.StatusCode.INVALID_ARGUMENT,
            f"max_length must be in 1..{max_length} on this node, got {msg.max_length}",
        )
    # A route may use part of what a node hosts (replicas overlap, or a reassignment
    # is under way); it may not use layers the node does not host.
    if not start <= msg.start < msg.end <= end:
        raise ProtocolError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"route expects layers [{msg.start}, {msg.end}) here, but this node hosts [{start}, {end})",
        )
    hops = tuple(Hop(h.address, h.start, h.end, h.node_id) for h in msg.downstream)
    expected = msg.end
    for h in hops:
        if not h.address:
            raise invalid("downstream hop without an address")
        try:
            check_address(h.address)
        except ValueError as exc:
            raise invalid(f"downstream hop: {exc}") from None
        if len(h.node_id) > MAX_SESSION_ID or not h.node_id.isprintable():
            raise invalid(f"downstream hop: node_id must be at most {MAX_SESSION_ID} printable characters")
        if h.start != expected or h.end <= h.start:
            raise invalid(f"downstream hops must cover consecutive layers from {expected}; got [{h.start}, {h.end})")
        expected = h.end
    if expected != num_layers:
        raise invalid(f"route ends at layer {expected}, the model has {num_layers}")
    try:
        wire = codec.normalize_codec(msg.wire_dtype)
    except WireError as exc:
        raise invalid(str(exc)) from exc
    gen = sampling_from_proto(msg.sampling)
    if msg.prompt_length < 0:
        raise invalid("prompt_length must be >= 0")
    gen = Generation(gen.sampling, gen.stop_token_ids, gen.max_new_tokens, gen.top_logprobs, msg.prompt_length)
    if len(msg.capability) > MAX_CAPABILITY or not msg.capability.isprintable():
        raise invalid(f"capability must be at most {MAX_CAPABILITY} printable characters")
    if msg.resume and not msg.capability:
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED, "a resume must present the session's capability")
    return OpenSpec(
        sid, msg.max_length, msg.start, msg.end, hops, gen, wire, msg.resumable, msg.resume, capability=msg.capability
    )


# --- steps --------------------------------------------------------------------------


def step_from_proto(
    msg: swarm_pb2.Step,
    *,
    is_head: bool,
    hidden_size: int,
    vocab_size: int,
    dtype: torch.dtype,
    max_tokens: int,
) -> StepIn:
    """Decode and check a Step (session-independent checks only)."""
    n = len(msg.tokens)
    if n == 0:
        raise invalid(f"step {msg.step_id} carries no tokens")
    if n > max_tokens:
        raise invalid(f"step {msg.step_id} carries {n} tokens; at most {max_tokens}")
    if msg.start_pos < 0:
        raise invalid(f"step {msg.step_id}: negative start_pos {msg.start_pos}")
    tokens = torch.tensor(msg.tokens, dtype=torch.int64)  # [T]
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise invalid(f"step {msg.step_id}: token ids must be in 0..{vocab_size - 1}")
    if not 0 <= msg.draft <= min(n - 1, MAX_DRAFT):
        raise invalid(
            f"step {msg.step_id}: draft must be in 0..{min(n - 1, MAX_DRAFT)} (drafted tokens after the first), got {msg.draft}"
        )
    if msg.draft and (not msg.sample or msg.replay):
        raise invalid(f"step {msg.step_id}: drafts are verified by sampling: they need `sample` and no `replay`")
    hidden = None
    if is_head:
        if msg.HasField("hidden"):
            raise invalid(f"step {msg.step_id}: the head takes tokens, not hidden states")
    else:
        if not msg.HasField("hidden"):
            raise invalid(f"step {msg.step_id}: hidden states missing (this node is not the head)")
        try:
            hidden = codec.decode(msg.hidden, dtype, shape=(n, hidden_size), max_elements=n * hidden_size)
        except WireError as exc:
            raise invalid(f"step {msg.step_id}: {exc}") from exc
    if len(msg.commits) > MAX_COMMITS:
        raise invalid(f"step {msg.step_id} carries {len(msg.commits)} commitments; at most {MAX_COMMITS}")
    for c in msg.commits:
        if not 0 < c.k <= MAX_K or len(c.indices) != len(c.values) or len(c.indices) > n * c.k:
            raise invalid(f"step {msg.step_id}: malformed commitment from {c.node_id or c.address or '?'}")
    next_token = msg.next_token if msg.HasField("next_token") else None
    if next_token is not None and not 0 <= next_token < vocab_size:
        raise invalid(f"step {msg.step_id}: next_token must be in 0..{vocab_size - 1}")
    return StepIn(
        msg.step_id, msg.start_pos, tokens, hidden, msg.sample, msg.return_logits, msg.replay, msg.draft,
        tuple(msg.commits), msg.sample_all, next_token,
    )


def commitment(step: StepIn, commit: tuple[list[int], list[float]], *, node_id: str, address: str, start: int, end: int) -> swarm_pb2.Commitment | None:
    """This node's commitment for ``step`` (None when it made none)."""
    indices, values = commit
    if not indices:
        return None
    k = len(indices) // step.length
    return swarm_pb2.Commitment(
        node_id=node_id, address=address, start=start, end=end, start_pos=step.start_pos, k=k,
        indices=indices, values=values,
    )


def step_to_proto(
    step: StepIn, hidden: torch.Tensor, wire_codec: str, commit: swarm_pb2.Commitment | None = None
) -> swarm_pb2.Step:
    """The Step this node forwards: same ids and flags, its own output as hidden, the
    upstream commitments with its own appended."""
    return swarm_pb2.Step(
        step_id=step.step_id,
        start_pos=step.start_pos,
        tokens=step.tokens.tolist(),
        hidden=codec.encode(hidden, wire_codec),
        sample=step.sample,
        return_logits=step.return_logits,
        replay=step.replay,
        draft=step.draft,
        commits=[*step.commits, *([commit] if commit is not None else [])],
        sample_all=step.sample_all,
        next_token=step.next_token,
    )


# --- replies ------------------------------------------------------------------------


def opened_reply(session_id: str, max_length: int, kept: Sequence[int] = (), capability: str = "") -> swarm_pb2.SessionReply:
    opened = swarm_pb2.Opened(session_id=session_id, max_length=max_length, kept=list(kept), capability=capability)
    return swarm_pb2.SessionReply(opened=opened)


def error_to_proto(
    code: grpc.StatusCode, message: str, *, address: str, node_id: str, step_id: int = 0, retry_after_s: float = 0.0
) -> swarm_pb2.Error:
    return swarm_pb2.Error(
        code=wire_code(code),
        message=message,
        node_address=address,
        node_id=node_id,
        step_id=step_id,
        retry_after_ms=max(0, math.ceil(retry_after_s * 1000)) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else 0,
    )


def result_to_proto(r: StepResult) -> swarm_pb2.Result:
    msg = swarm_pb2.Result(
        session_id=r.session_id,
        step_id=r.step_id,
        position=r.position,
        logprob=r.logprob,
        finished=r.finished,
        top=[swarm_pb2.TokenLogprob(token=t, logprob=lp) for t, lp in r.top],
        accepted=[t for t, _ in r.accepted],
        accepted_logprobs=[lp for _, lp in r.accepted],
    )
    if r.token is not None:
        msg.token = r.token
    if r.logits is not None:
        msg.logits.CopyFrom(codec.encode(r.logits))
    msg.commits.extend(r.commits)
    msg.sampled.extend(r.sampled)
    msg.sampled_logprobs.extend(r.sampled_logprobs)
    msg.given_logprobs.extend(r.given_logprobs)
    return msg


def failed_result(session_id: str, error: swarm_pb2.Error) -> swarm_pb2.Result:
    return swarm_pb2.Result(session_id=session_id, step_id=error.step_id, error=error)


# --- info ---------------------------------------------------------------------------


def node_info_to_proto(
    config: NodeConfig,
    args: ModelArgs,
    *,
    address: str,
    version: str,
    active_sessions: int,
    stats: BatchStats,
    queued: int,
    opened: int,
    refused: int,
    weight_format: str = "",
    weight_bytes: int = 0,
) -> swarm_pb2.NodeInfo:
    return swarm_pb2.NodeInfo(
        node_id=config.node_id,
        model=args.name or Path(config.model).name,
        start=config.start,
        end=config.end,
        num_layers=args.num_layers,
        device=config.resolve_device(),
        dtype=config.resolved_dtype,
        max_sessions=config.max_sessions,
        active_sessions=active_sessions,
        max_length=config.max_length,
        version=version,
        protocol_version=PROTOCOL_VERSION,
        hidden_size=args.hidden_size,
        vocab_size=args.vocab_size,
        address=address,
        weight_format=weight_format,
        weight_bytes=weight_bytes,
        stats=swarm_pb2.NodeStats(
            steps=stats.steps,
            tokens=stats.tokens,
            batches=stats.batches,
            batched_steps=stats.batched_steps,
            max_batch=stats.max_batch,
            queued_steps=queued,
            sessions_opened=opened,
            sessions_refused=refused,
        ),
    )
