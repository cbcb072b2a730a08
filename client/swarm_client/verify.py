"""Spot checks of a session's results, by recomputation on other nodes (docs/verification.md).

Every node of a route commits to its span's output for every step (top-k entries of
the hidden state, :mod:`swarm_proto.commit`); the tail returns the commitments with the
token. A :class:`Verifier` keeps them, per position, for the generation it watches.
After a step chosen at random (probability ``VerifyPolicy.rate``, drawn here from the
operating system's generator and never sent anywhere, so no node can tell which steps
will be checked) and after the last step, it brings a *shadow* session up to date: a
session on a route of other nodes (none of the main route's), fed the same tokens
from where it stopped, with the tail sampling after every position. One check so
covers every position since the previous one: the hidden state at every layer
boundary both routes share, and every token. Its cost over a generation is one
prefill of the sequence on the shadow route, in chunks of about ``1 / rate``
positions; the rate sets how long a wrong result can stay unchecked.

On a disagreement, the first position and boundary where the two differ are known.
A third route (without the two disputed nodes) recomputes up to that position; the
side it agrees with is right, the other node is the liar, blamed with the evidence
(:class:`Blame`). Without a third opinion the check raises :class:`VerificationError`
(neither side can be believed).

Invariants: the main route's commitments are kept per position for positions the
caller has not yet had verified, so at most ``max_length`` of them; the shadow's cache
holds exactly ``shadow.position`` positions of the main history's prefix.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swarm_client.errors import GenerationError
from swarm_client.remote import Hop, RouteError, RouteSession, StepOutput
from swarm_proto.commit import Commit, Mismatch, Tolerance, compare_at
from swarm_proto.wire import SamplingParams

if TYPE_CHECKING:
    from swarm_client.routed import RouteProvider

log = logging.getLogger(__name__)

__all__ = ["Blame", "CheckResult", "VerificationError", "Verifier", "VerifyPolicy"]


@dataclass(frozen=True)
class VerifyPolicy:
    """How often a generation's results are checked; ``rate=0`` turns checks off."""

    rate: float = 0.05  # probability that a step triggers a check of all positions since the last one
    tolerance: Tolerance = field(default_factory=Tolerance)
    timeout: float = 60.0  # a recomputation's answer
    # A generated token that differs from the verifier's sample is honest when the
    # verifier's raw log-probability of it is within this of its own choice's: the
    # two tails split a near-tie that rounding (bfloat16, batch mixes) decides.
    token_margin: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"verify rate must be in [0, 1], got {self.rate}")


class VerificationError(GenerationError):
    """Two recomputations disagree and no third opinion decides between them."""


@dataclass(frozen=True)
class Blame:
    """A node caught with a wrong result: where, what it claimed, what others computed."""

    node_id: str
    address: str
    start: int
    end: int
    position: int  # the first position whose output (or next token) is wrong
    detail: str
    claimed: tuple[float, ...]
    recomputed: tuple[float, ...]
    witnesses: tuple[str, ...]  # the node ids that agree against it
    on_main: bool  # the liar served the generation (else it was a verifier)


@dataclass(frozen=True)
class CheckResult:
    checked: int  # positions compared by this check
    blame: Blame | None = None


@dataclass(frozen=True)
class _Disagreement:
    position: int
    end: int  # layer boundary (the model's end for a token)
    main: Commit | None  # None: the next token differs
    shadow: Commit | None
    mismatch: Mismatch | None
    main_token: int = -1
    shadow_token: int = -1
    gap: float = 0.0  # the verifier's log-probability of its token minus that of the main's


