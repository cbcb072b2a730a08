"""The public result types of a generation, the same for every backend.

A backend (in-process ``LocalBackend``, or the swarm) only has to be a
``TokenSource``: given prompt ids and per-step sampling parameters it yields
``SampledToken``s until it is closed. Backends subclass their protocol, which
declares the optional capabilities with no-op defaults. Everything above that -- detokenizing,
stop strings, EOS, max tokens, timing, the final ``GenerationResult`` -- is shared
(``swarm_client.api.StreamAssembler``), so both backends return the same thing.
``AsyncTokenSource`` is the same contract with an async iterator.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from swarm_proto.wire import SamplingParams

__all__ = [
    "FinishReason",
    "SampledToken",
    "Timing",
    "GenerationResult",
    "StreamEvent",
    "TokenSource",
    "AsyncTokenSource",
]

# "stop": an EOS/stop token or a stop string ended the text; "length": max_tokens
# (or the model's context) ran out.
FinishReason = Literal["stop", "length", "content_filter"]  # content_filter: the gateway's policy stopped it


@dataclass(frozen=True)
class SampledToken:
    """One token as the tail sampled it."""

    token_id: int
    logprob: float
    checked: int = 0  # positions of this generation verified by spot checks so far (docs/verification.md)


@dataclass(frozen=True)
class Timing:
    """Wall-clock timing of one generation, measured by the client."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float  # request start -> first token (prefill + one hop)
    total_s: float  # request start -> last token

    @property
    def decode_s(self) -> float:
        return max(self.total_s - self.time_to_first_token_s, 0.0)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_s

    @property
    def prefill_tokens_per_s(self) -> float:
        if self.time_to_first_token_s <= 0:
            return 0.0
        return self.prompt_tokens / self.time_to_first_token_s


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one generation.

    ``token_ids`` holds every token the model produced, including a final EOS or
    the tokens that spelled a stop string; ``text`` is the decoded text, cut
    before the stop string and without special tokens.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_token_ids: tuple[int, ...]
    seed: int
    timing: Timing
    logprobs: tuple[float, ...] | None = None  # one per token id when asked for
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    checked_steps: int = 0  # positions recomputed on other nodes and found equal (spot checks)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class StreamEvent:
    """One step of a streamed generation.

    ``text`` is the new text since the previous event (possibly "" while a
    multi-byte character or a possible stop string is held back). The last event
    has ``finish_reason`` and ``result`` set.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None


@runtime_checkable
class TokenSource(Protocol):
    """What a backend provides: tokens, one at a time, for one sequence.

    ``tokens()`` prefills ``prompt_ids`` and then yields the token sampled at
    each following position (position = number of tokens before it), feeding
    each back in, for at most ``max_new_tokens`` tokens. The consumer stops early
    by closing the generator, which must free the session's resources.
    ``max_context`` is the longest sequence (prompt + generated) it can hold.

    Optional capabilities have no-op defaults here, which a backend inherits by
    subclassing the protocol: ``failovers`` (sessions reopened after a failure; 0 for
    a backend that never fails over), ``avoided_nodes()`` (nodes avoided after
    failures) and ``close()``. ``is_async`` tells this contract
    from ``AsyncTokenSource``'s.
    """

    is_async: ClassVar[bool] = False

    @property
    def max_context(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> Generator[SampledToken, None, None]: ...

    @property
    def failovers(self) -> int:
        return 0

    def avoided_nodes(self) -> int:
        """Nodes this backend avoids after failures (never for being busy); 0 without routes."""
        return 0

    def close(self) -> None:
        """Free what the backend holds (channels, threads, the model)."""
        return  # (an empty body would make it abstract)


@runtime_checkable
class AsyncTokenSource(Protocol):
    """``TokenSource`` for asyncio backends: ``tokens()`` is an async generator,
    and ``aclose()`` on it must free the session. Optional capabilities as in
    ``TokenSource``, with ``aclose()`` for ``close()``."""

    is_async: ClassVar[bool] = True

    @property
    def max_context(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> AsyncGenerator[SampledToken, None]: ...

    @property
    def failovers(self) -> int:
        return 0

    def avoided_nodes(self) -> int:
        """Nodes this backend avoids after failures (never for being busy); 0 without routes."""
        return 0

    async def aclose(self) -> None:
        """Free what the backend holds (channels, background reports)."""
        return  # (an empty body would make it abstract)
