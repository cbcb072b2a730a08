"""The node service in-process: routes of NodeServers on loopback, driven by RouteSession."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from helpers import relative_error

from swarm_client.errors import GenerationError
from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_client.routed import RoutedBackend, StaticRoutes, parse_route
from swarm_node.config import NodeConfig
from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import ModelSlice, SeqChunk
from swarm_node.engine.sampler import sample
from swarm_node.server import NodeServer
from swarm_proto import PROTOCOL_VERSION, codec, swarm_pb2, swarm_pb2_grpc
from swarm_proto.wire import SamplingParams, status_code

pytestmark = pytest.mark.timeout(120)

Route = Callable[..., Any]


@pytest.fixture
async def route(tiny_models: dict[str, Path]) -> AsyncIterator[Route]:
    """route(spans, kind=..., **config) -> (servers, hops); everything stops at teardown."""
    async with AsyncExitStack() as stack:

        async def make(spans: Sequence[tuple[int, int]], kind: str = "llama3", **config: Any) -> tuple[list[NodeServer], list[Hop]]:
            servers = []
            for start, end in spans:
                cfg = NodeConfig(model=str(tiny_models[kind]), start=start, end=end, node_id=f"n{start}", **config)
                servers.append(await stack.enter_async_context(NodeServer(cfg)))
            return servers, [Hop(s.address, s.config.start, s.config.end, s.config.node_id) for s in servers]

        yield make


def local_tokens(model: ModelSlice, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """The same generation in one process with the same sampler."""
    cache = model.new_cache(len(prompt) + n + 1)
    history = list(prompt)
    logits = model(torch.tensor(prompt), [SeqChunk(cache, 0, len(prompt))])[0]
    out = []
    for _ in range(n):
        token, _ = sample(logits, params, len(history), history)
        out.append(token)
        history.append(token)
        logits = model(torch.tensor([token]), [SeqChunk(cache, len(history) - 1, 1)])[0]
    return out


async def generate(hops: list[Hop], prompt: list[int], n: int, **kwargs: Any) -> list[int]:
    async with RouteSession(hops, max_length=len(prompt) + n + 1, **kwargs) as s:
        out = await s.prefill(prompt)
        tokens = [out.token]
        for _ in range(n - 1):
            out = await s.decode(tokens[-1])
            tokens.append(out.token)
    return [t for t in tokens if t is not None]


PROMPT = [5, 17, 33, 2, 90, 101, 7, 250, 12, 44, 3, 8]


async def test_sampled_tokens_equal_a_single_process(route: Route, tiny_models: dict[str, Path]) -> None:
    _, hops = await route([(0, 2), (2, 5), (5, 6)])
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=11)
    got = await generate(hops, PROMPT, 12, sampling=params, prefill_chunk=5)
    want = local_tokens(load_slice(tiny_models["llama3"], 0, 6), PROMPT, 12, params)
    assert got == want


async def test_return_logits_match_the_whole_model(route: Route, tiny_models: dict[str, Path]) -> None:
    _, hops = await route([(0, 3), (3, 6)], kind="qwen2")
    whole = load_slice(tiny_models["qwen2"], 0, 6)
    ref = whole(torch.tensor(PROMPT), [SeqChunk(whole.new_cache(32), 0, len(PROMPT))], all_logits=True)
    async with RouteSession(hops, max_length=32, prefill_chunk=5) as s:
        out = await s.prefill(PROMPT, return_logits=True)
    assert out.logits is not None and out.logits.shape == ref.shape
    assert relative_error(out.logits, ref) < 1e-5
    assert out.token == int(ref[-1].argmax()) and out.position == len(PROMPT)


@pytest.mark.parametrize("wire,tol", [("bf16", 2e-2), ("fp16", 2e-3), ("int8", 5e-2)])
async def test_lossy_wire_codecs_stay_close(route: Route, tiny_models: dict[str, Path], wire: str, tol: float) -> None:
    _, hops = await route([(0, 2), (2, 4), (4, 6)])
    whole = load_slice(tiny_models["llama3"], 0, 6)
    ref = whole(torch.tensor(PROMPT), [SeqChunk(whole.new_cache(32), 0, len(PROMPT))], all_logits=True)
    async with RouteSession(hops, max_length=32, wire_dtype=wire) as s:
        out = await s.prefill(PROMPT, return_logits=True)
    assert out.logits is not None
    assert relative_error(out.logits, ref) < tol


async def test_concurrent_sessions_are_batched_and_unchanged(route: Route, tiny_models: dict[str, Path]) -> None:
    servers, hops = await route([(0, 3), (3, 6)])
    prompts = [PROMPT[: 3 + i] for i in range(6)]
    params = [SamplingParams(temperature=0.7, seed=i) for i in range(6)]
    got = await asyncio.gather(*(generate(hops, p, 10, sampling=sp) for p, sp in zip(prompts, params)))
    whole = load_slice(tiny_models["llama3"], 0, 6)
    assert list(got) == [local_tokens(whole, p, 10, sp) for p, sp in zip(prompts, params)]
    stats = servers[1].scheduler.stats  # type: ignore[union-attr]
    assert stats.max_batch > 1, stats
    assert stats.batched_steps / stats.batches > 1.2
    async with grpc.aio.insecure_channel(hops[1].address) as ch:
        info = await swarm_pb2_grpc.NodeStub(ch).Info(swarm_pb2.InfoRequest())
    assert info.stats.max_batch == stats.max_batch and info.stats.steps == stats.steps
    assert info.active_sessions == 0 and info.stats.sessions_opened == 6
    assert info.protocol_version == PROTOCOL_VERSION


async def test_stop_token_and_max_new_tokens_flag_finished(route: Route) -> None:
    _, hops = await route([(0, 6)])
    async with RouteSession(hops, max_length=64, prompt_length=len(PROMPT), max_new_tokens=3) as s:
        out = await s.prefill(PROMPT)
        assert not out.finished
        out = await s.decode(out.token)  # type: ignore[arg-type]
        out = await s.decode(out.token)  # type: ignore[arg-type]
        assert out.finished  # third generated token
    async with RouteSession(hops, max_length=64) as s:
        first = (await s.prefill(PROMPT)).token
    async with RouteSession(hops, max_length=64, stop_token_ids=[first]) as s:  # type: ignore[list-item]
        assert (await s.prefill(PROMPT)).finished


async def test_top_logprobs(route: Route) -> None:
    _, hops = await route([(0, 6)])
    async with RouteSession(hops, max_length=64, top_logprobs=3) as s:
        out = await s.prefill(PROMPT)
    assert len(out.top) == 3
    assert out.top[0][0] == out.token and abs(out.top[0][1] - out.logprob) < 1e-5
    assert out.top[0][1] >= out.top[1][1] >= out.top[2][1]


# --- refusals and failures ---------------------------------------------------------------


async def test_no_room_is_resource_exhausted(route: Route) -> None:
    _, hops = await route([(0, 3), (3, 6)], max_sessions=1)
    async with RouteSession(hops, max_length=16) as first:
        await first.prefill(PROMPT[:4])
        with pytest.raises(RouteError) as err:
            async with RouteSession(hops, max_length=16):
                pass
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.busy and err.value.retry_after > 0  # busy, with a hint: not a failure
        assert "busy: 1 open, 0 waiting for their KV cache (at most 1)" in err.value.message
        out = await first.decode(3)  # the first session is untouched
        assert out.token is not None


async def test_admission_follows_kv_memory(route: Route) -> None:
    # tiny llama3 model: KV bytes per position per layer = 2 * kv_heads * head_dim * 4 (float32)
    servers, hops = await route([(0, 3), (3, 6)])
    args = servers[0].service.model.args  # type: ignore[union-attr]
    per_slot = 3 * 2 * args.num_kv_heads * args.head_dim * 4 * 64  # 3 layers, a 64-position slot
    servers, hops = await route([(0, 3), (3, 6)], kv_budget=2 * per_slot, max_length=256)
    service = servers[1].service
    assert service is not None and service.admission.budget_bytes == 2 * per_slot
    assert service.kv_tokens() == 2 * 64 and service.free_kv_tokens() == 2 * 64
    async with RouteSession(hops, max_length=40) as a, RouteSession(hops, max_length=64) as b:
        assert service.admission.reserved == 2 * per_slot and service.free_kv_tokens() == 0
        with pytest.raises(RouteError) as err:
            async with RouteSession(hops, max_length=10):
                pass
        assert err.value.busy and "KV" in err.value.message
        await a.prefill(PROMPT[:4])
        await b.prefill(PROMPT[:4])
    with pytest.raises(RouteError) as err:  # can never fit: not busy, a clear error
        async with RouteSession(hops, max_length=200):
            pass
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE and not err.value.busy
    async with RouteSession(hops, max_length=100) as c:  # two slots' worth, once the others ended
        await c.prefill(PROMPT[:4])
    assert service.admission.reserved == 0 and service.admission.sessions == 0


async def test_refusal_names_the_hop_that_refused(route: Route) -> None:
    servers, hops = await route([(0, 3), (3, 6)], max_length=64)
    tail_only = await route([(3, 6)], max_length=16)
    hops = [hops[0], tail_only[1][0]]
    with pytest.raises(RouteError) as err:
        async with RouteSession(hops, max_length=32):
            pass
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert err.value.address == hops[1].address
    # The head relays the refusal before its own session task has wound down.
    service = servers[0].service  # type: ignore[union-attr]
    for _ in range(100):
        if not service.sessions:
            break
        await asyncio.sleep(0.05)
    assert service.sessions == {}


async def test_a_write_to_a_successor_that_just_ended_names_it(route: Route) -> None:
    """The successor's call can end between the reader's verdict and a step's write
    (grpc raises InvalidStateError then): the session still ends with an in-band error
    naming the successor, never an unexpected exception (which the caller would see as
    UNKNOWN from the head, blaming nobody)."""
    from swarm_node.session import Failed

    servers, hops = await route([(0, 3), (3, 6)], max_length=64)
    service = servers[0].service  # type: ignore[union-attr]

    class Ended:
        async def write(self, request: Any) -> None:
            raise asyncio.InvalidStateError("RPC already finished")

    session = SimpleNamespace(downstream=Ended(), spec=SimpleNamespace(downstream=(hops[1],)), failure=None)
    with pytest.raises(Failed) as err:
        await service._send_downstream(session, swarm_pb2.SessionRequest())
    assert status_code(err.value.error) == grpc.StatusCode.UNAVAILABLE
    assert (err.value.error.node_address, err.value.error.node_id) == (hops[1].address, hops[1].node_id)
    verdict = swarm_pb2.Error(message="relayed", node_address="10.0.0.9:1")
    session.failure = verdict  # the reader's verdict came first: it is the one relayed
    with pytest.raises(Failed) as err:
        await service._send_downstream(session, swarm_pb2.SessionRequest())
    assert err.value.error is verdict


async def test_bad_route_is_refused_at_open(route: Route) -> None:
    _, hops = await route([(0, 3), (3, 6)])
    for bad, match in [
        ([hops[0]], "route ends at layer 3"),
        ([hops[0], Hop(hops[1].address, 2, 6)], "consecutive layers from 3"),
        ([Hop(hops[0].address, 0, 4), Hop(hops[1].address, 4, 6)], "this node hosts \\[0, 3\\)"),
    ]:
        with pytest.raises(RouteError, match=match):
            async with RouteSession(bad, max_length=16):
                pass


async def test_unreachable_successor_is_named(route: Route) -> None:
    _, hops = await route([(0, 3)])
    dead = Hop("127.0.0.1:1", 3, 6, "ghost")
    with pytest.raises(RouteError) as err:
        async with RouteSession([hops[0], dead], max_length=16, timeout=20):
            pass
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.address == "127.0.0.1:1" and err.value.node_id == "ghost"


async def test_idle_session_is_freed(route: Route) -> None:
    servers, hops = await route([(0, 3), (3, 6)], idle_timeout=0.3)
    async with RouteSession(hops, max_length=16) as s:
        out = await s.prefill(PROMPT[:4])
        await asyncio.sleep(1.2)
        assert all(not srv.service.sessions for srv in servers)  # type: ignore[union-attr]
        with pytest.raises(RouteError) as err:
            await s.decode(out.token)  # type: ignore[arg-type]
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_upstream_disconnect_frees_the_route(route: Route) -> None:
    servers, hops = await route([(0, 2), (2, 4), (4, 6)])
    s = RouteSession(hops, max_length=16)
    await s.open()
    await s.prefill(PROMPT[:4])
    assert all(len(srv.service.sessions) == 1 for srv in servers)  # type: ignore[union-attr]
    # Drop the streams without Close, as a crashed client would.
    assert s._head is not None
    s._head.cancel()
    for _ in range(200):
        if all(not srv.service.sessions for srv in servers):  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    assert all(not srv.service.sessions for srv in servers)  # type: ignore[union-attr]
    await s.close()


async def test_dead_tail_fails_the_session_and_names_it(route: Route) -> None:
    servers, hops = await route([(0, 3), (3, 6)])
    async with RouteSession(hops, max_length=32, timeout=10) as s:
        out = await s.prefill(PROMPT[:4])
        await servers[1]._server.stop(None)  # type: ignore[union-attr]  # abrupt, no drain
        with pytest.raises(RouteError) as err:
            await s.decode(out.token)  # type: ignore[arg-type]
        assert err.value.address == hops[1].address
    for _ in range(200):
        if not servers[0].service.sessions:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    assert not servers[0].service.sessions  # type: ignore[union-attr]


async def test_stop_drains_in_flight_steps(route: Route) -> None:
    servers, hops = await route([(0, 3), (3, 6)], max_length=1024)
    prompt = (PROMPT * 60)[:700]
    async with RouteSession(hops, max_length=1024, prefill_chunk=700) as s:
        pending = asyncio.ensure_future(s.prefill(prompt))
        head = servers[0].service
        assert head is not None
        while not any(sess.busy for sess in head.sessions.values()):
            await asyncio.sleep(0.001)  # until the step is in the head's scheduler
        await servers[0].stop(drain_timeout=10)
        out = await pending  # finished and forwarded before the head went away
        assert out.token is not None and out.position == 700
        with pytest.raises(RouteError):
            await s.decode(out.token)


# --- malformed messages, sent by hand ----------------------------------------------------


async def _raw_session(address: str, requests: list[swarm_pb2.SessionRequest]) -> tuple[list[swarm_pb2.SessionReply], grpc.aio.AioRpcError | None]:
    async with grpc.aio.insecure_channel(address) as ch:
        call = swarm_pb2_grpc.NodeStub(ch).Session(iter(requests))
        replies: list[swarm_pb2.SessionReply] = []
        try:
            async for reply in call:
                replies.append(reply)
        except grpc.aio.AioRpcError as exc:
            return replies, exc
        return replies, None


def _open(start: int, end: int, sid: str = "raw", **kw: Any) -> swarm_pb2.SessionRequest:
    kw.setdefault("protocol_version", PROTOCOL_VERSION)
    return swarm_pb2.SessionRequest(open=swarm_pb2.OpenSession(session_id=sid, max_length=16, start=start, end=end, **kw))


def _step(step_id: int, start_pos: int, tokens: list[int], hidden: torch.Tensor | None = None, **kw: Any) -> swarm_pb2.SessionRequest:
    msg = swarm_pb2.Step(step_id=step_id, start_pos=start_pos, tokens=tokens, **kw)
    if hidden is not None:
        msg.hidden.CopyFrom(codec.encode(hidden))
    return swarm_pb2.SessionRequest(step=msg)


H = 64  # the tiny models' hidden size
BAD_STEPS = [
    ([_step(1, 0, [1, 2], torch.zeros(2, H + 1))], grpc.StatusCode.INVALID_ARGUMENT, "does not match the expected \\[2, 64\\]"),
    ([_step(1, 0, [1, 2], torch.zeros(3, H))], grpc.StatusCode.INVALID_ARGUMENT, "does not match"),
    ([_step(1, 0, [1, 2])], grpc.StatusCode.INVALID_ARGUMENT, "hidden states missing"),
    ([_step(1, 0, [1, 2], torch.zeros(2, H, dtype=torch.int32))], grpc.StatusCode.INVALID_ARGUMENT, "expected a torch.float32"),
    ([_step(1, 0, [1, 999], torch.zeros(2, H))], grpc.StatusCode.INVALID_ARGUMENT, "token ids must be in 0..319"),
    ([_step(1, 0, [], torch.zeros(0, H))], grpc.StatusCode.INVALID_ARGUMENT, "carries no tokens"),
    ([_step(1, 3, [1], torch.zeros(1, H))], grpc.StatusCode.INVALID_ARGUMENT, "starts at position 3 but 0 positions"),
    ([_step(1, -1, [1], torch.zeros(1, H))], grpc.StatusCode.INVALID_ARGUMENT, "negative start_pos"),
    ([_step(2, 0, [1], torch.zeros(1, H)), _step(2, 1, [1], torch.zeros(1, H))], grpc.StatusCode.INVALID_ARGUMENT, "ids must increase"),
    ([_step(1, 0, [1] * 17, torch.zeros(17, H))], grpc.StatusCode.INVALID_ARGUMENT, "at most 16"),
    ([_step(1, 0, [1] * 10, torch.zeros(10, H)), _step(2, 10, [1] * 7, torch.zeros(7, H))], grpc.StatusCode.OUT_OF_RANGE, "past max_length 16"),
    ([_open(3, 6)], grpc.StatusCode.INVALID_ARGUMENT, "already open"),
]


@pytest.mark.parametrize("steps,code,match", BAD_STEPS)
async def test_bad_steps_get_a_clear_status_and_spare_other_sessions(
    route: Route, steps: list[swarm_pb2.SessionRequest], code: grpc.StatusCode, match: str
) -> None:
    servers, hops = await route([(0, 3), (3, 6)])
    async with RouteSession(hops, max_length=32) as good:
        out = await good.prefill(PROMPT[:5])
        replies, exc = await _raw_session(hops[1].address, [_open(3, 6)] + steps)
        assert exc is not None and exc.code() == code
        assert exc.details() is not None
        assert re.search(match, exc.details()), exc.details()
        assert replies[0].WhichOneof("kind") == "opened"
        assert replies[-1].WhichOneof("kind") == "error" and replies[-1].error.node_address == hops[1].address
        assert (await good.decode(out.token)).token is not None  # type: ignore[arg-type]
    assert not servers[1].service.sessions  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "first,code,match",
    [
        (_step(1, 0, [1]), grpc.StatusCode.INVALID_ARGUMENT, "first message"),
        (_open(3, 6, sid=""), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (_open(3, 6, wire_dtype="fp8"), grpc.StatusCode.INVALID_ARGUMENT, "unknown wire codec"),
        (_open(3, 6, sampling=swarm_pb2.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (_open(3, 6, sampling=swarm_pb2.SamplingParams(top_logprobs=99)), grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
        (_open(0, 6), grpc.StatusCode.FAILED_PRECONDITION, "hosts \\[3, 6\\)"),
        # A peer of another release: refused up front, both versions named.
        (_open(3, 6, protocol_version=PROTOCOL_VERSION + 1), grpc.StatusCode.FAILED_PRECONDITION,
         f"sender speaks wire protocol {PROTOCOL_VERSION + 1}, this node speaks wire protocol {PROTOCOL_VERSION}"),
        (_open(3, 6, protocol_version=0), grpc.StatusCode.FAILED_PRECONDITION,
         f"unversioned wire protocol \\(0\\), this node speaks wire protocol {PROTOCOL_VERSION}"),
    ],
)
async def test_bad_opens(route: Route, first: swarm_pb2.SessionRequest, code: grpc.StatusCode, match: str) -> None:
    _, hops = await route([(3, 6)])
    _, exc = await _raw_session(hops[0].address, [first])
    assert exc is not None and exc.code() == code
    assert re.search(match, exc.details() or ""), exc.details()


async def test_head_refuses_hidden_states(route: Route) -> None:
    _, hops = await route([(0, 6)])
    _, exc = await _raw_session(hops[0].address, [_open(0, 6), _step(1, 0, [1], torch.zeros(1, H))])
    assert exc is not None and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes tokens, not hidden states" in (exc.details() or "")


async def test_results_for_unknown_session_or_twice(route: Route) -> None:
    _, hops = await route([(0, 6)])
    async with grpc.aio.insecure_channel(hops[0].address) as ch:
        stub = swarm_pb2_grpc.NodeStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Results(swarm_pb2.ResultsRequest(session_id="nope")):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        async with RouteSession(hops, max_length=16, session_id="twice") as s:
            await s.prefill(PROMPT[:3])
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the id alone is not enough
                async for _ in stub.Results(swarm_pb2.ResultsRequest(session_id="twice")):
                    pass
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Results(swarm_pb2.ResultsRequest(session_id="twice", capability=s.capability)):
                    pass
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_swarm_token_is_required_on_every_call(route: Route) -> None:
    _, hops = await route([(0, 3), (3, 6)], token="s3cret")
    async with RouteSession(hops, max_length=16, token="s3cret") as s:  # node -> node carries it too
        assert (await s.prefill(PROMPT[:4])).token is not None
    for token in ("", "wrong"):
        with pytest.raises(RouteError) as err:
            async with RouteSession(hops, max_length=16, token=token):
                pass
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(hops[1].address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
            await swarm_pb2_grpc.NodeStub(ch).Info(swarm_pb2.InfoRequest())
        assert rpc_err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The client library carries it too: plain host:port hops (each asked its layers), then a generation.
    plain = ",".join(h.address for h in hops)
    backend = RoutedBackend(StaticRoutes(parse_route(plain), token="s3cret"), max_context=16, eos_token_ids=(), token="s3cret")
    assert len([t async for t in backend.tokens(PROMPT[:4], SamplingParams(), 3)]) == 3
    unauthorised = RoutedBackend(StaticRoutes(parse_route(plain)), max_context=16, eos_token_ids=())
    with pytest.raises(GenerationError, match="UNAUTHENTICATED|swarm token"):
        async for _ in unauthorised.tokens(PROMPT[:4], SamplingParams(), 3):
            pass


async def test_rewind_rewrites_the_cache_and_the_tail_history(route: Route) -> None:
    """A step may start before the end of what is cached (regenerate, or a replay after
    failover): the positions after it are replaced on every node, the tail's history too."""
    _, hops = await route([(0, 3), (3, 6)])
    params = SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=4)
    async with RouteSession(hops, max_length=64, sampling=params) as s:
        await s.prefill(PROMPT)
        for token in (9, 10, 11):
            await s.decode(token)
        s.position = len(PROMPT)  # go back to just after the prompt
        rewound = await s.decode(77)
    async with RouteSession(hops, max_length=64, sampling=params) as fresh:
        await fresh.prefill(PROMPT)
        want = await fresh.decode(77)
    assert (rewound.token, rewound.position) == (want.token, want.position)
    assert abs(rewound.logprob - want.logprob) < 1e-5
