"""Speculative decoding on loopback: the same generations with speculation off and on.

Three ``swarm-node`` processes hold the default model's 30 layers (10 each); one client
generates greedily through them, with ``speculate=0`` and ``speculate=K`` (prompt lookup)
in turns within each run, so machine noise hits both alike. Two tasks:

- ``rewrite``: rewrite a given code snippet with one change (the answer repeats the
  prompt: prompt lookup drafts well);
- ``free``: free text (little to look up: the adaptive k should fall to 0 and cost nothing).

Per task and mode, the median over --runs of: decode tokens/s (tokens after the first
over the time they took), time to first token, tokens per network round trip (one step
along the route and its result back), and whether the tokens equal speculation off's
(they must: the quantized default is batch-invariant, and float32 nodes agree to the
last bits that matter: docs/speculation.md).
Link delay is not modelled here (bench/wan.py adds it); on loopback a traversal costs
~0.5 ms, so the gain comes from the compute a step costs.

Writes bench/results/speculation.json and prints a table.

    .venv/bin/python bench/speculation.py [--model PATH] [--runs 5] [--tokens 96] [--k 6] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from swarm import Node  # (bench/swarm.py: a swarm-node process)

from swarm_client.api import AsyncSwarmClient

CODE = (
    "def summarize(orders):\n    total = 0\n    for order in orders:\n        if order.paid:\n"
    "            total += order.amount\n        else:\n            print('unpaid:', order.id)\n    return total\n"
)
TASKS = {
    "rewrite": f"Here is a Python function:\n```python\n{CODE}```\nRepeat the function exactly, but rename the "
    "function to `summarise`. Output only the code.",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
LAYERS = [(0, 10), (10, 20), (20, 30)]


async def generate(client: AsyncSwarmClient, task: str, tokens: int) -> dict[str, Any]:
    stats = client.backend.decode_stats  # type: ignore[attr-defined]
    before = (stats.round_trips, stats.tokens, stats.drafted, stats.accepted)
    result = await client.chat([{"role": "user", "content": TASKS[task]}], max_tokens=tokens)
    trips, got, drafted, accepted = (a - b for a, b in zip((stats.round_trips, stats.tokens, stats.drafted,
                                                            stats.accepted), before))  # fmt: skip
    t = result.timing
    return {
        "ids": list(result.token_ids),
        "tokens_per_s": t.tokens_per_s,
        "ttft_s": t.time_to_first_token_s,
        "tokens_per_round_trip": got / max(1, trips),
        "acceptance": accepted / drafted if drafted else 0.0,
    }


async def bench(route: str, model: Path, runs: int, tokens: int, k: int) -> dict[str, Any]:
    # One client per mode for the whole run: a client learns what a drafted position costs.
    clients = {"off": AsyncSwarmClient.remote(route=route, model=model),
               "on": AsyncSwarmClient.remote(route=route, model=model, speculate=k)}  # fmt: skip
    for client in clients.values():
        await generate(client, "rewrite", 24)  # warm up (nodes, and the speculating client's cost estimate)
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {t: {"off": [], "on": []} for t in TASKS}
    for r in range(runs):
        for task in TASKS:
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                rows[task][mode].append(await generate(clients[mode], task, tokens))
        print(f"run {r + 1}/{runs} done", file=sys.stderr)
    for client in clients.values():
        await client.close()
    out: dict[str, Any] = {}
    for task, modes in rows.items():
        med = {m: {key: statistics.median(x[key] for x in xs) for key in ("tokens_per_s", "ttft_s",
                                                                          "tokens_per_round_trip", "acceptance")}
               for m, xs in modes.items()}  # fmt: skip
        same = sum(a["ids"] == b["ids"] for a, b in zip(modes["off"], modes["on"]))
        out[task] = {**med, "speedup": med["on"]["tokens_per_s"] / med["off"]["tokens_per_s"],
                     "tokens": len(modes["off"][0]["ids"]), "same_tokens": f"{same}/{runs}"}  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=6, help="drafts a step at most (speculation on)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument("--dtype", default="float32", help="node compute dtype (float32: exact; auto: the default)")
    args = parser.parse_args()

    from swarm_proto import store

    model = args.model or store.default_model_path()
    logs = Path(tempfile.mkdtemp(prefix="bench-speculation-"))
    nodes = [Node(model, layers, args.threads, logs / f"node{i}.log", extra=["--dtype", args.dtype])
             for i, layers in enumerate(LAYERS)]  # fmt: skip
    try:
        route = ",".join(f"{n.address}={n.layers[0]}:{n.layers[1]}" for n in nodes)
        t0 = time.monotonic()
        results = asyncio.run(bench(route, model, args.runs, args.tokens, args.k))
    finally:
        for n in nodes:
            n.stop()
    print(f"\nspeculation on loopback: 3 nodes, {args.dtype}, greedy, {args.tokens} tokens, k <= {args.k}, "
          f"median of {args.runs} runs ({time.monotonic() - t0:.0f} s)")  # fmt: skip
    print(f"{'task':8} {'mode':4} {'tok/s':>7} {'ttft ms':>8} {'tok/trip':>8} {'accept':>7} {'speedup':>8} {'same':>5}")
    for task, r in results.items():
        for mode in ("off", "on"):
            m = r[mode]
            extra = f"{r['speedup']:7.2f}x {r['same_tokens']:>5}" if mode == "on" else ""
            print(f"{task:8} {mode:4} {m['tokens_per_s']:7.1f} {1000 * m['ttft_s']:8.0f} "
                  f"{m['tokens_per_round_trip']:8.2f} {100 * m['acceptance']:6.0f}% {extra}")  # fmt: skip
    out = Path(__file__).parent / "results" / "speculation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"config": vars(args) | {"model": str(model)}, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
