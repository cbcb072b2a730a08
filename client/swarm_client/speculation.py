"""Speculative decoding, the client's half: what to draft, and how much.

A verification step sends the last accepted token and ``k`` drafted tokens after it;
the route runs the ``k + 1`` positions in one forward and the tail returns the drafts
that equal its own samples plus one token of its own
(:meth:`swarm_client.remote.RouteSession.verify`, docs/speculation.md). Tokens are
therefore exactly those of one-token steps; drafting only decides how many arrive per
network round trip.

- :class:`PromptLookup` (the default drafter) proposes what followed the latest
  earlier occurrence of the history's last n-gram (prompt and output so far), longest
  n-gram first: no model, microseconds a step. It pays where the output repeats the
  prompt (rewriting code, quoting, extracting) and proposes nothing elsewhere.
- :class:`DraftModel` runs a small local model that shares the target's tokenizer
  (``--draft MODEL``) greedily for ``k`` tokens, with its own KV cache, rewound to the
  accepted history each step.
- :class:`AdaptiveK` picks ``k`` per step from the measured acceptance rate ``a`` (an
  exponential average over every draft the tail judged) and the measured time of a
  step with k drafts relative to a plain step: the ``k`` maximising expected tokens per
  step, ``(1 + a + ... + a^k)``, over that relative time (and promising at least 5% over
  a plain step, the estimates being noisy). It falls to 0 when drafting does
  not pay; at 0 it keeps judging the drafter against the tokens that
  do arrive (a "shadow" draft that is never sent), so it climbs again when the text
  turns repetitive.

Invariants: drafting never changes a token (only the tail's samples are emitted);
every piece of state here belongs to one generation (:meth:`Speculation.start`),
except the loaded draft model, which is read-only and shared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from swarm_node.engine.kv_cache import KVCache
    from swarm_node.engine.model import ModelSlice

__all__ = [
    "AdaptiveK",
    "DecodeStats",
    "DraftModel",
    "DraftSession",
    "Drafter",
    "PromptLookup",
    "Speculation",
    "SpeculativeRun",
]

logger = logging.getLogger(__name__)

DEFAULT_K = 6  # `--speculate` without a number


class DraftSession(Protocol):
    """A drafter's state for one generation."""

    async def propose(self, history: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens likely to follow ``history`` (prompt + accepted output); may be fewer or none."""
        ...

    def close(self) -> None:
        return  # (an empty body would make it abstract)


class Drafter(Protocol):
    """Where drafts come from. ``cheap``: drafting costs next to nothing, so a shadow
    draft may be judged at every step while k is 0 (else only at every 8th)."""

    cheap: bool = True

    def start(self, max_length: int) -> DraftSession: ...


# --- prompt lookup ----------------------------------------------------------------------


class PromptLookup(Drafter):
    """Drafts from the history itself: n-gram matching (``max_ngram`` down to ``min_ngram``)."""

    cheap = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def start(self, max_length: int) -> DraftSession:
        return _LookupSession(self.max_ngram, self.min_ngram)


class _LookupSession(DraftSession):
    """An index from each n-gram of the history to where its latest continuation starts,
    grown as the history grows (bounded by the history: one entry per position and n)."""

    def __init__(self, max_ngram: int, min_ngram: int) -> None:
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.seen: list[int] = []  # the history indexed so far

    def _update(self, history: Sequence[int]) -> None:
        m = len(self.seen)
        if m > len(history) or list(history[:m]) != self.seen:
            self.index = {n: {} for n in self.sizes}  # not an extension of what was indexed: start over
            self.seen, m = [], 0
        self.seen.extend(int(t) for t in history[m:])
        seen = self.seen
        # The n-gram ending just before position j continues at j (j < len: the
        # continuation exists). Later occurrences overwrite earlier ones: the latest wins.
        for j in range(max(1, m), len(seen)):
            for n in self.sizes:
                if j >= n:
                    self.index[n][tuple(seen[j - n : j])] = j

    async def propose(self, history: Sequence[int], k: int) -> list[int]:
        return self.lookup(history, k)

    def lookup(self, history: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not history:
            return []
        self._update(history)
        seen = self.seen
        for n in self.sizes:
            if n > len(seen):
                continue
            j = self.index[n].get(tuple(seen[-n:]))
            if j is not None and j < len(seen):
                return seen[j : j + k]
        return []


# --- a local draft model ----------------------------------------------------------------


class DraftModel(Drafter):
    """A small model in this process, greedy, sharing the target's tokenizer."""

    cheap = False

    def __init__(self, model: ModelSlice, vocab_size: int | None = None) -> None:
        self.model = model
        # Draft ids the target cannot take (a larger draft vocabulary) end a draft.
        self.vocab_size = vocab_size or int(model.args.vocab_size)
        self.lock = threading.Lock()  # one draft forward at a time: they share the CPU anyway

    @classmethod
    def load(cls, model: str | os.PathLike[str], *, vocab_size: int | None = None, dtype: str = "float32") -> DraftModel:
        from swarm_client.local import LocalBackend

        backend = LocalBackend.load(model, dtype=dtype)
        if vocab_size is not None and int(backend.model.args.vocab_size) != vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({backend.model.args.vocab_size} tokens) is not the target's "
                f"({vocab_size}): a draft model must share the tokenizer"
            )
        return cls(backend.model, vocab_size)

    def start(self, max_length: int) -> DraftSession:
        return _DraftModelSession(self, max_length)


