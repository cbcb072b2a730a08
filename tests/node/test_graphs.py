"""Decode graphs (engine/graphs.py): buckets, padding, static buffers and recapture,
run on the CPU through the fake graph (the same path without capture); and on CUDA,
captured graphs against eager decode (skipped without CUDA)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from helpers import relative_error

from swarm_node.engine import kv_cache
from swarm_node.engine.graphs import BATCH_BUCKETS, batch_bucket, length_bucket
from swarm_node.engine.kv_cache import KVCache
from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import ModelSlice, SeqChunk


def test_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 13, 16, 17, 33, 64)] == [1, 2, 4, 8, 12, 16, 16, 24, 48, 64]
    assert batch_bucket(65) is None
    assert batch_bucket(3, (2, 6)) == 6
    assert [length_bucket(e, 1024) for e in (1, 64, 65, 129, 700)] == [64, 64, 128, 256, 1024]
    assert length_bucket(300, 320) == 320  # never past the slot
    assert BATCH_BUCKETS == tuple(sorted(BATCH_BUCKETS))


def _decode(model: ModelSlice, prompts: list[torch.Tensor], caches: list[KVCache], steps: int) -> torch.Tensor:
    """Prefill all prompts in one forward, then `steps` greedy batched decode steps: [steps + 1, B, V]."""
    logits = model(torch.cat(prompts), [SeqChunk(c, 0, len(p)) for c, p in zip(caches, prompts)])
    rows = [logits]
    for _ in range(steps):
        logits = model(logits.argmax(-1), [SeqChunk(c, c.length, 1) for c in caches])
        rows.append(logits)
    return torch.stack(rows)


def _decode_two(head: ModelSlice, tail: ModelSlice, prompts: list[torch.Tensor], cache: int, steps: int) -> torch.Tensor:
    """`_decode` through a head slice and a tail slice (hidden states between them)."""
    hc, tc = [head.new_cache(cache) for _ in prompts], [tail.new_cache(cache) for _ in prompts]
    h = head(torch.cat(prompts), [SeqChunk(c, 0, len(p)) for c, p in zip(hc, prompts)], all_logits=True)
    logits = tail(h, [SeqChunk(c, 0, len(p)) for c, p in zip(tc, prompts)])
    rows = [logits]
    for _ in range(steps):
        h = head(logits.argmax(-1), [SeqChunk(c, c.length, 1) for c in hc])
        logits = tail(h, [SeqChunk(c, c.length, 1) for c in tc])
        rows.append(logits)
    return torch.stack(rows)


def test_fake_graph_decode_equals_eager(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 1, 3 and 5 sequences of unequal lengths (padded to buckets 1, 4 and 8,
    keys padded to 64 or 128), across a length bucket's edge: same logits as eager,
    same tokens; a pool that grows drops the graphs and the step after is right too."""
    # New pool memory is NaN: a graph's padded keys and rows must never reach a result.
    monkeypatch.setattr(
        kv_cache, "_uninitialized", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    eager = load_slice(tiny_models["llama3"], 0, 6)
    graphed = load_slice(tiny_models["llama3"], 0, 6)
    graphed.graph_mode = "fake"
    gen = torch.Generator().manual_seed(3)
    for n, steps in ((1, 3), (3, 4), (5, 3)):
        prompts = [torch.randint(3, 320, (int(k),), generator=gen) for k in torch.randint(2, 70, (n,), generator=gen)]
        want = _decode(eager, prompts, [eager.new_cache(100) for _ in prompts], steps)
        got = _decode(graphed, prompts, [graphed.new_cache(100) for _ in prompts], steps)
        assert torch.isfinite(got).all()
        assert relative_error(got, want) < 1e-5
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    graphs = graphed.decode_graphs()
    assert graphs is not None and graphs.replays == 3 + 4 + 3
    assert graphs.captures >= 3  # at least one per batch bucket seen (1, 4, 8)
    captured = graphs.captures

    # Growing the pool (a longer cache) moves it: graphs are captured again, and still right.
    prompts = [torch.randint(3, 320, (9,), generator=gen), torch.randint(3, 320, (4,), generator=gen)]
    want = _decode(eager, prompts, [eager.new_cache(100), eager.new_cache(400)], 3)
    got = _decode(graphed, prompts, [graphed.new_cache(100), graphed.new_cache(400)], 3)
    assert relative_error(got, want) < 1e-5
    assert graphs.captures == captured + 1  # the (2, 64) graph, for the new addresses


def test_fake_graph_on_a_middle_and_a_tail_slice(tiny_models: dict[str, Path]) -> None:
    """Hidden states in, hidden states out (a middle slice) and logits out (the tail):
    a 2-slice pipeline with graphs equals the whole model eager."""
    whole = load_slice(tiny_models["llama3"], 0, 6)
    head, tail = load_slice(tiny_models["llama3"], 0, 3), load_slice(tiny_models["llama3"], 3, 6)
    head.graph_mode = tail.graph_mode = "fake"
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 320, (n,), generator=gen) for n in (5, 11)]
    want = _decode(whole, prompts, [whole.new_cache(64) for _ in prompts], 4)
    got = _decode_two(head, tail, prompts, 64, 4)
    assert relative_error(got, want) < 1e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for part in (head, tail):
        graphs = part.decode_graphs()
        assert graphs is not None and graphs.replays == 4


