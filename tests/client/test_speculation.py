"""The client's half of speculative decoding (swarm_client.speculation): drafting by
prompt lookup, the adaptive number of drafts, the flags. No network."""

from __future__ import annotations

import asyncio

import pytest

from swarm_client import cli
from swarm_client.speculation import AdaptiveK, DecodeStats, PromptLookup, Speculation


def lookup(history: list[int], k: int, drafter: PromptLookup | None = None) -> list[int]:
    session = (drafter or PromptLookup()).start(256)
    return asyncio.run(session.propose(history, k))


def test_prompt_lookup_continues_the_latest_longest_match() -> None:
    assert lookup([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    # the 3-gram (7, 8, 9) beats the later 1-gram 9
    assert lookup([7, 8, 9, 50, 51, 6, 9, 60, 7, 8, 9], 2) == [50, 51]
    # among equal n-grams, the latest occurrence
    assert lookup([5, 6, 10, 5, 6, 11, 5, 6], 1) == [11]
    # the continuation is what exists: fewer than k near the end, none without a match
    assert lookup([1, 2, 3, 1, 2], 10) == [3, 1, 2]
    assert lookup([1, 2, 3, 4], 3) == []
    assert lookup([1, 2, 1], 0) == []
    with pytest.raises(ValueError):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_prompt_lookup_grows_its_index_and_starts_over_on_a_new_history() -> None:
    session = PromptLookup().start(256)
    history = [1, 2, 3, 9]
    assert asyncio.run(session.propose(history, 2)) == []
    history += [1, 2]
    assert asyncio.run(session.propose(history, 2)) == [3, 9]
    history += [3, 7, 1, 2, 3]
    assert asyncio.run(session.propose(history, 1)) == [7]  # the latest (1, 2, 3) went on with 7
    assert asyncio.run(session.propose([4, 4, 5, 4], 2)) == [5, 4]  # not an extension: reindexed


def test_k_follows_the_acceptance_rate_and_falls_to_zero() -> None:
    k = AdaptiveK(6)
    assert 0 < k.next_k() < 6  # the prior: drafting is worth a few tokens
    for _ in range(40):
        k.judged([1, 2, 3, 4], [1, 2, 3, 4])
    assert k.next_k() == 6 and k.acceptance > 0.95
    for _ in range(40):
        k.judged([1, 2], [5, 2])  # the first draft is wrong every time
    assert k.acceptance < 0.05 and k.next_k() == 0
    assert AdaptiveK(4, adaptive=False).next_k() == 4


def test_k_weighs_the_measured_time_of_steps_with_drafts() -> None:
    cheap, dear = AdaptiveK(8, acceptance=0.7), AdaptiveK(8, acceptance=0.7)
    for _ in range(60):
        cheap.timed(0, 0.100)  # 100 ms a step, 1 ms a drafted position (a network round trip dominates)
        cheap.timed(4, 0.104)
        dear.timed(0, 0.010)  # 10 ms a step, 5 ms a drafted position (compute dominates)
        dear.timed(4, 0.030)
    assert cheap.cost == pytest.approx(0.01, rel=0.05) and dear.cost == pytest.approx(0.5, rel=0.05)
    assert dear.relative_time(2) == pytest.approx(2.0, rel=0.05)  # between (0, 1) and (4, 3)
    assert dear.relative_time(6) == pytest.approx(3.2, rel=0.05)  # past 4: the prior's gentler slope
    assert cheap.relative_time(8) == pytest.approx(1.08, rel=0.05)  # ... or the measured one
    assert cheap.next_k() == 8 and 1 <= dear.next_k() < 4
    # one wild measurement does not swing it
    dear.timed(2, 10.0)
    assert dear.relative_time(2) < 2.5


def test_k_probes_again_when_good_drafts_looked_too_dear() -> None:
    k = AdaptiveK(4, acceptance=0.7, relative={1: 3.0})  # one draft measured at 3 plain steps
    ks = [k.next_k() for _ in range(40)]
    assert ks.count(0) >= 30 and ks.count(1) >= 2  # mostly plain, an occasional measured draft
    k.timed(0, 0.1)
    for _ in range(30):
        k.timed(1, 0.101)  # it was noise: a drafted position is cheap
    assert k.next_k() >= 2


def test_a_run_at_k_zero_judges_shadow_drafts_and_climbs_again() -> None:
    run = Speculation(max_draft=4).start(256)
    run.k.acceptance = 0.0  # drafting did not pay
    history = [1, 2, 3, 4, 5]
    for t in [1, 2, 3, 4, 5] * 6:  # the text turns repetitive
        drafts = asyncio.run(run.drafts_for(history, 10))
        if drafts:
            break
        history.append(t)
        run.judge(history, drafts, [t], 0.01)
    assert drafts, "k never climbed back"
    # nothing is drafted past what the generation may still produce
    assert asyncio.run(run.drafts_for(history, 0)) == []


def test_stats_count_tokens_per_round_trip() -> None:
    stats = DecodeStats(round_trips=4, tokens=10, drafted=8, accepted=6)
    assert stats.tokens_per_round_trip == 2.5 and stats.acceptance == 0.75
    assert "2.50 tokens/round trip" in stats.summary() and "6/8 accepted" in stats.summary()
    assert DecodeStats().tokens_per_round_trip == 0.0
    with pytest.raises(ValueError):
        Speculation(max_draft=65)


def test_the_speculate_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parse = cli.build_parser().parse_args
    assert parse(["generate", "x", "--route", "h:1"]).speculate == 0
    assert parse(["generate", "x", "--route", "h:1", "--speculate"]).speculate == 6
    assert parse(["generate", "x", "--route", "h:1", "--speculate", "3"]).speculate == 3
    assert parse(["generate", "x", "--route", "h:1", "--draft", "m"]).draft == "m"
    assert cli.main(["generate", "x", "--local", "--speculate"]) == 2
    assert "--coordinator or --route" in capsys.readouterr().err


def test_the_gateway_flag_reaches_its_config() -> None:
    import argparse

    from swarm_coordinator.http.app import GatewayConfig
    from swarm_coordinator.http.mount import add_gateway_flags, gateway_config_from_args

    parser = argparse.ArgumentParser()
    add_gateway_flags(parser)
    assert gateway_config_from_args(parser.parse_args([])).speculate == 0
    assert gateway_config_from_args(parser.parse_args(["--speculate", "4"])).speculate == 4
    with pytest.raises(ValueError):
        GatewayConfig(speculate=-1)