class _DraftModelSession(DraftSession):
    def __init__(self, drafter: DraftModel, max_length: int) -> None:
        self.drafter = drafter
        self.max_length = max_length
        # Made on first use: a standalone cache (a pooled one may move when the pool grows).
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # the tokens whose positions the cache holds

    async def propose(self, history: Sequence[int], k: int) -> list[int]:
        if k <= 0 or not history:
            return []
        return await asyncio.to_thread(self._propose, list(history), k)

    def _propose(self, history: list[int], k: int) -> list[int]:
        import torch

        from swarm_node.engine.kv_cache import KVCache
        from swarm_node.engine.model import SeqChunk

        model = self.drafter.model
        k = min(k, self.max_length - len(history))
        if k <= 0:
            return []
        with self.drafter.lock, torch.inference_mode():
            if self.cache is None:
                a = model.args
                self.cache = KVCache(
                    a.num_layers, a.num_kv_heads, a.head_dim, self.max_length, dtype=model.dtype, device=model.device
                )
            cache = self.cache
            # Keep what the cache holds of this history; recompute from the first difference
            # (a rejected draft) on, always at least the last token for fresh logits.
            same = 0
            for a_, b_ in zip(self.cached, history):
                if a_ != b_:
                    break
                same += 1
            start = min(same, len(history) - 1)
            x = torch.tensor(history[start:], dtype=torch.int64, device=model.device)
            logits = model(x, [SeqChunk(cache, start, len(history) - start)])  # [1, V]
            tokens = list(history)
            drafts: list[int] = []
            while True:
                token = int(logits[0].argmax())
                if token >= self.drafter.vocab_size:
                    break
                drafts.append(token)
                if len(drafts) == k:
                    break
                tokens.append(token)
                x = torch.tensor([token], dtype=torch.int64, device=model.device)
                logits = model(x, [SeqChunk(cache, len(tokens) - 1, 1)])
            self.cached = tokens
        return drafts

    def close(self) -> None:
        self.cache = None


# --- how many drafts ---------------------------------------------------------------------