class Verifier:
    """Checks one generation's main-route results against a shadow route."""

    def __init__(
        self,
        routes: RouteProvider,
        *,
        policy: VerifyPolicy,
        max_length: int,
        sampling: SamplingParams,
        prompt_length: int,
        token: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self.routes = routes
        self.policy = policy
        self.max_length = max_length
        self.sampling = sampling
        self.prompt_length = prompt_length
        self.token = token
        self.rng = rng or random.SystemRandom()
        self.commits: dict[int, dict[int, Commit]] = {}  # position -> boundary (end) -> main hop's commit
        self.checked_upto = 0  # positions [0, checked_upto) verified
        self.checked = 0  # positions compared in all
        self.excluded: set[str] = set()  # addresses never to use as verifiers (quarantined)
        self.unavailable = False  # no route of other nodes for this generation: checks are off
        self._shadow: RouteSession | None = None
        self._shadow_ids: frozenset[str] = frozenset()

    def want_check(self) -> bool:
        """Draw whether the step just taken triggers a check (secret to the nodes)."""
        return self.policy.rate > 0 and self.rng.random() < self.policy.rate

    def record(self, out: StepOutput) -> None:
        """Keep the main route's commitments of one step's positions."""
        for c in out.commits:
            for i in range(c.positions):
                self.commits.setdefault(c.start_pos + i, {})[c.end] = c

    def rewind(self, position: int) -> None:
        """The main history was cut to ``position`` tokens: forget what followed."""
        for p in [p for p in self.commits if p >= position]:
            del self.commits[p]
        self.checked_upto = min(self.checked_upto, position)
        if self._shadow is not None and self._shadow.position > position:
            self._shadow.rewind(position)

    async def check(self, history: Sequence[int], main_hops: Sequence[Hop]) -> CheckResult:
        """Compare every position from ``checked_upto`` to ``len(history) - 2`` (the
        last one the main route computed) with a recomputation on the shadow route."""
        last = len(history) - 2
        if last < self.checked_upto:
            return CheckResult(0)
        shadow = await self._shadow_for(main_hops)
        if shadow is None:  # nowhere to check: release unchecked (counted as such), and stop trying
            self.unavailable = True
            self._forget(last + 1)
            self.checked_upto = last + 1
            return CheckResult(0)
        begin = shadow.position
        try:
            outs = await shadow.recompute(history[begin : last + 1], next_token=history[last + 1], timeout=self.policy.timeout)
        except RouteError as err:  # a verifier failed (not lied): release unchecked, try another next time
            log.warning("verifier route failed (%s): positions up to %d released unchecked", err, last)
            if err.address:
                self.excluded.add(err.address)
            await self.aclose()
            self._forget(last + 1)
            self.checked_upto = last + 1
            return CheckResult(0)
        found = self._compare(history, outs, begin, last)
        first = self.checked_upto
        if found is None:
            self.checked += last + 1 - first
            self._forget(last + 1)
            self.checked_upto = last + 1
            return CheckResult(last + 1 - first)
        blame = await self._third_opinion(history, found, main_hops)
        self.checked += found.position - first
        self.checked_upto = found.position
        return CheckResult(found.position - first, blame)

    async def aclose(self) -> None:
        if self._shadow is not None:
            await self._shadow.close()
            self._shadow = None

    # --- internals ------------------------------------------------------------------

    def _forget(self, upto: int) -> None:
        for p in [p for p in self.commits if p < upto]:
            del self.commits[p]

    async def _shadow_for(self, main_hops: Sequence[Hop]) -> RouteSession | None:
        ids = {h.node_id or h.address for h in main_hops}
        if self._shadow is not None and not (ids & self._shadow_ids):
            return self._shadow
        await self.aclose()
        session = await self._open(exclude=ids, exclude_addresses={h.address for h in main_hops})
        if session is None:
            return None
        self._shadow = session
        self._shadow_ids = frozenset(h.node_id or h.address for h in session.hops)
        return session

    async def _open(self, *, exclude: Collection[str], exclude_addresses: Collection[str]) -> RouteSession | None:
        try:
            route = await self.routes.route(
                max_length=self.max_length,
                exclude_node_ids=exclude,
                exclude_addresses=set(exclude_addresses) | self.excluded,
            )
        except (RouteError, GenerationError) as err:
            log.info("no route of other nodes to check on (%s): results unchecked", err)
            return None
        session = RouteSession(
            route.hops, max_length=self.max_length, sampling=self.sampling, prompt_length=self.prompt_length,
            timeout=self.policy.timeout, token=self.token,
        )
        try:
            await session.open()
        except RouteError as err:
            await session.close()
            log.info("could not open a verifier session (%s): results unchecked", err)
            return None
        return session

    def _compare(self, history: Sequence[int], outs: Sequence[StepOutput], begin: int, last: int) -> _Disagreement | None:
        tol = self.policy.tolerance
        shadow: dict[int, dict[int, Commit]] = {}
        sampled: dict[int, tuple[int, float]] = {}  # position -> (token, log-prob gap to the main's token)
        pos = begin
        for out in outs:
            for c in out.commits:
                for i in range(c.positions):
                    shadow.setdefault(c.start_pos + i, {})[c.end] = c
            for t, slp, glp in zip(out.sampled, out.sampled_logprobs, out.given_logprobs):
                sampled[pos] = (t, math.inf if math.isnan(glp) else slp - glp)  # NaN: the main's token unknown
                pos += 1
        for p in range(self.checked_upto, last + 1):
            mine, theirs = self.commits.get(p, {}), shadow.get(p, {})
            for end in sorted(mine.keys() & theirs.keys()):
                m = compare_at(mine[end], theirs[end], [p], tol)
                if m is not None:
                    return _Disagreement(p, end, mine[end], theirs[end], m)
            generated = p + 1 >= self.prompt_length  # the prompt's own tokens were never sampled
            if generated and p in sampled and p + 1 < len(history):
                token, gap = sampled[p]
                if token != history[p + 1] and gap > self.policy.token_margin:
                    return _Disagreement(p, -1, None, None, None, history[p + 1], token, gap)
        return None

    async def _third_opinion(self, history: Sequence[int], d: _Disagreement, main_hops: Sequence[Hop]) -> Blame:
        assert self._shadow is not None
        shadow_hops = self._shadow.hops
        if d.end < 0:  # the next token: the tails disagree
            main_hop, shadow_hop = main_hops[-1], shadow_hops[-1]
        else:
            main_hop = next(h for h in main_hops if h.end == d.end)
            shadow_hop = next(h for h in shadow_hops if h.end == d.end)
        disputed = {main_hop.node_id or main_hop.address, shadow_hop.node_id or shadow_hop.address}
        third = await self._open(exclude=disputed, exclude_addresses={main_hop.address, shadow_hop.address})
        if third is None:
            raise VerificationError(f"{main_hop.address} and {shadow_hop.address} disagree at {self._describe(d)}; no third node to decide")
        try:
            outs = await third.recompute(history[: d.position + 1], next_token=history[d.position + 1], timeout=self.policy.timeout)
        finally:
            await third.close()
        witness = next((h for h in third.hops if (h.end == d.end if d.end >= 0 else h is third.hops[-1])), None)
        if d.end < 0:
            last = outs[-1] if outs else None
            token = last.sampled[-1] if last is not None and last.sampled else -2
            gap = last.sampled_logprobs[-1] - last.given_logprobs[-1] if last is not None and last.given_logprobs else math.inf
            agrees_main = token == d.main_token or gap <= self.policy.token_margin
            agrees_shadow = token == d.shadow_token
        else:
            commit = next((c for o in outs for c in o.commits if c.end == d.end and c.row(d.position) is not None), None)
            if commit is None or witness is None:
                raise VerificationError(f"disagreement at {self._describe(d)}; the third route shares no boundary to decide")
            tol = self.policy.tolerance
            assert d.main is not None and d.shadow is not None
            agrees_main = compare_at(d.main, commit, [d.position], tol) is None
            agrees_shadow = compare_at(d.shadow, commit, [d.position], tol) is None
        if agrees_main == agrees_shadow:
            raise VerificationError(f"disagreement at {self._describe(d)}; the third opinion does not settle it")
        liar, honest, on_main = (shadow_hop, main_hop, False) if agrees_main else (main_hop, shadow_hop, True)
        witnesses = tuple(h.node_id or h.address for h in (honest, witness) if h is not None)
        if d.mismatch is not None:
            m = d.mismatch
            claimed, recomputed = (m.claimed, m.recomputed) if on_main else (m.recomputed, m.claimed)
        else:
            claimed_t, recomputed_t = (d.main_token, d.shadow_token) if on_main else (d.shadow_token, d.main_token)
            claimed, recomputed = (float(claimed_t),), (float(recomputed_t),)
        self.excluded.add(liar.address)
        if not on_main:
            await self.aclose()  # the verifier lied: check again on another one
        return Blame(
            liar.node_id, liar.address, liar.start, liar.end, d.position, self._describe(d), claimed, recomputed,
            witnesses, on_main,
        )

    def _describe(self, d: _Disagreement) -> str:
        if d.mismatch is None:
            return (
                f"position {d.position}: next token {d.main_token} vs {d.shadow_token} "
                f"(log-probability gap {d.gap:.3g}, margin {self.policy.token_margin:g})"
            )
        return f"layer {d.end}, " + d.mismatch.describe(self.policy.tolerance)
