"""A node changes the layers it hosts without a restart (control plane reassignment),
and serves routes through part of its range."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
import torch

from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_node.config import NodeConfig
from swarm_node.engine import reslice
from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import SeqChunk
from swarm_node.server import NodeServer

pytestmark = pytest.mark.timeout(120)

PROMPT = [5, 17, 33, 2, 90, 101, 7, 250, 12, 44]


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


async def node(stack: AsyncExitStack, model: Path, start: int, end: int, name: str) -> NodeServer:
    cfg = NodeConfig(model=str(model), start=start, end=end, node_id=name)
    return await stack.enter_async_context(NodeServer(cfg))


def hop(server: NodeServer, start: int, end: int) -> Hop:
    return Hop(server.address, start, end, server.config.node_id)


def reference(model: Path, prompt: list[int], n: int) -> list[int]:
    whole = load_slice(model, 0, 6)
    cache = whole.new_cache(64)
    logits = whole(torch.tensor(prompt), [SeqChunk(cache, 0, len(prompt))])[0]
    out, pos = [], len(prompt)
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = whole(torch.tensor([out[-1]]), [SeqChunk(cache, pos, 1)])[0]
        pos += 1
    return out


async def decode(s: RouteSession, first: int, n: int) -> list[int]:
    tokens = [first]
    for _ in range(n - 1):
        out = await s.decode(tokens[-1])
        assert out.token is not None
        tokens.append(out.token)
    return tokens


def test_extend_reuses_kept_blocks(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["tied"]
    old = load_slice(path, 2, 4)
    new = reslice.extend(old, path, 0, 6, dtype=torch.float32, device="cpu")
    assert new.layers[2] is old.layers[0] and new.layers[3] is old.layers[1]
    whole = load_slice(path, 0, 6)
    x = torch.tensor(PROMPT)
    a = new(x, [SeqChunk(new.new_cache(16), 0, len(PROMPT))])
    b = whole(x, [SeqChunk(whole.new_cache(16), 0, len(PROMPT))])
    assert torch.equal(a, b)
    part = reslice.view(new, 1, 3)
    assert part.layers[1] is old.layers[0] and not part.is_head and not part.is_tail
    with pytest.raises(ValueError):
        reslice.view(old, 1, 3)


async def test_routes_may_use_part_of_a_range(stack: AsyncExitStack, tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama3"]
    a, b = await node(stack, path, 0, 4, "a"), await node(stack, path, 2, 6, "b")
    want = reference(path, PROMPT, 6)
    async with RouteSession([hop(a, 0, 3), hop(b, 3, 6)], max_length=32) as s:
        out = await s.prefill(PROMPT)
        assert out.token is not None
        assert await decode(s, out.token, 6) == want
    with pytest.raises(RouteError) as err:
        async with RouteSession([hop(a, 0, 5), hop(b, 5, 6)], max_length=32):
            pass
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_reload_keeps_sessions_on_kept_layers(stack: AsyncExitStack, tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama3"]
    a, b = await node(stack, path, 0, 3, "a"), await node(stack, path, 3, 6, "b")
    want = reference(path, PROMPT, 8)
    assert a.service is not None and b.service is not None
    async with RouteSession([hop(a, 0, 3), hop(b, 3, 6)], max_length=32) as kept:
        out = await kept.prefill(PROMPT)
        assert out.token is not None
        first = await decode(kept, out.token, 3)
        # a grows to the whole model while a session runs through its old range
        await a.service.reload(0, 6)
        assert (a.service.model.start, a.service.model.end) == (0, 6)
        assert (a.service.config.start, a.service.config.end) == (0, 6)
        rest = await decode(kept, first[-1], 6)
        assert first + rest[1:] == want
        # the new range serves new sessions at once
        async with RouteSession([hop(a, 0, 6)], max_length=32) as whole:
            out = await whole.prefill(PROMPT)
            assert out.token is not None
            assert await decode(whole, out.token, 8) == want
            # b shrinks: the session that used its dropped layers ends with a clear error
            await b.service.reload(4, 6)
            with pytest.raises(RouteError) as err:
                await decode(kept, rest[-1], 2)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "reassigned" in err.value.message
            assert not b.service.sessions
