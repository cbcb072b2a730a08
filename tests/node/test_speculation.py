"""Speculative decoding through real node servers in-process (gRPC on loopback), on a
tiny float32 model: the tokens are those of decoding without speculation, whatever the
drafts were, for greedy and seeded sampling, across concurrent sessions; rejected
drafts are rewound on every node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import torch
from helpers import Oracle

from swarm_client.api import AsyncSwarmClient
from swarm_client.errors import GenerationError
from swarm_client.remote import Hop, RouteSession
from swarm_client.routed import RoutedBackend, StaticRoutes
from swarm_client.speculation import DraftModel, Speculation
from swarm_client.tokenizer import Tokenizer
from swarm_node.config import NodeConfig
from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import SeqChunk
from swarm_node.scheduler import Sampled
from swarm_node.server import NodeServer
from swarm_node.session import accept
from swarm_proto.wire import SamplingParams

pytestmark = pytest.mark.timeout(180)

PROMPTS = [[5, 17, 33, 2, 90, 101, 7, 250, 12, 44, 3, 8], [9, 9, 40, 41, 42, 9, 9, 40], [300, 12, 77]]
GREEDY = SamplingParams(repetition_penalty=1.3)
SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=77)
PLAIN = SamplingParams()  # greedy without a penalty: a random model falls into loops
MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama3"]


@pytest.fixture
async def hops(tiny: Path) -> AsyncIterator[list[Hop]]:
    async with AsyncExitStack() as stack:
        servers = []
        for start, end in ((0, 2), (2, 4), (4, 6)):
            cfg = NodeConfig(model=str(tiny), start=start, end=end, node_id=f"n{start}", dtype="float32")
            servers.append(await stack.enter_async_context(NodeServer(cfg)))
        yield [Hop(s.address, s.config.start, s.config.end, s.config.node_id) for s in servers]


def backend(hops: list[Hop], speculation: Speculation | None = None) -> RoutedBackend:
    return RoutedBackend(StaticRoutes(hops), max_context=512, eos_token_ids=(), speculation=speculation)


async def generate(b: RoutedBackend, prompt: list[int], params: SamplingParams, n: int = MAX_NEW) -> list[int]:
    return [t.token_id async for t in b.tokens(prompt, params, n)]


async def test_speculation_yields_the_tokens_of_plain_decoding(hops: list[Hop]) -> None:
    plain = backend(hops)
    cases = [(p, params) for p in PROMPTS for params in (GREEDY, SEEDED, PLAIN)]
    want = [await generate(plain, p, params) for p, params in cases]
    assert plain.decode_stats.tokens_per_round_trip == 1.0
    for every in (2, 3, 5):  # different patterns of refusals
        oracle = Oracle({tuple(p): w for (p, params), w in zip(cases, want) if params is SEEDED}, every)
        spec = backend(hops, Speculation(max_draft=4, drafter=oracle, adaptive=False))
        for (p, params), w in zip(cases, want):
            if params is SEEDED:
                assert await generate(spec, p, params) == w, (p, every)
        assert spec.decode_stats.accepted > 0 and spec.decode_stats.drafted > spec.decode_stats.accepted
        assert spec.decode_stats.tokens_per_round_trip > 1.3
    # the default drafter, prompt lookup, on every case
    lookup = backend(hops, Speculation(max_draft=6, adaptive=False))  # (adaptive k hangs on timings)
    got = [await generate(lookup, p, params) for p, params in cases]
    assert got == want
    stats = lookup.decode_stats
    assert stats.drafted > 0 and stats.accepted > 0, stats
    await plain.aclose()
    await lookup.aclose()


async def test_eight_concurrent_speculative_sessions_are_batched_and_unchanged(hops: list[Hop]) -> None:
    prompts = [PROMPTS[i % 3][: 3 + i] for i in range(8)]
    params = [SamplingParams(temperature=0.8 * (i % 2), repetition_penalty=1.1, seed=i) for i in range(8)]
    plain = backend(hops)
    want = await asyncio.gather(*(generate(plain, p, sp, 16) for p, sp in zip(prompts, params)))
    oracle = Oracle({tuple(p): w for p, w in zip(prompts, want)}, every=4)
    spec = backend(hops, Speculation(max_draft=3, drafter=oracle, adaptive=False))
    got = await asyncio.gather(*(generate(spec, p, sp, 16) for p, sp in zip(prompts, params)))
    assert list(got) == list(want)
    assert spec.decode_stats.tokens_per_round_trip > 1.3


async def test_rejected_drafts_are_rewound_on_every_node(hops: list[Hop], tiny: Path) -> None:
    """A step with drafts that are all wrong, then plain steps: the logits of the
    positions after it equal a run that never saw the drafts."""
    whole = load_slice(tiny, 0, 6, dtype=torch.float32)
    prompt = PROMPTS[0]
    async with RouteSession(hops, max_length=64) as s:
        out = await s.prefill(prompt)
        first = out.token
        assert first is not None
        wrong = [(first + 1) % 320, 7, 7, 7]
        out = await s.verify(first, wrong)
        assert out.accepted == () and out.position == len(prompt) + 1
        assert s.position == len(prompt) + 1
        second = out.token
        assert second is not None
        # position len(prompt) + 1 holds a draft in every cache until this step rewinds it
        out = await s._wait(await s._send([second], sample=False, return_logits=True))
    ids = [*prompt, first, second]
    ref = whole(torch.tensor(ids), [SeqChunk(whole.new_cache(64), 0, len(ids))], all_logits=True)
    assert out.logits is not None
    assert torch.allclose(out.logits[-1], ref[-1], atol=1e-4, rtol=1e-4)
    assert second == int(ref[-2].argmax())


async def test_a_step_with_bad_drafts_is_refused(hops: list[Hop]) -> None:
    async with RouteSession(hops, max_length=64) as s:
        out = await s.prefill(PROMPTS[0])
        assert out.token is not None
        future = await s._send([out.token, 3], sample=True, return_logits=False, replay=True, draft=1)
        assert future is not None
        with pytest.raises(GenerationError) as err:
            await s._wait(future)
        assert "INVALID_ARGUMENT" in str(err.value) and "draft" in str(err.value)


def test_accept_stops_at_the_first_difference_and_at_the_end() -> None:
    def s(*tokens: int) -> tuple[Sampled, ...]:
        return tuple(Sampled(t, -float(t)) for t in tokens)

    never = lambda i: False
    assert accept(s(4, 5, 6), [4, 5], never) == (s(4, 5), Sampled(6, -6.0))  # all accepted + bonus
    assert accept(s(4, 9, 6), [4, 5], never) == (s(4), Sampled(9, -9.0))  # second refused
    assert accept(s(1, 5, 6), [4, 5], never) == ((), Sampled(1, -1.0))  # first refused
    # an accepted stop token ends the run there, as one-token steps would end
    assert accept(s(4, 5, 6), [4, 5], lambda i: i == 0) == ((), Sampled(4, -4.0))


async def test_a_draft_model_sharing_the_tokenizer_drafts_what_the_tail_accepts(hops: list[Hop], tiny: Path) -> None:
    """The target itself as its own draft model: greedy drafts are what greedy sampling
    picks, so nearly every draft is accepted; with sampling they may not be, and the
    tokens stay those of plain decoding."""
    drafter = DraftModel(load_slice(tiny, 0, 6, dtype=torch.float32))
    plain = backend(hops)
    for params in (PLAIN, SEEDED):
        spec = backend(hops, Speculation(max_draft=4, drafter=drafter, adaptive=params is SEEDED))
        assert await generate(spec, PROMPTS[0], params) == await generate(plain, PROMPTS[0], params)
        if params is PLAIN:
            stats = spec.decode_stats
            assert stats.accepted > 0.9 * stats.drafted and stats.tokens_per_round_trip > 3, stats


class Words:
    """A word tokenizer for the tiny model: token i is " w<i>"."""

    bos_token_id, eos_token_id, chat_template = 1, 2, None

    def __len__(self) -> int:
        return 320

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids)


async def test_eos_stop_strings_and_max_tokens_inside_an_accepted_run_stop_where_plain_decoding_stops(
    hops: list[Hop],
) -> None:
    """Drafts that run past the end: the caller's stop conditions cut the accepted run
    at exactly the token where one-token steps would have stopped."""
    prompt = PROMPTS[1]
    reference = await generate(backend(hops), prompt, PLAIN, 24)
    stop_token = reference[9]
    stop_text = f" w{reference[6]}"
    oracle = Oracle({tuple(prompt): reference}, every=50)  # nearly every draft right: runs of 5
    tokenizer = Tokenizer(Words(), source="words")  # type: ignore[arg-type]
    cases: list[dict[str, object]] = [{"max_tokens": 7}, {"max_tokens": 24, "stop": [stop_text]}, {"max_tokens": 24}]
    for eos in ((stop_token,), ()):
        plain = AsyncSwarmClient(RoutedBackend(StaticRoutes(hops), max_context=512, eos_token_ids=eos), tokenizer)
        spec = AsyncSwarmClient(
            RoutedBackend(StaticRoutes(hops), max_context=512, eos_token_ids=eos,
                          speculation=Speculation(max_draft=5, drafter=oracle, adaptive=False)),
            tokenizer,
        )  # fmt: skip
        for opts in cases:
            want, got = await plain.generate(prompt, **opts), await spec.generate(prompt, **opts)
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), opts
            assert want.num_tokens < 24 or not eos, opts  # something did stop it early
        assert spec.backend.decode_stats.tokens_per_round_trip > 2  # type: ignore[attr-defined]


def test_a_draft_model_must_share_the_vocabulary(tiny: Path) -> None:
    drafter = DraftModel.load(tiny, vocab_size=320)
    assert drafter.model.is_head and drafter.model.is_tail and drafter.model.dtype == torch.float32
    with pytest.raises(ValueError, match="share the tokenizer"):
        DraftModel.load(tiny, vocab_size=49152)


async def test_node_metrics_count_verify_steps_and_drafted_tokens(tiny: Path) -> None:
    from swarm_node.metrics import NodeMetrics

    config = NodeConfig(model=str(tiny), start=0, end=6, node_id="m", dtype="float32")
    async with NodeServer(config) as server:
        metrics = NodeMetrics("m")
        metrics.attach(server)
        async with RouteSession([Hop(server.address, 0, 6, "m")], max_length=64) as s:
            out = await s.prefill(PROMPTS[0])
            assert out.token is not None
            await s.verify(out.token, [7, 8, 9])
    value = metrics.registry.get_sample_value
    assert value("swarm_node_steps_total", {"phase": "verify"}) == 1
    assert value("swarm_node_tokens_total", {"phase": "verify"}) == 4
    assert value("swarm_node_drafted_tokens_total") == 3
    assert value("swarm_node_sampled_tokens_total") == 1 + 4  # the prefill's and the verify's 4 rows