def test_graphs_leave_other_forwards_eager(tiny_models: dict[str, Path]) -> None:
    """Prefill chunks, mixed batches and batches past the largest bucket never replay."""
    model = load_slice(tiny_models["llama3"], 0, 6)
    model.graph_mode = "fake"
    graphs = model.decode_graphs()
    assert graphs is not None
    a, b = model.new_cache(32), model.new_cache(32)
    model(torch.tensor([5, 6, 7]), [SeqChunk(a, 0, 3)])
    model(torch.tensor([5, 6, 8, 9]), [SeqChunk(a, 3, 1), SeqChunk(b, 0, 3)])  # decode + prefill
    assert graphs.replays == 0
    graphs.buckets = (1,)
    model(torch.tensor([1, 2]), [SeqChunk(a, 4, 1), SeqChunk(b, 3, 1)])  # 2 rows > largest bucket
    assert graphs.replays == 0
    model(torch.tensor([1]), [SeqChunk(a, 5, 1)])
    assert graphs.replays == 1
    assert a.length == 6 and b.length == 4
    model.graph_mode = "off"
    assert model.decode_graphs() is None
    del a, b
    gc.collect()


def test_a_failed_capture_falls_back_to_eager(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that cannot be captured leaves the step (and every later one) to the eager path."""
    from swarm_node.engine import graphs as graphs_module

    eager = load_slice(tiny_models["llama3"], 0, 6)
    model = load_slice(tiny_models["llama3"], 0, 6)
    model.graph_mode = "fake"

    def broken(*args: object) -> None:
        raise RuntimeError("capture failed")

    monkeypatch.setattr(graphs_module.DecodeGraphs, "_capture", broken)
    prompts = [torch.tensor([5, 9, 7]), torch.tensor([4, 4])]
    want = _decode(eager, prompts, [eager.new_cache(16) for _ in prompts], 3)
    got = _decode(model, prompts, [model.new_cache(16) for _ in prompts], 3)
    assert torch.equal(got, want)
    graphs = model.decode_graphs()
    assert graphs is not None and graphs.failed and graphs.replays == 0


# --- CUDA --------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_graph_decode_equals_eager_through_two_slices(tiny_models: dict[str, Path]) -> None:
    """Captured CUDA graphs on a 2-slice pipeline, batches of 1 and 3: the tokens of
    eager decode (float32, so that rounding cannot flip a near tie), logits within 1e-4."""
    path = tiny_models["llama3"]

    def pipeline(mode: str) -> tuple[ModelSlice, ModelSlice]:
        parts = load_slice(path, 0, 3, dtype=torch.float32, device="cuda"), load_slice(path, 3, 6, dtype=torch.float32, device="cuda")
        for p in parts:
            p.graph_mode = mode
        return parts

    gen = torch.Generator().manual_seed(5)
    for n in (1, 3):
        prompts = [torch.randint(3, 320, (int(k),), generator=gen).cuda() for k in torch.randint(3, 40, (n,), generator=gen)]
        results = []
        for mode in ("off", "auto"):
            head, tail = pipeline(mode)
            results.append(_decode_two(head, tail, prompts, 128, 12).cpu())
            graphs = tail.decode_graphs()
            assert (graphs is not None and graphs.replays == 12) == (mode == "auto")
        assert torch.equal(results[0].argmax(-1), results[1].argmax(-1))
        assert relative_error(results[1], results[0]) < 1e-4


@cuda
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cuda_graph_route_equals_eager_route(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Two real 2-node routes on the GPU, one replaying decode graphs and one eager
    (--cuda-graphs off), float32: one session and three at once give the same greedy
    tokens on both, and the graph nodes did capture graphs."""
    import asyncio
    import os
    import subprocess
    import sys

    from swarm_client.remote import Hop, RouteSession

    path = tiny_models["llama3"]
    procs: list[tuple[subprocess.Popen[str], Path]] = []

    def start(layers: str, *extra: str) -> subprocess.Popen[str]:
        log = tmp_path / f"node-{len(procs)}.log"
        cmd = [sys.executable, "-m", "swarm_node.cli", "--model", str(path), "--layers", layers, "--port", "0",
               "--device", "cuda", "--dtype", "float32", "--threads", "1", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=dict(os.environ))
        procs.append((proc, log))
        return proc

    def address(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                return line.split("listening on", 1)[1].strip()
        raise AssertionError("swarm-node did not start:\n" + "\n".join(log.read_text() for _, log in procs))

    async def generate(route: list[Hop], prompts: list[list[int]], steps: int) -> list[list[int]]:
        async def one(prompt: list[int]) -> list[int]:
            async with RouteSession(route, max_length=len(prompt) + steps + 1) as s:
                out = await s.prefill(prompt)
                got = [int(out.token)]  # type: ignore[arg-type]
                for _ in range(steps):
                    got.append(int((await s.decode(got[-1])).token))  # type: ignore[arg-type]
                return got

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    try:
        graph_nodes = [start("0:3"), start("3:6")]
        eager_nodes = [start("0:3", "--cuda-graphs", "off"), start("3:6", "--cuda-graphs", "off")]
        graph_route = [Hop(address(graph_nodes[0]), 0, 3), Hop(address(graph_nodes[1]), 3, 6)]
        eager_route = [Hop(address(eager_nodes[0]), 0, 3), Hop(address(eager_nodes[1]), 3, 6)]
        gen = torch.Generator().manual_seed(6)
        prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (9, 17, 30)]
        for batch in (prompts[:1], prompts):
            want = asyncio.run(generate(eager_route, batch, 16))
            got = asyncio.run(generate(graph_route, batch, 16))
            assert got == want
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    logs = [log.read_text() for _, log in procs]
    assert all("captured a decode graph" in text for text in logs[:2]), logs[:2]
    assert not any("captured a decode graph" in text for text in logs[2:])
