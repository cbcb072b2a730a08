"""Failover benchmark: what a node's death costs a running generation (docs/failover.md).

1. Stall per failover: a swarm of five pinned ``swarm-node`` processes (tiny random
   model by default, 3 ranges x 2 copies, as in tests/e2e/test_failover.py); --kills
   generations each lose one node (head, middle, tail in turn) to SIGKILL at a random
   step. Stall = the kill -> the next token, split into detection (kill -> the client
   knows), rerouting (-> the new route is open) and replay (-> the next token). The
   killed node restarts meanwhile (new port). Every generation is checked against a
   run without failure.
2. Replay of a --history-token history on a 3-node route of the default model
   (SmolLM2-135M, 30 layers as [0, 10) [10, 20) [20, 30), plus a spare [10, 20)): the
   middle node is killed, and the replay (route open -> next token) is timed for a
   full replay (new session, every node recomputes the history) and a span replay
   (the survivors keep their caches; only the spare computes its 10 layers), the two
   taking turns --runs times.

Writes bench/results/failover.json and prints a table.

    .venv/bin/python bench/failover.py [--kills 24] [--runs 3] [--history 512] [--stall-model tiny|default|PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from e2e.chaos import GREEDY, SEEDED, ChaosSwarm, NodeSpec, add_tokenizer, generate, prompts  # noqa: E402

from swarm_client.failover import FailoverPolicy  # noqa: E402
from swarm_client.routed import RoutedBackend  # noqa: E402

FIVE = [NodeSpec("a", "0:2", 100), NodeSpec("b", "2:4", 100), NodeSpec("c", "4:6", 100),
        NodeSpec("d", "0:4", 40), NodeSpec("e", "4:6", 40)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def victim_at(backend: RoutedBackend, role: str) -> str:
    assert backend.last_route is not None
    hops = backend.last_route.hops
    return hops[{"head": 0, "middle": len(hops) // 2, "tail": len(hops) - 1}[role]].node_id


async def stalls(swarm: ChaosSwarm, kills: int, max_new: int = 24) -> list[dict[str, Any]]:
    names = list(swarm.specs)
    cases = list(zip(prompts(6), [GREEDY, SEEDED] * 3))
    backend = swarm.backend(FailoverPolicy(replay="span"))
    rng = random.Random(7)
    rows: list[dict[str, Any]] = []
    try:
        refs = [await generate(backend, p, params, max_new) for p, params in cases]
        for k in range(kills):
            await asyncio.to_thread(swarm.wait_nodes, names, 120)
            prompt, params = cases[k % len(cases)]
            role, step = ("head", "middle", "tail")[k % 3], rng.randrange(2, max_new - 2)
            marks: dict[str, Any] = {}

            def chaos(i: int, role: str = role, step: int = step, marks: dict[str, Any] = marks) -> None:
                if i == step:
                    marks["victim"] = victim_at(backend, role)
                    marks["kill"] = time.monotonic()
                    swarm.kill(marks["victim"])
                    # boots meanwhile; spawned off the event loop so the client goes on at once
                    threading.Thread(target=swarm.restart, args=(marks["victim"],), daemon=True).start()
                elif i == step + 1:
                    marks["next"] = time.monotonic()

            before = len(backend.records)
            got = await generate(backend, prompt, params, max_new, chaos)
            assert got == refs[k % len(cases)], f"kill {k}: tokens differ from the run without failure"
            record = list(backend.records)[before]
            detect = record.t_detected - marks["kill"]
            rows.append({
                "role": role, "node": marks["victim"], "step": step, "history": record.history_tokens,
                "stall_s": marks["next"] - marks["kill"], "detect_s": detect, "reroute_s": record.reroute_s,
                "replay_s": record.replay_s, "replayed_tokens": record.replayed_tokens, "kept": list(record.kept),
            })
            print(f"  kill {k + 1:2d}/{kills} {role:6s} {marks['victim']}: stall {rows[-1]['stall_s'] * 1e3:6.1f} ms "
                  f"(detect {detect * 1e3:5.1f}, reroute {record.reroute_s * 1e3:5.1f}, replay {record.replay_s * 1e3:5.1f})",
                  flush=True)
    finally:
        await backend.aclose()
    return rows


async def replays(swarm: ChaosSwarm, history: int, runs: int) -> dict[str, list[float]]:
    """Replay times of a ``history``-position session after its middle node dies."""
    names = list(swarm.specs)
    prompt = [random.Random(i).randrange(100, 40000) for i in range(history - 2)]
    out: dict[str, list[float]] = {"full": [], "span": []}
    for run in range(runs):
        for mode in ("full", "span") if run % 2 == 0 else ("span", "full"):
            await asyncio.to_thread(swarm.wait_nodes, names, 180)
            backend = swarm.backend(FailoverPolicy(replay=mode))
            try:
                await generate(backend, prompt[:8], GREEDY, 2)  # the step clock learns the route
                killed: list[str] = []

                def chaos(i: int) -> None:
                    if i == 2 and not killed:  # the session now holds `history` positions
                        killed.append(victim_at(backend, "middle"))
                        swarm.kill(killed[0])

                await generate(backend, prompt, GREEDY, 4, chaos)
                record = backend.records[-1]
                assert record.history_tokens == history, record.history_tokens
                out[mode].append(record.replay_s)
                print(f"  {mode} replay of {record.replayed_tokens}/{history} positions into "
                      f"{record.replayed_layers} layers (kept {record.kept}): {record.replay_s:.3f} s", flush=True)
            finally:
                await backend.aclose()
            swarm.restart(killed[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--kills", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--history", type=int, default=512)
    ap.add_argument("--stall-model", default="tiny", help="tiny (random 6-layer model), default, or a path")
    ap.add_argument("--skip-replay", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/failover.json"))
    args = ap.parse_args()

    from swarm_proto.store import default_model_path, is_present, pull

    if not is_present(verify=False):
        pull()
    smol = default_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    result: dict[str, Any] = {"kills": args.kills, "history": args.history}

    if args.stall_model == "tiny":
        from helpers import make_tiny_model

        stall_model = add_tokenizer(make_tiny_model(tmp, "llama3"))
        specs = FIVE
    else:
        stall_model = smol if args.stall_model == "default" else Path(args.stall_model)
        specs = [NodeSpec("a", "0:10", 100), NodeSpec("b", "10:20", 100), NodeSpec("c", "20:30", 100),
                 NodeSpec("d", "0:20", 40), NodeSpec("e", "20:30", 40)]
    print(f"stall per failover: {args.kills} kills on {stall_model.name}", flush=True)
    swarm = ChaosSwarm(stall_model, tmp / "stall", swarm_id="bench-stall")
    (tmp / "stall").mkdir()
    try:
        swarm.start(specs, timeout=300)
        rows = asyncio.run(stalls(swarm, args.kills))
    finally:
        swarm.close()
    result["stall_model"] = stall_model.name
    result["stalls"] = rows
    summary = {}
    for key in ("stall_s", "detect_s", "reroute_s", "replay_s"):
        values = [r[key] for r in rows]
        summary[key] = {"p50": pct(values, 0.5), "p95": pct(values, 0.95), "max": max(values)}
    result["stall_summary"] = summary

    if not args.skip_replay:
        print(f"replay of a {args.history}-token history on a 3-node route of {smol.name}", flush=True)
        (tmp / "replay").mkdir()
        swarm = ChaosSwarm(smol, tmp / "replay", swarm_id="bench-replay", max_length=args.history + 64)
        try:
            swarm.start([NodeSpec("h", "0:10", 100), NodeSpec("m", "10:20", 100), NodeSpec("t", "20:30", 100),
                         NodeSpec("s", "10:20", 40)], timeout=300)
            times = asyncio.run(replays(swarm, args.history, args.runs))
        finally:
            swarm.close()
        result["replay"] = {mode: {"runs": v, "median_s": statistics.median(v)} for mode, v in times.items()}
        result["replay"]["speedup"] = result["replay"]["full"]["median_s"] / result["replay"]["span"]["median_s"]

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"| stall per failover ({len(rows)} kills, {result['stall_model']}) | p50 ms | p95 ms | max ms |")
    print("|---|---|---|---|")
    for key, label in (("stall_s", "kill -> next token"), ("detect_s", "detection"), ("reroute_s", "rerouting"),
                       ("replay_s", "replay")):
        s = summary[key]
        print(f"| {label} | {s['p50'] * 1e3:.1f} | {s['p95'] * 1e3:.1f} | {s['max'] * 1e3:.1f} |")
    if "replay" in result:
        r = result["replay"]
        print()
        print(f"| replay of a {args.history}-token history, 3-node route ({smol.name}) | median s | runs |")
        print("|---|---|---|")
        for mode in ("full", "span"):
            print(f"| {mode} | {r[mode]['median_s']:.3f} | {', '.join(f'{x:.3f}' for x in r[mode]['runs'])} |")
        print(f"| span speedup | {r['speedup']:.2f}x | |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
