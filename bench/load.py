"""Load benchmark: open-loop Poisson arrivals through the gateway, below and above capacity.

A memory-limited split swarm runs on this machine: ``swarm-coordinator`` (with its
gateway) and ``--nodes`` nodes started with ``--memory-budget`` (200M: room for 14 of
the default model's 30 layers, so three nodes host three spans, one node each) and ``--kv-budget`` (so each span holds only a few sessions at once). Requests
are streaming chat completions sent with the official ``openai`` client (no retries),
each generating exactly ``--tokens`` tokens (``ignore_eos``).

1. Idle: ``--idle`` requests one after another: the idle time to first token.
2. Capacity: ``--workers`` closed-loop workers for ``--capacity-s`` seconds; capacity
   is the completed requests per second (and tokens per second) at saturation.
3. Levels: for each factor of ``--levels`` (default 0.5 1 1.5 2), Poisson arrivals at
   that multiple of the capacity for ``--duration`` seconds (open loop: arrivals do
   not wait for answers); then the stragglers are awaited.
4. After: ``--idle`` requests one after another again (served at the idle speed?).

Per level: goodput (tokens of completed requests / the level's wall time, from its
first arrival to its last answer), time to first
token and completion latency p50/p99 of the completed requests, and the count of each
outcome (200, 429 busy, 5xx, other). Targets: below capacity no errors; above it only
429s and goodput >= 90% of capacity; p99 time to first token below capacity <= 3x the
idle one. Results go to ``bench/results/``: ``load.json``, ``load.md`` (a table) and
``load.png`` (goodput and p99 latencies against offered load).

    .venv/bin/python bench/load.py [--duration 120] [--levels 0.5 1 1.5 2] [--kv-budget 8M]

The machine's load (``os.getloadavg``) is recorded before and after: on a shared
machine, compare figures of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import Swarm

QUESTIONS = [
    "Name a planet and say one thing about it.",
    "Give me a tip for writing clean code.",
    "What is a good name for a cat?",
    "Describe the sea in one sentence.",
    "Why do leaves change color?",
    "Suggest a quick breakfast.",
]


@dataclass
class Outcome:
    status: int  # 200, or the HTTP status of the refusal; 0: transport error
    t_sent: float
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    error: str = ""


async def one_request(api: Any, model: str, question: str, tokens: int, t0: float) -> Outcome:
    import openai

    out = Outcome(0, time.perf_counter() - t0)
    start = time.perf_counter()
    try:
        stream = await api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - start
                out.tokens += 1  # one chunk per token (a chunk may hold more when text is held back)
        out.status = 200
        out.latency_s = time.perf_counter() - start
    except openai.APIStatusError as exc:
        out.status, out.error = exc.status_code, str(exc.message)[:200]
    except openai.APIError as exc:
        out.status, out.error = 0, f"{type(exc).__name__}: {exc}"[:200]
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(outcomes: list[Outcome], duration: float, offered_rps: float, factor: float) -> dict[str, Any]:
    """``duration``: from the level's first arrival to its last answer (arrivals + drain)."""
    done = [o for o in outcomes if o.status == 200]
    kinds: dict[str, int] = {}
    for o in outcomes:
        kind = "200" if o.status == 200 else "429" if o.status == 429 else "5xx" if o.status >= 500 else f"other({o.status})"
        kinds[kind] = kinds.get(kind, 0) + 1
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    lat = [o.latency_s for o in done if o.latency_s is not None]
    return {
        "factor": factor,
        "offered_rps": round(offered_rps, 3),
        "requests": len(outcomes),
        "outcomes": kinds,
        "goodput_tok_s": round(sum(o.tokens for o in done) / duration, 2),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "latency_p50_s": _pct(lat, 50),
        "latency_p99_s": _pct(lat, 99),
        "errors": sorted({o.error for o in outcomes if o.status != 200})[:5],
    }


async def run(args: argparse.Namespace, url: str, model: str) -> dict[str, Any]:
    import openai

    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    result: dict[str, Any] = {}

    idle = [await one_request(api, model, QUESTIONS[i % len(QUESTIONS)], args.tokens, t0) for i in range(args.idle)]
    idle_ttft = statistics.median(o.ttft_s for o in idle if o.ttft_s is not None)
    idle_lat = statistics.median(o.latency_s for o in idle if o.latency_s is not None)
    result["idle"] = {"ttft_s": idle_ttft, "latency_s": idle_lat, "tok_s": args.tokens / idle_lat}
    print(f"idle: first token {idle_ttft * 1000:.0f} ms, request {idle_lat:.2f} s", flush=True)

    # capacity: closed loop, enough workers to keep every span full
    done: list[Outcome] = []
    stop_at = time.perf_counter() + args.capacity_s

    async def worker(i: int) -> None:
        while time.perf_counter() < stop_at:
            done.append(await one_request(api, model, QUESTIONS[i % len(QUESTIONS)], args.tokens, t0))

    c0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.workers)))
    elapsed = time.perf_counter() - c0
    ok = [o for o in done if o.status == 200]
    capacity_rps = len(ok) / elapsed
    capacity_tok_s = sum(o.tokens for o in ok) / elapsed
    result["capacity"] = {
        "workers": args.workers,
        "seconds": elapsed,
        "completed": len(ok),
        "refused": len(done) - len(ok),
        "rps": capacity_rps,
        "tok_s": capacity_tok_s,
    }
    print(f"capacity: {capacity_rps:.2f} requests/s, {capacity_tok_s:.1f} tokens/s ({len(ok)} in {elapsed:.0f} s)", flush=True)

    levels = []
    for factor in args.levels:
        rate = factor * capacity_rps
        tasks: list[asyncio.Task[Outcome]] = []
        start = time.perf_counter()
        next_at = start
        i = 0
        while True:
            next_at += rng.expovariate(rate)
            if next_at - start >= args.duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one_request(api, model, QUESTIONS[i % len(QUESTIONS)], args.tokens, t0)))
            i += 1
        outcomes = list(await asyncio.gather(*tasks))
        wall = max(args.duration, time.perf_counter() - start)
        row = summarize(outcomes, wall, rate, factor)
        row["drain_s"] = round(wall - args.duration, 1)
        levels.append(row)
        print(json.dumps(row), flush=True)
    result["levels"] = levels

    # after the overload: one request at a time again, as at idle
    after = [await one_request(api, model, QUESTIONS[i % len(QUESTIONS)], args.tokens, t0) for i in range(args.idle)]
    result["after"] = {
        "statuses": [o.status for o in after],
        "ttft_s": statistics.median(o.ttft_s for o in after if o.ttft_s is not None),
        "latency_s": statistics.median(o.latency_s for o in after if o.latency_s is not None),
    }
    print(f"after the overload: first token {result['after']['ttft_s'] * 1000:.0f} ms, request {result['after']['latency_s']:.2f} s", flush=True)
    await api.close()
    return result


