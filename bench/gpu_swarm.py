"""The swarm on one GPU: what routes and concurrent sessions cost next to the model in-process.

On one CUDA machine, with a random Llama-3-8B-shaped checkpoint in bfloat16 (32 layers,
hidden 4096, MLP 14336, 32 heads over 8 KV heads, vocabulary 128256), written once with
``save_pretrained`` to --dir (skipped when it is there), every process on the one GPU,
loopback gRPC, ``swarm-node --layers`` processes (no broker):

- one decode step of a node's Scheduler on the local model (input copy, forward,
  commitment, sampling, trip to the host; no gRPC), with commitments on and off:
  where a node's step time goes besides the network;
- decode latency per token (greedy, --prompt random tokens then --tokens steps, median of
  --runs runs, the configurations taking turns): the whole model in this process
  (``LocalBackend``, decode graphs on), the same with the graphs off ("local eager"),
  a route of 1 node [0, 32) and of 2 nodes [0, 16) + [16, 32); the tokens of the local
  run and both routes are asserted identical; per route also the time outside the nodes'
  forward passes (their metrics) per network traversal, and a raw grpc.aio echo of one
  activation for scale;
- aggregate decode tokens/s of 1, 4 and 16 concurrent sessions on the 2-node route from
  one client process, and 16 sessions from --client-procs processes; the nodes' mean
  rows per forward; next to the engine in this process decoding the same 16 prompts as
  one batch of 16 (and its tokens, for agreement).

Time-boxed (--budget seconds: sections that would start later are skipped and said so)
and printing as it goes; writes JSON (--out) and prints a table with the issue's targets.

    PYTHONUNBUFFERED=1 python bench/gpu_swarm.py [--dir /tmp/llama3-8b-random] [--runs 3] [--tokens 48]
    python bench/gpu_swarm.py --device cpu --shape tiny --dir /tmp/tiny-llama   # a dry run of the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm import Node, _echo_server, echo_round_trip, forward_seconds, mean_batch

from swarm_client.remote import Hop, RouteSession

SHAPES: dict[str, dict[str, Any]] = {
    "8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
}


def write_checkpoint(directory: Path, shape: dict[str, Any], device: str) -> float:
    """A random bfloat16 LlamaForCausalLM saved with save_pretrained; seconds taken (0 if there)."""
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return 0.0
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def sync_fn(device: torch.device) -> Any:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# --- measurements ------------------------------------------------------------------------


def local_decode(model: Any, prompt: list[int], tokens: int) -> tuple[list[float], list[int]]:
    """Seconds of each greedy decode step of ``LocalBackend`` (prefill excluded) and the tokens."""
    from swarm_client.local import LocalBackend
    from swarm_proto.wire import SamplingParams

    gen = LocalBackend(model).tokens(prompt, SamplingParams(), tokens + 1)
    out = [next(gen).token_id]
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        out.append(next(gen).token_id)
        times.append(time.perf_counter() - t0)
    return times, out


def scheduler_steps(model: Any, prompt: list[int], tokens: int, commit_k: int) -> tuple[list[float], list[int]]:
    """Seconds of each greedy decode step through a node's Scheduler on ``model`` in this
    process (the node's step without gRPC: input copy, forward, commitment, sampling, the
    trip to the host), with ``commit_k`` commitment entries per position; and the tokens."""
    from swarm_node.scheduler import Job, SampleRequest, Scheduler
    from swarm_proto.wire import SamplingParams

    async def main() -> tuple[list[float], list[int]]:
        sched = Scheduler(model, commit_k=commit_k)
        sched.start()
        try:
            cache = await sched.call(model.new_cache, len(prompt) + tokens + 1)
            history = list(prompt)
            params = SamplingParams()
            out = await sched.submit(Job(cache, 0, torch.tensor(history), sample=SampleRequest(params, len(history), history)))
            history.append(int(out.token))  # type: ignore[arg-type]
            times = []
            for _ in range(tokens):
                t0 = time.perf_counter()
                job = Job(cache, len(history) - 1, torch.tensor(history[-1:]), sample=SampleRequest(params, len(history), history))
                out = await sched.submit(job)
                times.append(time.perf_counter() - t0)
                history.append(int(out.token))  # type: ignore[arg-type]
            return times, history[len(prompt):]
        finally:
            await sched.stop()

    return asyncio.run(main())


async def route_decode(
    hops: Sequence[Hop], prompt: list[int], tokens: int, after_prefill: Any = None
) -> tuple[list[float], list[int]]:
    """Seconds of each greedy decode step along the route (prefill excluded) and the tokens;
    ``after_prefill()`` is called once the first token is in."""
    async with RouteSession(hops, max_length=len(prompt) + tokens + 1) as s:
        out = await s.prefill(prompt)
        got = [int(out.token)]  # type: ignore[arg-type]
        if after_prefill is not None:
            after_prefill()
        times = []
        for _ in range(tokens):
            t0 = time.perf_counter()
            out = await s.decode(got[-1])
            times.append(time.perf_counter() - t0)
            got.append(int(out.token))  # type: ignore[arg-type]
    return times, got


async def concurrent(hops: Sequence[Hop], prompts: Sequence[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """Aggregate decode tokens/s of len(prompts) sessions at once (prefills excluded), and their tokens."""
    ready = 0
    go = asyncio.Event()
    ends: list[float] = []
    results: list[list[int]] = [[] for _ in prompts]

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal ready
        async with RouteSession(hops, max_length=len(prompt) + tokens + 1) as s:
            out = await s.prefill(prompt)
            got = results[i]
            got.append(int(out.token))  # type: ignore[arg-type]
            ready += 1
            if ready == len(prompts):
                go.set()
            await go.wait()
            for _ in range(tokens):
                out = await s.decode(got[-1])
                got.append(int(out.token))  # type: ignore[arg-type]
            ends.append(time.perf_counter())

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    await go.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    return len(prompts) * tokens / (max(ends) - t0), results


def _client_proc(hops: list[tuple[str, int, int]], prompts: list[list[int]], tokens: int, barrier: Any, out: Any) -> None:
    """One of several client processes: its sessions prefill, wait for all processes, decode."""

    async def main() -> None:
        route = [Hop(*h) for h in hops]
        sessions = [RouteSession(route, max_length=len(p) + tokens + 1) for p in prompts]
        last = []
        for s, p in zip(sessions, prompts):
            await s.open()
            last.append(int((await s.prefill(p)).token))  # type: ignore[arg-type]
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        t0 = time.monotonic()

        async def run(i: int) -> None:
            for _ in range(tokens):
                last[i] = int((await sessions[i].decode(last[i])).token)  # type: ignore[arg-type]

        await asyncio.gather(*(run(i) for i in range(len(sessions))))
        out.put((t0, time.monotonic(), len(sessions) * tokens))
        for s in sessions:
            await s.close()

    asyncio.run(main())


def multi_client(hops: Sequence[Hop], prompts: Sequence[list[int]], tokens: int, procs: int) -> float:
    """Aggregate decode tokens/s of the prompts' sessions spread over ``procs`` client processes."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    plain = [(h.address, h.start, h.end) for h in hops]
    workers = [
        ctx.Process(target=_client_proc, args=(plain, list(prompts[i::procs]), tokens, barrier, out), daemon=True)
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    got = [out.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(30)
    return sum(n for _, _, n in got) / (max(e for _, e, _ in got) - min(s for s, _, _ in got))


def in_process_batch(model: Any, prompts: Sequence[list[int]], tokens: int, sync: Any) -> tuple[float, list[list[int]]]:
    """The engine in this process decoding the prompts as one batch: tokens/s, and the tokens."""
    from swarm_node.engine.model import SeqChunk

    device = model.device
    caches = [model.new_cache(len(p) + tokens + 1) for p in prompts]
    x = torch.tensor([t for p in prompts for t in p], device=device)
    logits = model(x, [SeqChunk(c, 0, len(p)) for c, p in zip(caches, prompts)])
    picked = [logits.argmax(-1)]
    sync()
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = model(picked[-1], [SeqChunk(c, c.length, 1) for c in caches])
        picked.append(logits.argmax(-1))
    sync()
    rate = len(prompts) * tokens / (time.perf_counter() - t0)
    table = torch.stack(picked, 1).tolist()  # [B, tokens + 1]
    return rate, table


def profile_node(directory: Path, layers: int, extra: list[str], prompt: list[int], tokens: int, logs: Path) -> str:
    """One more 1-node route whose node profiles (cProfile, its event loop thread: a lone
    session's steps run there whole) 4 x ``tokens`` decode steps, and so does this process
    (the client); the top functions of each."""
    import cProfile
    import io
    import pstats
    import signal

    prof = logs / "node.prof"
    wrapper = Path(__file__).resolve().parent / "device" / "profiled_node.py"
    node = Node(directory, (0, layers), 2, logs / "profiled.log", extra, python_args=(str(wrapper), str(prof)))
    try:
        hops = [node.hop()]
        asyncio.run(route_decode(hops, prompt, 4))  # warm-up: graphs captured
        node.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.2)  # the warm-up session drops out of the node's recent ones: a lone session
        client = cProfile.Profile()
        client.enable()
        times, _ = asyncio.run(route_decode(hops, prompt, 4 * tokens))
        client.disable()
        node.proc.send_signal(signal.SIGUSR2)
        time.sleep(2)
    finally:
        node.stop()
    out = io.StringIO()
    out.write(f"profiled node: {statistics.median(times) * 1e3:.2f} ms per step under cProfile, {4 * tokens} steps\n")
    stats = pstats.Stats(str(prof), stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumtime").print_stats(30)
    out.write("--- the client (this process) over the same steps\n")
    stats = pstats.Stats(client, stream=out)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumtime").print_stats("swarm_client|swarm_proto", 20)
    return out.getvalue()


# --- the run -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from swarm_node.engine.loading import load_slice

    t_start = time.perf_counter()
    device = torch.device(args.device)
    sync = sync_fn(device)
    shape = SHAPES[args.shape]
    layers = shape["num_hidden_layers"]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else args.device,
        "torch": torch.__version__, "shape": args.shape, "dtype": "bfloat16", "prompt": args.prompt,
        "tokens": args.tokens, "runs": args.runs, "skipped": [],
    }

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {text}", flush=True)

    directory = Path(args.dir)
    report["checkpoint_write_s"] = write_checkpoint(directory, shape, args.device)
    say(f"checkpoint at {directory} (written in {report['checkpoint_write_s']:.1f} s)")

    logs = Path(args.out).parent / "gpu-swarm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    half = layers // 2
    spans = {1: [(0, layers)], 2: [(0, half), (half, layers)]}
    extra = ["--device", args.device, "--dtype", "bfloat16", "--max-length", "1024"]
    nodes = {k: [Node(directory, span, 2, logs / f"k{k}-{i}.log", extra) for i, span in enumerate(ss)] for k, ss in spans.items()}
    parent, child = multiprocessing.Pipe()
    echo = multiprocessing.Process(target=_echo_server, args=(child,), daemon=True)
    echo.start()
    try:
        model = load_slice(directory, 0, layers, dtype=torch.bfloat16, device=device)
        say("local model loaded")
        hops = {k: [n.hop() for n in ns] for k, ns in nodes.items()}
        say("nodes up: " + ", ".join(f"{k}: {[h.address for h in hs]}" for k, hs in hops.items()))
        metrics = {k: [n.metrics for n in ns] for k, ns in nodes.items()}
        gen = torch.Generator().manual_seed(0)
        vocab = shape["vocab_size"]
        prompt = torch.randint(3, vocab, (args.prompt,), generator=gen).tolist()

        # Warm-up: graphs captured, lazy allocations made, on every process.
        local_decode(model, prompt, 4)
        for k in spans:
            asyncio.run(route_decode(hops[k], prompt, 4))
        say("warmed up")

        # --- latency, configurations taking turns run by run
        configs = ["local", "local eager", "1 node", "2 nodes"]
        lat: dict[str, list[float]] = {c: [] for c in configs}
        outside: dict[str, list[float]] = {c: [] for c in configs[2:]}
        toks: dict[str, list[int]] = {}
        for r in range(args.runs):
            for c in configs:
                if c.startswith("local"):
                    model.graph_mode = "off" if c == "local eager" else "auto"
                    times, got = local_decode(model, prompt, args.tokens)
                    model.graph_mode = "auto"
                else:
                    k = int(c[0])
                    before: list[float] = []
                    times, got = asyncio.run(route_decode(
                        hops[k], prompt, args.tokens,
                        lambda k=k, before=before: before.append(sum(forward_seconds(u) for u in metrics[k])),
                    ))
                    fwd = sum(forward_seconds(u) for u in metrics[k]) - before[0]  # the decode steps' forwards
                    outside[c].append((sum(times) - fwd) / len(times) / (k + 1))
                lat[c].append(statistics.median(times))
                toks.setdefault(c, got)
                if got != toks[c]:
                    raise AssertionError(f"{c}: run {r} gave other tokens than run 0")
            say(f"latency run {r}: " + ", ".join(f"{c} {lat[c][-1] * 1e3:.2f} ms" for c in configs))
        for c in ("1 node", "2 nodes"):
            if toks[c] != toks["local"]:
                raise AssertionError(f"{c}: tokens differ from the local run:\n{toks[c]}\n{toks['local']}")
        report["tokens_identical_local_and_routes"] = True
        report["graph_vs_eager_tokens_identical"] = toks["local eager"] == toks["local"]
        report["decode_ms"] = {c: statistics.median(v) * 1e3 for c, v in lat.items()}
        report["outside_forward_per_traversal_ms"] = {c: statistics.median(v) * 1e3 for c, v in outside.items()}
        echo_address = f"127.0.0.1:{parent.recv()}"
        payload = shape["hidden_size"] * 2  # one bfloat16 activation
        report["echo_rtt_ms"] = asyncio.run(echo_round_trip(echo_address, payload, 300)) * 1e3

        # --- one step inside a node, without the network
        steps: dict[str, float] = {}
        for name, k in (("scheduler step, commitments on", 8), ("scheduler step, commitments off", 0)):
            samples = []
            for _ in range(args.runs):
                times, got = scheduler_steps(model, prompt, args.tokens, k)
                samples.append(statistics.median(times))
                if got != toks["local"]:
                    raise AssertionError(f"{name}: tokens differ from the local run")
            steps[name] = statistics.median(samples) * 1e3
        report["in_process_step_ms"] = steps
        say("in process: " + ", ".join(f"{n} {v:.2f} ms" for n, v in steps.items()))

        # --- throughput on 2 nodes
        prompts16 = [torch.randint(3, vocab, (args.prompt,), generator=gen).tolist() for _ in range(16)]
        addresses = [h.address for h in hops[2]]
        tput: dict[str, float] = {}
        batch: dict[str, list[float]] = {}
        agree: dict[str, float] = {}
        in_process_batch(model, prompts16, 4, sync)  # warm-up: the pool grows, graphs for 16 rows
        asyncio.run(concurrent(hops[2], prompts16, 4))
        engine16, engine_toks = in_process_batch(model, prompts16, args.tokens, sync)
        report["engine_batch16_tok_s"] = engine16
        say(f"engine in process, batch 16: {engine16:.1f} tok/s")
        for c in args.sessions:
            if left() < 30:
                report["skipped"].append(f"{c} sessions")
                continue
            before = asyncio.run(mean_batch(addresses))
            samples = []
            for _ in range(args.runs):
                rate, got = asyncio.run(concurrent(hops[2], prompts16[:c], args.tokens))
                samples.append(rate)
            after = asyncio.run(mean_batch(addresses))
            tput[str(c)] = statistics.median(samples)
            batch[str(c)] = [(s1 - s0) / max(1, b1 - b0) for (s0, b0), (s1, b1) in zip(before, after)]
            agree[str(c)] = statistics.fmean(
                sum(a == b for a, b in zip(g, engine_toks[i])) / len(g) for i, g in enumerate(got)
            ) if c == 16 else float("nan")
            say(f"{c} sessions on 2 nodes: {tput[str(c)]:.1f} tok/s, mean rows per forward {batch[str(c)]}")
        report["tokens_per_s_2_nodes"] = tput
        report["mean_batch_2_nodes"] = batch
        report["agreement_16_with_engine_batch16"] = agree.get("16", float("nan"))
        if args.client_procs > 1 and left() > 40:
            rates = [multi_client(hops[2], prompts16, args.tokens, args.client_procs) for _ in range(args.runs)]
            report[f"tokens_per_s_2_nodes_16_from_{args.client_procs}_procs"] = statistics.median(rates)
            say(f"16 sessions from {args.client_procs} client processes: {statistics.median(rates):.1f} tok/s")
        elif args.client_procs > 1:
            report["skipped"].append("several client processes")
        if args.profile_node and left() > 40:
            report["node_profile"] = profile_node(directory, layers, extra, prompt, args.tokens, logs)
            print(report["node_profile"], flush=True)
    finally:
        for ns in nodes.values():
            for n in ns:
                n.stop()
        echo.terminate()

    d = report["decode_ms"]
    t = report["tokens_per_s_2_nodes"]
    targets = {
        "1-node route <= 1.10x local": d["1 node"] / d["local"] <= 1.10,
        "2-node route <= 1.15x local": d["2 nodes"] / d["local"] <= 1.15,
    }
    if "16" in t and "1" in t:
        targets["16 sessions >= 8x one"] = t["16"] >= 8 * t["1"]
        targets["16 sessions >= 50% of engine batch 16"] = t["16"] >= 0.5 * report["engine_batch16_tok_s"]
    report["targets"] = targets
    report["seconds"] = time.perf_counter() - t_start
    return report


def print_table(r: dict[str, Any]) -> None:
    d = r["decode_ms"]
    print(f"\n{r['device']}, {r['shape']} shape, bfloat16, prompt {r['prompt']}, {r['tokens']} steps, median of {r['runs']}")
    print(f"{'':34} {'ms/token':>9} {'vs local':>9} {'outside fwd/trav ms':>20}")
    for c in ("local", "local eager", "1 node", "2 nodes"):
        o = r["outside_forward_per_traversal_ms"].get(c)
        print(f"{c:34} {d[c]:9.2f} {d[c] / d['local']:8.2f}x {'' if o is None else f'{o:20.2f}'}")
    for c, v in r.get("in_process_step_ms", {}).items():
        print(f"{c:34} {v:9.2f} {v / d['local']:8.2f}x")
    print(f"raw grpc.aio echo RTT of one activation: {r['echo_rtt_ms']:.3f} ms")
    t = r["tokens_per_s_2_nodes"]
    for c, v in t.items():
        print(f"{c + ' sessions, 2 nodes (tok/s)':34} {v:9.1f} {v / t['1'] if '1' in t else float('nan'):8.2f}x  rows/forward {r['mean_batch_2_nodes'][c]}")
    for k, v in r.items():
        if k.startswith("tokens_per_s_2_nodes_16_from"):
            print(f"{'16 sessions, ' + k.rsplit('from_', 1)[1].replace('_', ' ') + ' (tok/s)':34} {v:9.1f}")
    print(f"{'engine in process, batch 16 (tok/s)':34} {r['engine_batch16_tok_s']:9.1f}")
    print(f"tokens identical local / 1 node / 2 nodes: {r['tokens_identical_local_and_routes']}; graphs vs eager: "
          f"{r['graph_vs_eager_tokens_identical']}; 16 sessions vs engine batch 16: {r['agreement_16_with_engine_batch16']:.3f}")
    for name, ok in r["targets"].items():
        print(f"  target {name}: {'MET' if ok else 'not met'}")
    if r["skipped"]:
        print(f"skipped for time: {r['skipped']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--dir", default="/tmp/llama3-8b-random", help="where the random checkpoint is (written if missing)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48, help="decode steps per run")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--client-procs", type=int, default=4, help="also 16 sessions from this many client processes (1: off)")
    ap.add_argument("--profile-node", action="store_true", help="also profile one node's steps with cProfile")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds: sections that would start later are skipped")
    ap.add_argument("--out", default="bench/results/gpu_swarm.json")
    args = ap.parse_args()
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"({report['seconds']:.0f} s; JSON in {out})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
