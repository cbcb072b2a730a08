"""Spot-check benchmark: what checking the nodes' results costs, and how fast a liar is caught
(docs/verification.md).

1. Cost: a swarm of four pinned ``swarm-node`` processes on the default model
   (SmolLM2-135M, 30 layers as [0, 15) x 2 and [15, 30) x 2), so that a route of two
   nodes has a disjoint route to check on. Generations of --tokens tokens run with
   checks at the default rate (0.05) and with checks off, taking turns, --runs times
   each; per mode: throughput (tokens / generation time, the final check included),
   time to the first token the caller gets, decode time per token and the longest gap
   between two tokens the caller gets (checked tokens come in bursts). All processes
   share this machine's cores, so the verifiers' recomputation competes with the
   generation here; on a real swarm it runs on other machines.
2. Detection time vs rate: a liar is caught at the first check after its first lie
   (a check covers every position since the previous one). Steps from a lie to its
   check, over --seeds draws of the client's generator, per rate: mean, p95, and the
   share caught within 20 steps; times in seconds use the decode step measured in 1.

Writes bench/results/verify.json and prints two tables.

    .venv/bin/python bench/verify.py [--runs 3] [--tokens 48] [--seeds 20000] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from e2e.chaos import GREEDY, ChaosSwarm, NodeSpec

from swarm_client.routed import StaticRoutes
from swarm_client.verify import Verifier, VerifyPolicy
from swarm_proto import store
from swarm_proto.wire import SamplingParams

FOUR = [NodeSpec("a", "0:15", 100), NodeSpec("b", "0:15", 90), NodeSpec("c", "15:30", 100), NodeSpec("d", "15:30", 90)]
RATES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
PROMPT = [1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 2365, 284, 253, 1789, 282, 1311, 314]  # a fixed 16-token prompt


async def one(swarm: ChaosSwarm, rate: float, tokens: int) -> dict[str, float]:
    backend = swarm.backend(verify=VerifyPolicy(rate=rate))
    try:
        t0 = time.perf_counter()
        first = 0.0
        n = 0
        arrivals = []
        async for _ in backend.tokens(PROMPT, GREEDY, tokens):
            n += 1
            arrivals.append(time.perf_counter())
            if n == 1:
                first = arrivals[0] - t0
        total = time.perf_counter() - t0
        gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
        return {
            "total_s": total, "ttft_s": first, "tokens": n, "checked": backend.checked_steps,
            "max_gap_s": gaps[-1] if gaps else 0.0,
        }
    finally:
        await backend.aclose()


def cost(model: Path, runs: int, tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        swarm = ChaosSwarm(model, Path(tmp), max_length=256)
        try:
            swarm.start(FOUR, timeout=300)
            out: dict[str, list[dict[str, float]]] = {"on": [], "off": []}

            async def all_runs() -> None:
                await one(swarm, 0.0, 8)  # warm up every node
                await one(swarm, 0.05, 8)
                for _ in range(runs):
                    for mode, rate in (("off", 0.0), ("on", 0.05)):
                        out[mode].append(await one(swarm, rate, tokens))

            asyncio.run(all_runs())
        finally:
            swarm.close()
    summary: dict[str, Any] = {}
    for mode, rows in out.items():
        summary[mode] = {
            "throughput_tok_s": statistics.median(r["tokens"] / r["total_s"] for r in rows),
            "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            "decode_s_per_token": statistics.median((r["total_s"] - r["ttft_s"]) / max(1, r["tokens"] - 1) for r in rows),
            "checked_positions": statistics.median(r["checked"] for r in rows),
            "max_gap_s": statistics.median(r["max_gap_s"] for r in rows),
            "runs": rows,
        }
    summary["throughput_cost"] = 1 - summary["on"]["throughput_tok_s"] / summary["off"]["throughput_tok_s"]
    return summary


def detection(seeds: int, step_s: float, first_lie: int = 3, length: int = 400) -> list[dict[str, float]]:
    rows = []
    for rate in RATES:
        delays = []
        for seed in range(seeds):
            v = Verifier(StaticRoutes([]), policy=VerifyPolicy(rate=rate), max_length=length,
                         sampling=SamplingParams(), prompt_length=1, rng=random.Random(seed))
            d = length - 1 - first_lie
            for step in range(first_lie, length):
                if v.want_check():
                    d = step - first_lie
                    break
            delays.append(d)
        delays.sort()
        mean = statistics.fmean(delays)
        rows.append({
            "rate": rate,
            "mean_steps": mean,
            "p95_steps": delays[int(0.95 * (len(delays) - 1))],
            "caught_within_20": sum(d <= 20 for d in delays) / len(delays),
            "mean_s": mean * step_s,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=20000)
    ap.add_argument("--model", type=Path, default=None, help="default: the default model (SmolLM2-135M Q4_1)")
    args = ap.parse_args()
    model = args.model or store.default_model_path()
    c = cost(model, args.runs, args.tokens)
    d = detection(args.seeds, c["off"]["decode_s_per_token"])
    out = ROOT / "bench" / "results" / "verify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cost": c, "detection": d, "args": vars(args) | {"model": str(model)}}, indent=2))
    print(f"cost of spot checks, {args.tokens} tokens x {args.runs} runs per mode (medians), default model, 4 nodes on this machine")
    print(f"{'checks':<8}{'tok/s':>8}{'first token s':>15}{'decode s/token':>16}{'longest gap s':>15}{'checked':>9}")
    for mode in ("off", "on"):
        m = c[mode]
        print(f"{mode:<8}{m['throughput_tok_s']:>8.2f}{m['ttft_s']:>15.3f}{m['decode_s_per_token']:>16.4f}"
              f"{m['max_gap_s']:>15.3f}{m['checked_positions']:>9.0f}")
    print(f"throughput cost: {c['throughput_cost'] * 100:.1f}%")
    print()
    print(f"detection: steps from a lie to the check that catches it, over {args.seeds} seeds")
    print(f"{'rate':>6}{'mean steps':>12}{'p95 steps':>11}{'<= 20 steps':>13}{'mean s':>9}")
    for r in d:
        print(f"{r['rate']:>6.2f}{r['mean_steps']:>12.1f}{r['p95_steps']:>11.0f}{r['caught_within_20']:>13.1%}{r['mean_s']:>9.2f}")


if __name__ == "__main__":
    main()
