"""One session's state on a node: its KV cache and slice, its link to the successor,
and at the tail the token history and the queue of results for the client.

Speculative decoding at the tail (docs/speculation.md): a step whose last ``draft``
tokens are drafts is sampled at each of its last ``draft + 1`` positions by the
``(seed, position)`` rule; :func:`accept` keeps the samples while each equals the draft
at its position (and is no stop token, within max_new_tokens), so the tokens returned
are those one-token steps would have produced. The drafts past the accepted run stay in
the cache and the history only until the next step rewinds them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from swarm_node import convert
from swarm_node.convert import StepIn, StepResult
from swarm_node.engine.kv_cache import KVCache
from swarm_node.engine.model import ModelSlice
from swarm_node.scheduler import Job, JobOutput, Sampled, SampleRequest
from swarm_proto import swarm_pb2
from swarm_proto.wire import OpenSpec


class Failed(Exception):
    """The session must end with this in-band error (ours or relayed from downstream)."""

    def __init__(self, error: swarm_pb2.Error) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(eq=False)
class NodeSession:
    spec: OpenSpec
    cache: KVCache
    model: ModelSlice  # the layers it runs: a view of the hosted slice (see reslice)
    task: asyncio.Task[object] | None = None  # the handler of the upstream's stream
    downstream: grpc.aio.StreamStreamCall | None = None  # type: ignore[type-arg]
    reader: asyncio.Task[None] | None = None  # reads the successor's replies
    results: asyncio.Queue[swarm_pb2.Result | None] = field(default_factory=asyncio.Queue)
    subscribed: bool = False
    pending_bytes: int = 0  # bytes of the results queued for the client (bounded: NodeConfig.max_pending_*)
    results_taken: asyncio.Event = field(default_factory=asyncio.Event)  # the client read a result (backpressure)
    channel_address: str = ""  # the successor's channel this session holds in the node's pool
    history: list[int] = field(default_factory=list)  # every token so far (the tail's repetition penalty, resume checks)
    # Resumable sessions (swarm_node.resume): the activations this node sent on, and how
    # far cache, history and those activations agree (`valid`) and have been confirmed
    # by the current upstream (`verified`; a resumed session starts at 0).
    outputs: torch.Tensor | None = None  # [max_length, C], non-tail resumable sessions only
    valid: int = 0
    verified: int = 0
    kept: int = 0  # positions adopted from a held cache at open
    downstream_kept: tuple[int, ...] = ()  # the same, for every later hop
    failure: swarm_pb2.Error | None = None
    closing: bool = False
    close_sent: bool = False
    busy: bool = False
    last_step_id: int = 0
    current_step: int = 0  # the step being handled, for error reports
    steps: int = 0
    tokens: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)

    @property
    def sid(self) -> str:
        return self.spec.session_id

    def fail(self, error: swarm_pb2.Error) -> None:
        """End the session from outside its handler (downstream died, idle, shutdown)."""
        if self.failure is not None or self.closing:
            return
        self.failure = error
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def job(self, step: StepIn) -> Job:
        """The scheduler job for a validated step."""
        x = step.tokens if step.hidden is None else step.hidden
        # The token history (the tail's repetition penalty; what a resume compares): a
        # rewind -- start_pos before the end -- replaces what follows. Until the step is
        # computed, the positions from start_pos on are not trusted.
        del self.history[step.start_pos :]
        self.history.extend(step.tokens.tolist())
        self.valid = min(self.valid, step.start_pos)
        if not self.model.is_tail:
            return Job(self.cache, step.start_pos, x, model=self.model, draft=step.draft)
        request = None
        gen = self.spec.generation
        if step.sample:
            position = step.start_pos + step.length
            request = SampleRequest(gen.sampling, position, list(self.history), gen.top_logprobs, step.draft)
        every: list[SampleRequest] = []
        given: list[int] = []
        if step.sample_all:  # the token after each position, each with its own history
            for p in range(step.start_pos + 1, step.start_pos + step.length + 1):
                every.append(SampleRequest(gen.sampling, p, self.history[:p]))
            given = [*step.tokens.tolist()[1:], -1 if step.next_token is None else step.next_token]
        return Job(
            self.cache, step.start_pos, x, sample=request, return_logits=step.return_logits, model=self.model,
            draft=step.draft, sample_all=every, given=given,
        )

    def result(
        self, step: StepIn, out: JobOutput, commit: swarm_pb2.Commitment | None = None
    ) -> swarm_pb2.Result | None:
        """The tail's Result for a computed step (None when the step asked for nothing)."""
        if not (step.sample or step.return_logits):
            return None
        position = step.start_pos + step.length
        token, logprob, top = out.token, out.logprob, out.top
        accepted: tuple[Sampled, ...] = ()
        if step.draft and out.samples:
            drafts = step.tokens[step.length - step.draft :].tolist()
            first = position - step.draft  # where the first sample goes
            accepted, last = accept(out.samples, drafts, lambda i: self._finished(first + i, out.samples[i].token))
            position = first + len(accepted)
            token, logprob, top = last
        finished = token is not None and self._finished(position, token)
        r = StepResult(
            self.sid, step.step_id, position, token, logprob, top, finished, out.logits,
            tuple((s.token, s.logprob) for s in accepted),
            (*step.commits, *([commit] if commit is not None else [])),
            out.sampled, out.sampled_logprobs, out.given_logprobs,
        )
        return convert.result_to_proto(r)

    def _finished(self, position: int, token: int) -> bool:
        """A token sampled for ``position`` ends the generation (as far as the tail knows)."""
        gen = self.spec.generation
        generated = position + 1 - gen.prompt_length
        return (
            token in gen.stop_token_ids
            or (gen.max_new_tokens > 0 and gen.prompt_length > 0 and generated >= gen.max_new_tokens)
            or position >= self.spec.max_length
        )


def accept(
    samples: Sequence[Sampled], drafts: Sequence[int], ends: Callable[[int], bool]
) -> tuple[tuple[Sampled, ...], Sampled]:
    """Split the samples of a drafted step into (accepted, last).

    ``samples[i]`` is the tail's sample where ``drafts[i]`` was guessed (one more sample
    follows the last draft); ``ends(i)`` tells whether sample i ends the generation. A
    sample is accepted while it equals its draft and does not end the generation; the
    first one that does not qualify is ``last``, the token the step returns."""
    assert len(samples) == len(drafts) + 1, (len(samples), len(drafts))
    i = 0
    while i < len(drafts) and samples[i].token == drafts[i] and not ends(i):
        i += 1
    return tuple(samples[:i]), samples[i]
