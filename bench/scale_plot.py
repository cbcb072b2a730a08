"""Route latency against swarm size, from ``bench/scale.py`` result files.

Reads the JSON that ``bench/scale.py --json`` writes (one run or a ``--sweep`` list; any
number of files) and, optionally, a ``--micro`` JSON; draws GetRoute latency at the
coordinator (p50 and p99 wall time, p99 CPU time, per model) and the in-process route
computation against the node count, log-log; several runs of one size give one point,
their median. Runs that failed (a size the machine could not host) are passed as
``--failed N`` and marked on the axis.

    .venv/bin/python bench/scale_plot.py bench/results/scale-sweep.json bench/results/scale-1000.json \\
        --micro bench/results/scale-micro.json --out docs/scale-latency.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text())
        runs.extend(data if isinstance(data, list) else [data])
    return sorted(runs, key=lambda r: r["nodes"])


def median_per_size(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per node count: each model's latency figures, the median over the runs
    of that size (the mean of the middle two for an even number of runs)."""
    keys = ("route_p50_ms", "route_p99_ms", "route_cpu_p99_ms")
    out: list[dict[str, Any]] = []
    for n in sorted({r["nodes"] for r in runs}):
        same = [r for r in runs if r["nodes"] == n]
        models = sorted({m for r in same for m in r["coordinator"]})
        coordinator = {
            m: {k: statistics.median(r["coordinator"][m][k] for r in same if m in r["coordinator"]) for k in keys}
            for m in models
        }
        out.append({"nodes": n, "runs": len(same), "coordinator": coordinator})
    return out


def plot(runs: list[dict[str, Any]], micro: list[dict[str, Any]], failed: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    models = sorted({m for r in runs for m in r["coordinator"]})
    styles = {"p50": "o-", "p99": "s-", "cpu": "^:"}
    for model in models:
        rows = [(r["nodes"], r["coordinator"][model]) for r in runs if model in r["coordinator"]]
        ns = [n for n, _ in rows]
        ax.plot(ns, [s["route_p50_ms"] for _, s in rows], styles["p50"], label=f"{model} p50")
        ax.plot(ns, [s["route_p99_ms"] for _, s in rows], styles["p99"], label=f"{model} p99")
        ax.plot(ns, [s["route_cpu_p99_ms"] for _, s in rows], styles["cpu"], label=f"{model} p99 CPU time")
    if micro:
        ns = [m["nodes"] for m in micro]
        ax.plot(ns, [m["route_p50_ms"] for m in micro], "k--", alpha=0.6, label="in-process p50")
        ax.plot(ns, [m["route_p99_ms"] for m in micro], "k-.", alpha=0.6, label="in-process p99")
    for n in failed:
        ax.axvline(n, color="red", alpha=0.3)
        ax.text(n, ax.get_ylim()[1], " not hosted here", color="red", fontsize=7, va="top", rotation=90)
    ax.axhline(10, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("simulated nodes")
    ax.set_ylabel("GetRoute at the coordinator, ms")
    ax.set_title("Route latency vs swarm size (100 routes/s, churn)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="bench/scale.py --json files")
    p.add_argument("--micro", type=Path, default=None, help="a bench/scale.py --micro --json file")
    p.add_argument("--failed", default="", help="comma-separated node counts whose run failed here")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    micro = json.loads(args.micro.read_text()) if args.micro else []
    failed = [int(n) for n in args.failed.split(",") if n]
    plot(median_per_size(load_runs(args.results)), micro, failed, args.out)


if __name__ == "__main__":
    main()