def table(result: dict[str, Any]) -> str:
    cap = result["capacity"]
    idle = result["idle"]
    head = (
        f"Capacity {cap['rps']:.2f} requests/s = {cap['tok_s']:.1f} tokens/s; idle first token "
        f"{idle['ttft_s'] * 1000:.0f} ms; load average {result['loadavg_before']} -> {result['loadavg_after']}"
    )
    after = result.get("after")
    if after:
        head += (
            f"; after the overload, one at a time: first token {after['ttft_s'] * 1000:.0f} ms, request "
            f"{after['latency_s']:.2f} s (idle {idle['latency_s']:.2f} s)"
        )
    lines = [
        head,
        "",
        "| load | offered req/s | requests | outcomes | goodput tok/s (% of capacity) | TTFT p50 / p99 s | latency p50 / p99 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["levels"]:
        share = 100 * r["goodput_tok_s"] / cap["tok_s"] if cap["tok_s"] else 0
        f = lambda v: "-" if v is None else f"{v:.2f}"
        lines.append(
            f"| {r['factor']:g}x | {r['offered_rps']:.2f} | {r['requests']} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))
            + f" | {r['goodput_tok_s']:.1f} ({share:.0f}%) | {f(r['ttft_p50_s'])} / {f(r['ttft_p99_s'])} | "
            f"{f(r['latency_p50_s'])} / {f(r['latency_p99_s'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    x = [r["factor"] for r in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["goodput_tok_s"] for r in levels], "o-", label="goodput")
    a.axhline(result["capacity"]["tok_s"], color="gray", ls="--", label="capacity")
    a.axhline(0.9 * result["capacity"]["tok_s"], color="gray", ls=":", label="90% of capacity")
    a.set_xlabel("offered load (x capacity)")
    a.set_ylabel("tokens/s")
    a.legend()
    a.set_title("goodput")
    b.plot(x, [r["ttft_p99_s"] or 0 for r in levels], "o-", label="time to first token p99")
    b.plot(x, [r["latency_p99_s"] or 0 for r in levels], "s-", label="completion latency p99")
    b.axhline(3 * result["idle"]["ttft_s"], color="gray", ls=":", label="3x idle first token")
    b.set_xlabel("offered load (x capacity)")
    b.set_ylabel("seconds")
    b.legend()
    b.set_title("p99 latencies (completed requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the default model)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--memory-budget", default="200M", help="per node: weights (200M: 14 of 30 layers, so 3 spans)")
    p.add_argument("--kv-budget", default="8M", help="per node: KV cache for sessions")
    p.add_argument("--queue-size", type=int, default=64, help="the gateway's line")
    p.add_argument("--queue-timeout", type=float, default=60.0)
    p.add_argument("--tokens", type=int, default=16, help="tokens per request")
    p.add_argument("--idle", type=int, default=5, help="requests one at a time for the idle figures")
    p.add_argument("--workers", type=int, default=16, help="closed-loop workers measuring capacity")
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per level")
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()

    from swarm_proto.store import resolve_model

    model_path = str(resolve_model(args.model))
    logs = Path(tempfile.mkdtemp(prefix="bench-load-"))
    before = [round(x, 2) for x in os.getloadavg()]
    swarm = Swarm(
        model_path,
        args.nodes,
        args.threads,
        logs,
        node_args=["--memory-budget", args.memory_budget, "--kv-budget", args.kv_budget],
        coordinator_args=["--queue-size", str(args.queue_size), "--queue-timeout", str(args.queue_timeout)],
    )
    try:
        import urllib.request

        with urllib.request.urlopen(swarm.url + "/v1/models", timeout=10) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        with urllib.request.urlopen(swarm.url + "/dashboard/state", timeout=10) as resp:
            state = json.loads(resp.read())
        spans = sorted(tuple(n["serving"]) for n in state["nodes"] if n["serving"])
        print(f"swarm: spans {spans}; logs in {logs}", flush=True)
        result = asyncio.run(run(args, swarm.url, model))
    finally:
        swarm.stop()
    result["spans"] = spans
    result["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    result["loadavg_before"] = before
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["cpus"] = os.cpu_count()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "load.md").write_text(table(result))
    plot(result, out / "load.png")
    sys.stdout.write(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
