"""Scale benchmark: the control plane with N simulated nodes under churn.

A real broker (mosquitto by default; ``--broker embedded`` runs amqtt in a process of
its own, as a coordinator embeds it), one real ``swarm-coordinator`` process per model
(two models: an 80-layer 70B shape and a 64-layer 32B shape), and N simulated nodes
(:mod:`swarm_coordinator.sim`): real MQTT presence, no compute, hardware drawn from
consumer GPUs, Macs and CPUs, Poisson churn with a configurable mean lifetime, time
compressed by ``--speedup``. Prints and writes: coverage per model (share of sampled
instants at which every layer was served), GetRoute latency p50/p99 under
``--route-rate`` requests/s, layers reloaded per node per simulated hour, coordinator
CPU and memory, broker messages/s, and a timeline of coverage and churn
(``--plot PNG`` draws it when matplotlib is installed).

    .venv/bin/python bench/scale.py --nodes 1000 --minutes 2 --json bench/results/scale-1000.json
    .venv/bin/python bench/scale.py --sweep 100,300,1000,3000 --minutes 1 --json bench/results/scale-sweep.json
    .venv/bin/python bench/scale.py --nodes 3000 --speedup 10 --sim-procs 3 --json bench/results/scale-3000.json

``--sim-procs K`` hosts the simulated nodes in K worker processes (each node still with its
own MQTT connection and Last Will): one Python process cannot keep 3,000 connections
answered on this machine. The bench reports each simulator process's CPU and the load
average beside the figures.

``--minutes`` is real (wall-clock) minutes of measurement after warm-up. Each coordinator
reports its time inside GetRoute (wall and CPU) and its event loop's lag (how late a
10 ms timer fires: about what a request waits before its handler starts). With
``SWARM_SIM_PROFILE=DIR`` in the environment the coordinators run under cProfile and
write ``DIR/<model>.prof`` as they stop. ``bench/scale_plot.py`` draws route latency
against N from the JSON files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from swarm_coordinator.broker import MosquittoBroker, free_port
from swarm_coordinator.sim.harness import Harness, SimConfig


def run_once(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    config = SimConfig(
        nodes=nodes,
        seconds=args.minutes * 60,
        speedup=args.speedup,
        mean_lifetime=args.lifetime_min * 60,
        route_rate=args.route_rate,
        churn=not args.no_churn,
        seed=args.seed,
        warmup_timeout=args.warmup_timeout,
        join_batch=args.join_batch,
        procs=args.sim_procs,
    )

    async def go(url: str) -> dict[str, Any]:
        async with Harness(config, url) as harness:
            return await harness.run()

    if args.broker == "mosquitto":
        with MosquittoBroker() as broker:
            result = asyncio.run(go(broker.url))
            result["broker"] = "mosquitto"
            return result
    port = free_port()
    code = (
        "import asyncio\nfrom swarm_coordinator.broker import EmbeddedBroker\n"
        f"async def main():\n    async with EmbeddedBroker('127.0.0.1', {port}):\n        await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(3.0)
        result = asyncio.run(go(f"mqtt://127.0.0.1:{port}"))
        result["broker"] = "embedded"
        return result
    finally:
        proc.terminate()
        proc.wait(15)


def micro(counts: list[int], calls: int = 500, seed: int = 1) -> list[dict[str, Any]]:
    """The coordinator's own work without processes or a network: route computation
    (a snapshot and its RouteIndex every 10 routes, as at 100 routes/s, then
    RouteIndex.route) and one incremental plan per churn event, at N nodes
    of the 80-layer model, one process, on this machine as loaded as it is."""
    import random
    from dataclasses import replace

    from swarm_coordinator.assignment import AssignmentPolicy
    from swarm_coordinator.planner import ReloadBudget, decide
    from swarm_coordinator.routing import RecentRoutes, RouteIndex, find_route
    from swarm_coordinator.sim.fleet import GB, draw_profile
    from swarm_coordinator.sim.harness import MODELS
    from swarm_coordinator.state import NodeView, SwarmState
    from swarm_proto.presence import Assign, NodeLoad, NodeState, NodeStatus

    model = MODELS[0]
    out = []
    for n in counts:
        rng = random.Random(seed)

        def node(i: int, rng: random.Random = rng) -> NodeView:
            p = draw_profile(rng)
            status = NodeStatus(f"n{i:05d}", f"10.0.0.1:{i}", model.name, None, p.name, int(p.memory_gb * GB),
                                p.speed(model.layer_bytes), NodeState.STARTING, layer_bytes=model.layer_bytes)
            return NodeView(status, NodeLoad(free_kv_tokens=30000, kv_tokens=30000, free_sessions=10))

        views = [node(i) for i in range(n)]
        policy = AssignmentPolicy(max(1, n // 5))
        state = SwarmState.of(model.name, model.num_layers, model.layer_bytes, views)
        a = decide(state, policy)
        assert a is not None
        views = [replace(v, status=replace(v.status, hosted=a.get(v.node_id), state=NodeState.READY),
                         assign=Assign(v.node_id, model.name, a.get(v.node_id), 1)) for v in views]
        state = SwarmState.of(model.name, model.num_layers, model.layer_bytes, views)
        recent = RecentRoutes()
        times = []
        index = RouteIndex(state)
        for k in range(calls):
            t = time.perf_counter()
            if k % 10 == 0:  # at 100 routes/s a snapshot serves 10 (rpc.ROUTE_STATE_MAX_AGE_S = 0.1)
                # in 0.1 s a twentieth of the nodes report their load (every 2 s): new views
                nodes = dict(state.nodes)
                for node_id in rng.sample(sorted(nodes), k=max(1, n // 20)):
                    nodes[node_id] = replace(nodes[node_id], load=replace(nodes[node_id].load))
                fresh = SwarmState.of(model.name, model.num_layers, model.layer_bytes, nodes.values())
                index = RouteIndex(fresh, recent=recent.counts(k * 0.01), previous=index)  # as rpc.py does
            spans = index.route(max_length=2048, recent=recent.counts(k * 0.01))
            times.append(time.perf_counter() - t)
            recent.record(spans, k * 0.01)
        check = find_route(state, max_length=2048, recent=recent.counts(calls * 0.01))
        assert check == index.route(max_length=2048, recent=recent.counts(calls * 0.01))
        times.sort()
        budget = ReloadBudget()
        plan_times = []
        for k in range(10):  # a crash and a join, planned incrementally
            gone = state.without_node(f"n{rng.randrange(n):05d}").with_node(node(n + k))
            t = time.perf_counter()
            decide(gone, policy, full=False, budget=budget)
            plan_times.append(time.perf_counter() - t)
        plan_times.sort()
        row = {"nodes": n, "route_p50_ms": round(1000 * times[len(times) // 2], 3),
               "route_p99_ms": round(1000 * times[int(0.99 * len(times))], 3),
               "plan_per_event_ms": round(1000 * plan_times[len(plan_times) // 2], 2)}
        print(f"  in-process, {n:>5} nodes: route p50 {row['route_p50_ms']:.2f} ms p99 {row['route_p99_ms']:.2f} ms; "
              f"incremental plan per event {row['plan_per_event_ms']:.1f} ms", flush=True)
        out.append(row)
    return out


def summary(r: dict[str, Any]) -> str:
    cov = ", ".join(f"{m} {100 * c:.2f}%" for m, c in r["coverage"].items())
    cpu = "+".join(f"{c:.0f}%" for c in r["coordinator_cpu_percent"].values())
    rss = "+".join(f"{m:.0f}" for m in r["coordinator_rss_mb"].values())
    growth = "+".join(f"{m:.0f}" for m in r["coordinator_rss_growth_mb"].values())
    sims = ", ".join(f"{name} {c:.0f}%" for name, c in r.get("simulator_cpu_percent", {}).items())
    load = " / ".join(f"{x:.1f}" for x in r.get("load_average", [])[:3]) + " -> " + " / ".join(
        f"{x:.1f}" for x in r.get("load_average", [])[3:])
    at = "; ".join(
        f"{m}: p50 {s['route_p50_ms']:.2f} ms p99 {s['route_p99_ms']:.2f} ms "
        f"(CPU p50 {s['route_cpu_p50_ms']:.2f} p99 {s['route_cpu_p99_ms']:.2f} ms; loop lag p50 {s.get('loop_lag_p50_ms', 0):.2f} "
        f"p99 {s.get('loop_lag_p99_ms', 0):.2f} max {s.get('loop_lag_max_ms', 0):.0f} ms), {s['plans']} plans of {s['plan_ms_mean']:.1f} ms"
        for m, s in r["coordinator"].items()
    )
    return (
        f"{r['nodes']:>5} nodes, {r['simulated_minutes']:.0f} sim min ({r['broker']}): coverage {cov}\n"
        f"      GetRoute at the coordinator: {at}\n"
        f"      GetRoute round trip (simulator side): p50 {r['routes']['p50_ms']:.1f} ms p99 {r['routes']['p99_ms']:.1f} ms "
        f"({r['routes']['ok']} ok, {r['routes']['failed']} failed, {r['routes']['rate_per_s']:.0f}/s)\n"
        f"      reloads {r['reloads_per_node_hour']:.2f}/node/h; churn {r['churn']}; "
        f"coordinators CPU {cpu}, RSS {rss} MB (grew {growth} MB); broker {r['broker_msgs_per_s']} msgs/s\n"
        f"      simulator CPU {sims} ({r.get('simulator_procs', 1)} node processes); load average {load}"
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if len(results) > 1 else 1, figsize=(12, 4), squeeze=False)
    last = results[-1]
    ax = axes[0][0]
    for model, points in last["timeline"]["coverage"].items():
        ax.plot([t for t, _ in points], [100 * c for _, c in points], label=f"{model} layers served %")
    churn = last["timeline"]["churn"]
    ax2 = ax.twinx()
    ax2.bar([t for t, _ in churn], [n for _, n in churn], width=0.8, alpha=0.3, color="gray", label="churn events/s")
    ax.set_xlabel("seconds (real)")
    ax.set_title(f"{last['nodes']} nodes: coverage and churn")
    ax.legend(loc="lower left")
    if len(results) > 1:
        ax = axes[0][1]
        ns = [r["nodes"] for r in results]
        ax.plot(ns, [r["routes"]["p50_ms"] for r in results], "o-", label="p50")
        ax.plot(ns, [r["routes"]["p99_ms"] for r in results], "o-", label="p99")
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel("GetRoute ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--sweep", default="", help="comma-separated node counts, run one after another")
    p.add_argument("--minutes", type=float, default=1.0, help="real minutes measured after warm-up")
    p.add_argument("--speedup", type=float, default=30.0, help="simulated seconds per real second")
    p.add_argument("--lifetime-min", type=float, default=30.0, help="mean node lifetime, simulated minutes")
    p.add_argument("--route-rate", type=float, default=100.0)
    p.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    p.add_argument("--no-churn", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-timeout", type=float, default=300.0)
    p.add_argument("--join-batch", type=int, default=50, help="initial joins in flight at once")
    p.add_argument("--sim-procs", type=int, default=1,
                   help="processes hosting the simulated nodes (1: the bench's own; K > 1: K workers, none in the bench)")
    p.add_argument("--micro", default="", help="comma-separated node counts: in-process route and plan timings only")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("swarm_proto").setLevel(logging.WARNING)
    if args.micro:
        rows = micro([int(n) for n in args.micro.split(",")])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))
        return
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.nodes]
    results = []
    for n in counts:
        r = run_once(args, n)
        r.setdefault("broker", args.broker)
        print(summary(r), flush=True)
        results.append(r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results if len(results) > 1 else results[0], indent=1))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
