"""WAN benchmark: tokens/s and time to first token across delayed links (docs/wan.md).

Three ``swarm-node`` processes (the default model, layers [0, 10) [10, 20) [20, 30)),
the coordinator, mosquitto and the client, each in its own network namespace of the
test bed (tests/wan/bed.py); every link delayed by the same one-way delay, changed in
place (0, 10, 25, 50 ms by default). --runs rounds, each visiting every delay in turn
(so the shared machine's drift hits all delays alike): a warm-up generation, then
[repetitive task, free text] x [speculation off, on] side by side (greedy, --max-new
tokens each); figures are medians over the rounds. Speculation is the client's prompt
lookup with adaptive k (``RoutedBackend(speculation=Speculation(max_draft=K))``).

Per-token latency is decode time / (tokens - 1); tokens/s its inverse; TTFT the time
to the first token (route, prefill, K+1 traversals). The model checked: without
speculation, latency(d) = latency(0) + (K+1) x d for K = 3 nodes, i.e. compute plus one
delay per traversal; the JSON holds measured / model for each delay.

Writes bench/results/wan.json and a plot (tokens/s vs delay, both modes, both tasks)
to bench/results/wan.png, and prints a table. Needs root (network namespaces).

    .venv/bin/python bench/wan.py [--delays 0,10,25,50] [--runs 3] [--max-new 48] [--speculate 6]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from wan.swarm_bed import WanNode, WanSwarm

SNIPPET = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total += (value - m) ** 2
    return total / len(values)
'''
TASKS = {
    "repetitive": "Rewrite this Python code, renaming the variable `total` to `acc`. Change nothing else and "
    "answer with the code only.\n\n```python\n" + SNIPPET + "```",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
NODES = [WanNode("a", "0:10"), WanNode("b", "10:20"), WanNode("c", "20:30")]


def summarize(gens: list[dict[str, Any]]) -> dict[str, float]:
    per_token = [(g["times"][-1] - g["times"][0]) / (len(g["times"]) - 1) for g in gens if len(g["times"]) > 1]
    ttft = [g["times"][0] for g in gens if g["times"]]
    med = statistics.median(per_token)
    trips = sum(g.get("round_trips", 0) for g in gens)
    return {
        "tokens_per_round_trip": sum(g.get("trip_tokens", 0) for g in gens) / trips if trips else 0.0,
        "per_token_s": med,
        "tokens_per_s": 1.0 / med,
        "ttft_s": statistics.median(ttft),
        "runs": len(per_token),
        "per_token_runs_s": per_token,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delays", default="0,10,25,50", help="one-way delays per link, ms")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--speculate", type=int, default=6, help="draft tokens per step when speculation is on")
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    ap.add_argument("--node-args", default="", help="extra swarm-node flags, e.g. '--dtype float32'")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wan.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "wan.png")
    args = ap.parse_args()

    from swarm_client.tokenizer import load_tokenizer
    from swarm_proto.store import resolve_model

    model = Path(resolve_model(args.model))
    tokenizer = load_tokenizer(str(model))
    prompts = {name: tokenizer.apply_chat([{"role": "user", "content": text}]) for name, text in TASKS.items()}
    delays = [float(d) for d in args.delays.split(",")]
    modes = ["off", "on"]
    results: dict[str, Any] = {
        "model": model.name, "nodes": [n.layers for n in NODES], "max_new": args.max_new, "runs": args.runs,
        "speculate": args.speculate,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "delays_ms": delays, "series": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="wan-bench-"))
    swarm = WanSwarm(model, tmp, NODES, delay=delays[0] / 1000, node_args=args.node_args.split())
    try:
        swarm.start(timeout=300)
        collected: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
        for r in range(args.runs):  # delays interleaved, so the machine's drift hits them alike
            for d in delays:
                swarm.bed.set_delay(d / 1000)
                time.sleep(0.5)
                gens = [{"prompt": prompts["free"], "params": {}, "max_new": 4}]  # warm-up: connections, link probes
                keys = []
                for task in TASKS:
                    for mode in modes:
                        keys.append((task, mode, d))
                        gens.append({"prompt": prompts[task], "params": {}, "max_new": args.max_new,
                                     "speculate": args.speculate if mode == "on" else 0})
                out = swarm.drive({"generations": gens}, timeout=3600)["generations"][1:]
                for key, gen in zip(keys, out):
                    collected.setdefault(key, []).append(gen)
                print(f"round {r + 1}/{args.runs}, delay {d:g} ms: " + ", ".join(
                    f"{t}/{m} {1 / summarize([g])['per_token_s']:.2f} tok/s" for (t, m, _), g in zip(keys, out)
                ), flush=True)
        for (task, mode, d), chosen in collected.items():
            summary = summarize(chosen)
            summary["route"] = chosen[0]["routes"]
            summary["same_text"] = len({tuple(g["tokens"]) for g in chosen}) == 1
            results["series"].setdefault(f"{task}/{mode}", {})[str(d)] = summary
    finally:
        swarm.close()

    # the latency model: compute (measured at the first delay, normally 0) + (K+1) x d
    k_plus_1 = len(NODES) + 1
    for key, series in results["series"].items():
        if not key.endswith("/off"):
            continue
        base_d = delays[0]
        base = series[str(base_d)]["per_token_s"]
        for d in delays:
            model_s = base + k_plus_1 * (d - base_d) / 1000
            series[str(d)]["model_per_token_s"] = model_s
            series[str(d)]["measured_over_model"] = series[str(d)]["per_token_s"] / model_s
    if "on" in modes:
        results["speedup"] = {
            task: {str(d): results["series"][f"{task}/on"][str(d)]["tokens_per_s"]
                   / results["series"][f"{task}/off"][str(d)]["tokens_per_s"] for d in delays}
            for task in TASKS
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, delays, modes, args.plot)
    print(f"\n{'series':<22}" + "".join(f"{d:>10g} ms" for d in delays))
    for key, series in results["series"].items():
        print(f"{key + ' tok/s':<22}" + "".join(f"{series[str(d)]['tokens_per_s']:>13.2f}" for d in delays))
        print(f"{key + ' TTFT s':<22}" + "".join(f"{series[str(d)]['ttft_s']:>13.2f}" for d in delays))
        if "measured_over_model" in series[str(delays[0])]:
            print(f"{key + ' meas/model':<22}"
                  + "".join(f"{series[str(d)]['measured_over_model']:>13.2f}" for d in delays))
    for task, by_delay in results.get("speedup", {}).items():
        print(f"{task + ' spec speedup':<22}" + "".join(f"{by_delay[str(d)]:>12.2f}x" for d in delays))
        trips = results["series"][f"{task}/on"]
        print(f"{task + ' tok/round trip':<22}" + "".join(f"{trips[str(d)]['tokens_per_round_trip']:>13.2f}" for d in delays))
    print(f"wrote {args.out} and {args.plot}")


def plot(results: dict[str, Any], delays: list[float], modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in TASKS:
        for mode in modes:
            series = results["series"][f"{task}/{mode}"]
            ax.plot(delays, [series[str(d)]["tokens_per_s"] for d in delays], marker="o",
                    linestyle="-" if mode == "on" else "--", label=f"{task}, speculation {mode}")
    ax.set_xlabel("one-way delay per link (ms)")
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(f"{results['model']}, 3 nodes, each link delayed")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
