"""What a caller asks of one generation: sampling and stopping options.

``SamplingOptions`` is the client-facing, backend-neutral request. The node's
``swarm_proto.wire.SamplingParams`` (what the tail needs per step) is derived
from it with ``to_sampling_params()`` once the seed is fixed; a request without a
seed gets a random one at the start of generation, and the result reports it, so
any run can be replayed exactly.

Defaults: greedy decoding (temperature 0), at most 256 new tokens, stop at the
model's EOS tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

from swarm_client.errors import InvalidRequestError
from swarm_proto.wire import SamplingParams

__all__ = ["SamplingOptions", "DEFAULT_MAX_TOKENS", "random_seed"]

DEFAULT_MAX_TOKENS = 256
INT32_MAX = 2**31 - 1


def random_seed() -> int:
    """A fresh seed for a request that did not give one (63 bits, JSON-safe as int)."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling and stopping options for one generation."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1.0 -> off
    repetition_penalty: float = 1.0  # 1.0 -> off
    seed: int | None = None  # None -> a random seed, reported in the result
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first match
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the model's EOS
    ignore_eos: bool = False
    logprobs: bool = False  # report the logprob of each generated token

    def __post_init__(self) -> None:
        # Accept any iterable for the tuple fields (lists from JSON or argparse).
        object.__setattr__(self, "stop", _str_tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        # What the wire carries (swarm.proto: int32 top_k and token ids, uint64 seed).
        if self.max_tokens > INT32_MAX:
            raise InvalidRequestError(f"max_tokens must be at most {INT32_MAX}, got {self.max_tokens}")
        if self.top_k > INT32_MAX:
            raise InvalidRequestError(f"top_k must be at most {INT32_MAX}, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequestError(f"seed must be in 0..2**64-1, got {self.seed}")
        if any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in 0..{INT32_MAX}")
        try:  # the sampler's own checks, one place for them
            SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        if any(s == "" for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingOptions:
        """Build from keyword arguments, rejecting unknown names clearly."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidRequestError(f"unknown sampling option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def merged(self, **overrides: Any) -> SamplingOptions:
        """A copy with the given options replaced (None values are ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        names = {f.name for f in fields(self)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise InvalidRequestError(f"unknown sampling option(s): {', '.join(unknown)}")
        return replace(self, **given)

    def with_seed(self) -> SamplingOptions:
        """A copy whose seed is fixed (a random one when none was given)."""
        return self if self.seed is not None else replace(self, seed=random_seed())

    def to_sampling_params(self) -> SamplingParams:
        """The per-step parameters the tail's sampler takes (the seed must be fixed)."""
        if self.seed is None:
            raise InvalidRequestError("fix the seed first (SamplingOptions.with_seed())")
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


def _str_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)
