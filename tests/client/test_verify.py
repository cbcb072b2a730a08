"""The spot checks' decision logic, without a network (swarm_client.verify).

- the draw: checks happen on a share ``rate`` of steps, unpredictably, and a liar is
  caught at the first check after its first lie; over many seeds the probability of
  catching it within ``n`` steps is ``1 - (1 - rate) ** n``, and the check at the end
  of every generation catches it in any case;
- the comparison: the first position where a hop's output or the next token differs
  is found, and the prompt's own tokens are never compared with samples.
"""

from __future__ import annotations

import math
import random

import pytest

from swarm_client.remote import Hop, StepOutput
from swarm_client.routed import StaticRoutes
from swarm_client.verify import Verifier, VerifyPolicy
from swarm_proto.commit import Commit
from swarm_proto.wire import SamplingParams


def _verifier(rate: float, seed: int, prompt_length: int = 4) -> Verifier:
    return Verifier(
        StaticRoutes([Hop("127.0.0.1:1", 0, 6)]), policy=VerifyPolicy(rate=rate), max_length=256,
        sampling=SamplingParams(), prompt_length=prompt_length, rng=random.Random(seed),
    )


def _steps_to_detection(v: Verifier, first_lie: int, length: int) -> int:
    """Steps from the first lie to the check that covers it (the final check at the
    end of the generation if no drawn check comes first)."""
    for step in range(first_lie, length):
        if v.want_check():
            return step - first_lie
    return length - 1 - first_lie  # the final check


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_detection_probability_over_many_seeds(rate: float) -> None:
    seeds = 4000
    first_lie, length = 3, 200  # a liar lying on 1 position in 4 lies first at position 3
    delays = [_steps_to_detection(_verifier(rate, seed), first_lie, length) for seed in range(seeds)]
    # Every generation catches it: a drawn check or the final one.
    assert max(delays) <= length - 1 - first_lie
    for n in (5, 10, 20, 40):
        expected = 1 - (1 - rate) ** (n + 1)  # a check at the lie's own step counts
        observed = sum(d <= n for d in delays) / seeds
        sigma = math.sqrt(expected * (1 - expected) / seeds)
        assert abs(observed - expected) < 5 * sigma + 1e-9, (n, observed, expected)
    mean = sum(delays) / seeds
    assert abs(mean - (1 - rate) / rate) < 0.15 * (1 / rate)


def test_draws_are_unpredictable_and_at_the_rate() -> None:
    a, b = _verifier(0.1, 1), _verifier(0.1, 2)
    draws_a = [a.want_check() for _ in range(5000)]
    draws_b = [b.want_check() for _ in range(5000)]
    assert draws_a != draws_b
    assert abs(sum(draws_a) / 5000 - 0.1) < 0.02
    assert not any(_verifier(0.0, 3).want_check() for _ in range(1000))
    with pytest.raises(ValueError):
        VerifyPolicy(rate=1.5)


def _commit(end: int, start_pos: int, rows: list[list[float]]) -> Commit:
    k = len(rows[0])
    return Commit("n", "a", end - 3, end, start_pos, k, tuple(range(k)) * len(rows), tuple(v for r in rows for v in r))


def _rows(n: int, bad: int = -1) -> list[list[float]]:
    return [[10.0, -5.0, 2.0] if i != bad else [13.0, -6.5, 2.6] for i in range(n)]


def test_compare_finds_the_first_wrong_hop_output() -> None:
    v = _verifier(0.1, 0)
    history = [5, 6, 7, 8, 9, 10, 11]  # prompt of 4, then 3 generated tokens
    v.record(StepOutput(1, 4, 9, commits=(_commit(3, 0, _rows(4)), _commit(6, 0, _rows(4, bad=2)))))
    v.record(StepOutput(2, 5, 10, commits=(_commit(3, 4, _rows(1)), _commit(6, 4, _rows(1)))))
    shadow = StepOutput(9, 6, 11, commits=(_commit(3, 0, _rows(6)), _commit(6, 0, _rows(6))), sampled=(0, 0, 0, 9, 10, 11),
                        sampled_logprobs=(0.0,) * 6, given_logprobs=(0.0,) * 6)
    d = v._compare(history, [shadow], 0, 5)
    assert d is not None and d.position == 2 and d.end == 6  # the second hop, inside the prompt
    assert d.mismatch is not None and d.mismatch.rel_err > 0.2


def _scored(commit: Commit, sampled: tuple[int, ...], gaps: tuple[float, ...]) -> StepOutput:
    """A shadow's output: its samples, each ``gap`` nats more likely to it than the main's token."""
    return StepOutput(9, 6, 11, commits=(commit,), sampled=sampled, sampled_logprobs=(-0.1,) * len(sampled),
                      given_logprobs=tuple(-0.1 - g for g in gaps))


def test_compare_checks_generated_tokens_only_and_allows_near_ties() -> None:
    v = _verifier(0.1, 0)
    history = [5, 6, 7, 8, 9, 10, 11]
    v.record(StepOutput(1, 4, 9, commits=(_commit(6, 0, _rows(6)),)))
    # The shadow's samples after prompt positions differ from the prompt: never a lie.
    honest = _scored(_commit(6, 0, _rows(6)), (1, 2, 3, 9, 10, 11), (9.0, 9.0, 9.0, 0.0, 0.0, 0.0))
    assert v._compare(history, [honest], 0, 5) is None
    # A near-tie split the other way by rounding: honest.
    tie = _scored(_commit(6, 0, _rows(6)), (1, 2, 3, 9, 12, 11), (0, 0, 0, 0, 0.3, 0))
    assert v._compare(history, [tie], 0, 5) is None
    lied = _scored(_commit(6, 0, _rows(6)), (1, 2, 3, 9, 12, 11), (0, 0, 0, 0, 8.5, 0))
    d = v._compare(history, [lied], 0, 5)
    assert d is not None and d.position == 4 and d.mismatch is None
    assert (d.main_token, d.shadow_token) == (10, 12) and d.gap == pytest.approx(8.5)


def test_rewind_forgets_what_followed() -> None:
    v = _verifier(0.1, 0)
    v.record(StepOutput(1, 4, 9, commits=(_commit(6, 0, _rows(6)),)))
    v.checked_upto = 5
    v.rewind(3)
    assert sorted(v.commits) == [0, 1, 2] and v.checked_upto == 3