class AdaptiveK:
    """The number of drafts for the next step of one generation (see the module doc).

    The cost side is a table: for each k it has seen, the time of a step with k drafts
    relative to a plain step (an exponential average of clipped samples, starting from
    the prior ``1 + cost k``). A step with drafts is not a plain step plus k times a
    little: on a CPU the jump from one position to two (another kernel, another thread)
    costs more than each position after it, so no single per-position cost fits. k
    not seen yet are interpolated between seen ones, or extended from the largest seen
    with the gentler of the prior's slope and the measured one (optimistic, so larger
    k get tried and measured).
    """

    PROBE_EVERY = 16  # plain steps in a row after which a promising drafter gets one draft again

    def __init__(
        self,
        max_k: int,
        *,
        acceptance: float = 0.5,
        cost: float = 0.1,
        smoothing: float = 0.15,
        margin: float = 1.05,
        adaptive: bool = True,
        relative: dict[int, float] | None = None,
    ) -> None:
        if max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {max_k}")
        self.max_k = max_k
        self.acceptance = acceptance  # estimated chance the tail accepts a draft (given the ones before it)
        self.prior_cost = cost  # a drafted position's cost relative to a plain step, before any measurement
        self.smoothing = smoothing
        self.margin = margin  # drafts must promise this many times a plain step's rate (noise in the estimates)
        self.adaptive = adaptive
        self.step_s: float | None = None  # a step without drafts, round trip
        self.relative: dict[int, float] = dict(relative or {})  # k -> step time with k drafts / a plain step's
        self.cost_samples = 0  # steps with drafts that were timed
        self._plain = 0  # plain steps in a row

    def relative_time(self, k: int) -> float:
        """A step with ``k`` drafts over a plain step, measured or estimated."""
        if k <= 0:
            return 1.0
        if k in self.relative:
            return self.relative[k]
        points = sorted([(0, 1.0), *self.relative.items()])
        lower = max((p for p in points if p[0] < k), key=lambda p: p[0])
        upper = [p for p in points if p[0] > k]
        if not upper:  # beyond the largest seen: the gentler of the prior's slope and the seen one
            slope = min(self.prior_cost, (lower[1] - 1.0) / lower[0]) if lower[0] else self.prior_cost
            return lower[1] + slope * (k - lower[0])
        hi = min(upper, key=lambda p: p[0])
        return lower[1] + (hi[1] - lower[1]) * (k - lower[0]) / (hi[0] - lower[0])

    @property
    def cost(self) -> float:
        """The extra time per drafted position at the largest k measured (the prior if none)."""
        if not self.relative:
            return self.prior_cost
        k = max(self.relative)
        return (self.relative[k] - 1.0) / k

    def next_k(self) -> int:
        if not self.adaptive:
            return self.max_k
        a = self.acceptance
        best, best_rate, expected = 0, self.margin, 1.0
        for k in range(1, self.max_k + 1):
            expected += a**k
            rate = expected / self.relative_time(k)
            if rate > best_rate * 1.0001:
                best, best_rate = k, rate
        if best == 0 and a >= 0.5 and self._plain >= self.PROBE_EVERY and self.max_k > 0:
            best = 1  # drafts look right but dear: measure their cost again (it may have been noise)
        self._plain = 0 if best else self._plain + 1
        return best

    def judged(self, drafted: Sequence[int], produced: Sequence[int]) -> None:
        """The tail judged ``drafted``: ``produced`` is what it emitted at their positions.
        Every draft up to the first wrong one is one observation."""
        w = self.smoothing
        for d, t in zip(drafted, produced):
            hit = d == t
            self.acceptance = (1 - w) * self.acceptance + w * (1.0 if hit else 0.0)
            if not hit:
                break

    def timed(self, drafts: int, seconds: float) -> None:
        """A step with ``drafts`` drafts took ``seconds`` (round trip). Each sample is
        clipped (a stall is no cost signal) and averaged in, so one cannot swing it."""
        w = self.smoothing
        if drafts == 0:
            self.step_s = seconds if self.step_s is None else (1 - w) * self.step_s + w * seconds
        elif self.step_s is not None and self.step_s > 0:
            sample = min(1.0 + 2.0 * drafts, max(1.0, seconds / self.step_s))
            old = self.relative_time(drafts)
            self.relative[drafts] = (1 - w) * old + w * sample
            self.cost_samples += 1


