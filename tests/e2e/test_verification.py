"""Spot checks against lying nodes, with real processes on loopback (docs/verification.md).

One swarm on a tiny random model (6 layers) is shared by the module: two honest
nodes per half, and liars (the test-only hook ``SWARM_TEST_LIE``) that join one at a
time, faster than the honest ones so that routes go through them::

    h1 [0, 3)   h2 [0, 3)   h3 [3, 6)   h4 [3, 6)       honest
    slight [0, 3)   gross [3, 6)   token [3, 6)          liars (1 position in 4)

Each liar must be caught by a check, quarantined by the coordinator (a ``quarantine``
event, and no route through it any more), and every generation made while it lied
must equal the one made before it joined. Checks on an honest swarm pass, also with
speculative decoding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from e2e.chaos import GREEDY, SEEDED, ChaosSwarm, EventWatch, NodeSpec, add_tokenizer, generate, prompts
from e2e.trust import Trust
from helpers import make_tiny_model

from swarm_client.speculation import PromptLookup, Speculation
from swarm_client.verify import VerifyPolicy
from swarm_proto.presence import EventKind
from swarm_proto.wire import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HONEST = [NodeSpec("h1", "0:3", 50), NodeSpec("h2", "0:3", 50), NodeSpec("h3", "3:6", 50), NodeSpec("h4", "3:6", 50)]
LIARS = [
    NodeSpec("slight", "0:3", 500, env=(("SWARM_TEST_LIE", "slight:4"),)),
    NodeSpec("gross", "3:6", 500, env=(("SWARM_TEST_LIE", "gross:4"),)),
    NodeSpec("token", "3:6", 500, env=(("SWARM_TEST_LIE", "token:4"),)),
]
MAX_NEW = 16
CASES: list[tuple[list[int], SamplingParams]] = list(zip(prompts(2), [GREEDY, SEEDED]))
CHECKED = VerifyPolicy(rate=0.25)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[ChaosSwarm]:
    tiny = add_tokenizer(make_tiny_model(tmp_path_factory.mktemp("verify-model"), "llama3"))
    s = ChaosSwarm(tiny, tmp_path_factory.mktemp("verify-swarm"), trust=trust)
    try:
        s.start(HONEST, timeout=180)
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def references(swarm: ChaosSwarm) -> list[list[int]]:
    """Every case's tokens on the honest swarm, unchecked."""

    async def run() -> list[list[int]]:
        backend = swarm.backend(verify=VerifyPolicy(rate=0.0))
        try:
            return [await generate(backend, p, params, MAX_NEW) for p, params in CASES]
        finally:
            await backend.aclose()

    return asyncio.run(run())


def test_honest_swarm_checks_pass_and_count(swarm: ChaosSwarm, references: list[list[int]]) -> None:
    async def run() -> tuple[list[list[int]], int]:
        backend = swarm.backend(verify=CHECKED)
        try:
            outs = [await generate(backend, p, params, MAX_NEW) for p, params in CASES]
            assert not backend.blames
            return outs, backend.checked_steps
        finally:
            await backend.aclose()

    outs, checked = asyncio.run(run())
    assert outs == references
    # The last check covers every position up to the last token: all of each sequence.
    assert checked >= sum(len(p) + MAX_NEW - 1 for p, _ in CASES) - 2 * len(CASES)


def test_checks_hold_with_speculative_decoding(swarm: ChaosSwarm, references: list[list[int]]) -> None:
    async def run() -> list[list[int]]:
        backend = swarm.backend(verify=CHECKED)
        backend.speculation = Speculation(max_draft=4, drafter=PromptLookup())
        try:
            outs = [await generate(backend, p, params, MAX_NEW) for p, params in CASES]
            assert not backend.blames and backend.checked_steps > 0
            return outs
        finally:
            await backend.aclose()

    assert asyncio.run(run()) == references


@pytest.mark.parametrize("liar", LIARS, ids=[s.name for s in LIARS])
def test_liar_is_caught_quarantined_and_output_unchanged(
    swarm: ChaosSwarm, references: list[list[int]], liar: NodeSpec
) -> None:
    swarm.add(liar)
    swarm.wait_nodes([liar.name], timeout=120)

    async def run() -> tuple[list[list[int]], list[str]]:
        backend = swarm.backend(verify=CHECKED)
        try:
            async with swarm.observer() as observer:
                outs = [await generate(backend, p, params, MAX_NEW) for p, params in CASES]
                caught = [b.node_id for b in backend.blames]
                # The coordinator quarantines it: an event, and routes without it from now on.
                deadline = time.monotonic() + 30
                while not _quarantined(observer, liar.name) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                assert _quarantined(observer, liar.name), f"no quarantine event for {liar.name}: {list(observer.events)}"
            for _ in range(5):
                route = await backend.routes.route(max_length=64)
                assert liar.name not in {h.node_id for h in route.hops}
            return outs, caught
        finally:
            await backend.aclose()

    outs, caught = asyncio.run(run())
    assert caught == [liar.name]
    assert outs == references


def _quarantined(observer: EventWatch, node_id: str) -> bool:
    return any(e.kind == EventKind.QUARANTINE and e.node_id == node_id for e in observer.events)