@dataclass
class DecodeStats:
    """Steps and tokens of a backend's generations: how many tokens each network round
    trip (a step along the route and its result back) brought."""

    round_trips: int = 0  # steps awaited that returned tokens (the prefill's last included)
    tokens: int = 0  # tokens those steps returned (accepted drafts + the tail's own)
    drafted: int = 0  # draft tokens sent
    accepted: int = 0  # ... of which the tail accepted
    generations: int = 0

    @property
    def tokens_per_round_trip(self) -> float:
        return self.tokens / self.round_trips if self.round_trips else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> str:
        return (
            f"{self.tokens} tokens in {self.round_trips} round trips ({self.tokens_per_round_trip:.2f} tokens/round trip); "
            f"drafts: {self.accepted}/{self.drafted} accepted ({100 * self.acceptance:.0f}%)"
        )


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding settings of a backend: at most ``max_draft`` drafts a step
    from ``drafter`` (prompt lookup by default), ``adaptive`` k (else always the most)."""

    max_draft: int = DEFAULT_K
    drafter: Drafter = field(default_factory=PromptLookup)
    adaptive: bool = True
    cost: float = 0.1  # prior relative cost of one more position, until measured

    def __post_init__(self) -> None:
        if not 0 <= self.max_draft <= 64:
            raise ValueError(f"speculation drafts at most 64 tokens a step, got {self.max_draft}")

    def start(self, max_length: int, relative: dict[int, float] | None = None) -> SpeculativeRun:
        """A generation's speculation; ``relative``: an earlier generation's measured step
        times with k drafts relative to a plain step (the route's, roughly), to start from."""
        return SpeculativeRun(self, max_length, relative)


class SpeculativeRun:
    """One generation's speculation: its drafter state and its k."""

    def __init__(self, spec: Speculation, max_length: int, relative: dict[int, float] | None = None) -> None:
        self.spec = spec
        self.drafts = spec.drafter.start(max_length)
        self.k = AdaptiveK(spec.max_draft, cost=spec.cost, adaptive=spec.adaptive, relative=relative)
        self.shadow: list[int] = []  # a draft judged without being sent (while k is 0)
        self.shadow_at = 0  # history length it was drafted for
        self.steps = 0

    async def drafts_for(self, history: Sequence[int], limit: int) -> list[int]:
        """The drafts to send after ``history`` (at most ``limit``); [] for a plain step."""
        self.steps += 1
        # The first decode step goes without drafts: it times a plain step, the base
        # that the cost of a drafted position is measured against.
        k = min(self.k.next_k(), limit) if self.k.step_s is not None or not self.spec.adaptive else 0
        if k > 0:
            return await self.drafts.propose(history, k)
        if limit > 0 and (self.spec.drafter.cheap or self.steps % 8 == 0):
            self.shadow = await self.drafts.propose(history, 1)
            self.shadow_at = len(history)
        return []

    def judge(
        self, history: Sequence[int], drafted: Sequence[int], produced: Sequence[int], seconds: float | None
    ) -> None:
        """After a step: ``produced`` = the tokens it brought (now the end of ``history``),
        ``drafted`` = what it sent, ``seconds`` = its round trip (None: not a decode step)."""
        if drafted:
            self.k.judged(drafted, produced)
        elif self.shadow and self.shadow_at == len(history) - len(produced):
            self.k.judged(self.shadow, produced)
        self.shadow = []
        if seconds is not None:
            self.k.timed(len(drafted), seconds)

    def close(self) -> None:
        self.drafts.close()
        k = self.k
        logger.debug(
            "speculation: %d steps, acceptance %.2f, step time with k drafts / plain: %s (%d timed)",
            self.steps, k.acceptance, {n: round(r, 2) for n, r in sorted(k.relative.items())}, k.cost_samples,
        )
