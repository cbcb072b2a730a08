"""Assignment benchmark: automatic layer assignment vs an equal split, same three nodes.

Three ``swarm-node`` processes, one throttled to half speed. Two ways to throttle:

- ``--throttle quota`` (the default where this user may create cgroups): each node
  process runs in its own CPU cgroup capped at ``--cores`` (default 0.7,0.7,0.35 CPUs),
  with a 1 ms period so that every forward feels the cap. Each node then has a fixed
  share of the machine, as if it were its own computer, and the third has half of it.
- ``--throttle threads``: ``--threads`` torch threads per node (default 2,2,1). On a
  machine with fewer cores than threads in all, the nodes share cores and their
  speeds are not what the thread counts say (on 2 cores a 1-thread node measured
  fastest), so this only means something on a larger machine.

Two swarms run side by side, each with its own ``swarm-coordinator`` process
(embedded broker):

- auto:  the nodes join with ``--coordinator`` only; each measures its own speed and
  the coordinator assigns layers (shares of speed within memory);
- equal: the same three thread counts, pinned with ``--layers`` to thirds.

The workload is ``--sessions`` concurrent greedy generations of ``--tokens`` tokens
(through ``RoutedBackend``: GetRoute, then node to node), i.e. a throughput test; the
two swarms take turns ``--runs`` times so machine noise hits both alike. The swarm
not being measured sits idle.

    .venv/bin/python bench/assignment.py [--model PATH | --random H,I,L] [--throttle quota|threads]
        [--cores 0.7,0.7,0.35] [--threads 2,2,1] [--sessions 8] [--tokens 32] [--runs 3]
        [--out bench/results/assignment.json]

``--random 1536,4096,16`` builds a random-weight Llama (hidden, intermediate, layers)
where compute, not Python overhead, dominates a step; the default is the default model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from swarm_client.remote import RouteError
from swarm_client.routed import CoordinatorRoutes, RoutedBackend
from swarm_coordinator.broker import free_port
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.model_args import layer_bytes, read_args
from swarm_proto.wire import SamplingParams


def random_model(directory: Path, hidden: int, intermediate: int, layers: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = directory / f"random-llama-{hidden}-{intermediate}-{layers}"
    if (out / "config.json").exists():
        return out
    heads = max(1, hidden // 128)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


class CpuQuota:
    """A CPU cgroup capping its processes at ``cores`` CPUs (cgroup v2 ``cpu.max``, or
    v1's CFS quota), with a short period so that a forward of a few milliseconds is
    slowed evenly rather than run at full speed and then stopped."""

    PERIOD_US = 10_000  # 10 ms: the node measures its speed over 50 ms blocks (swarm_node.engine.speed)
    V2, V1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")

    def __init__(self, name: str, cores: float) -> None:
        self.cores = cores
        v2 = (self.V2 / "cgroup.controllers").exists() and "cpu" in (self.V2 / "cgroup.subtree_control").read_text()
        self.path = (self.V2 if v2 else self.V1) / f"llama-swarm-bench-{name}-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        quota = max(1000, int(cores * self.PERIOD_US))
        if v2:
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    @classmethod
    def available(cls) -> bool:
        """Whether this user may create CPU cgroups here."""
        try:
            probe = cls("probe", 1.0)
        except OSError:
            return False
        probe.remove()
        return True

    def enter(self) -> None:
        """Move the calling process in (run in the child before it execs)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


class Swarm:
    """A coordinator process and three node processes (the same programs a user runs)."""

    def __init__(
        self, name: str, model: Path, threads: list[int], pinned: bool, logs: Path, budget: int, cores: list[float] | None
    ) -> None:
        self.name, self.model, self.threads, self.pinned, self.logs = name, model, threads, pinned, logs
        self.budget = budget
        self.address = ""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.quotas = [CpuQuota(f"{name}-{i}", c) for i, c in enumerate(cores)] if cores else []
        tags = [f"c{round(c * 100)}" for c in cores] if cores else [f"t{t}" for t in threads]
        self.names = [f"{name}-{i}-{tag}" for i, tag in enumerate(tags)]

    def _spawn(self, argv: list[str], log_name: str, quota: CpuQuota | None = None) -> None:
        with (self.logs / log_name).open("wb") as log:
            self.procs.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=quota.enter if quota else None)
            )

    async def start(self) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        layers = read_args(self.model).num_layers
        cuts = [round(i * layers / len(self.threads)) for i in range(len(self.threads) + 1)]
        # The nodes start first (each measures its speed, one at a time, then waits for
        # the coordinator), so that they all join within one settle window: one plan.
        for i, (t, node_id) in enumerate(zip(self.threads, self.names)):
            argv = [sys.executable, "-m", "swarm_node.cli", "--coordinator", self.address, "--model", str(self.model),
                    "--port", "0", "--node-id", node_id, "--threads", str(t), "--max-length", "512",
                    "--memory-budget", str(self.budget)]
            if self.pinned:
                argv += ["--layers", f"{cuts[i]}:{cuts[i + 1]}"]
            self._spawn(argv, f"{node_id}.log", self.quotas[i] if self.quotas else None)
        await asyncio.sleep(3.0)
        self._spawn(
            [sys.executable, "-m", "swarm_coordinator.cli", "--model", str(self.model), "--port", str(port),
             "--mqtt-port", "0", "--http-port", "0", "--swarm-id", self.name, "--settle", "3"],
            f"{self.name}-coordinator.log",
        )
        await self.wait_ready(layers)

    def nodes(self) -> dict[str, tuple[int, int]]:
        with grpc.insecure_channel(self.address) as ch:
            listed = swarm_pb2_grpc.CoordinatorStub(ch).ListNodes(swarm_pb2.ListNodesRequest(), timeout=5).nodes
        return {n.node_id: (n.start, n.end) for n in listed if n.end > n.start}

    async def wait_ready(self, layers: int, timeout: float = 600.0) -> None:
        """Every node serves a range, the ranges cover the model, and nothing moved for 5 s."""
        deadline = time.monotonic() + timeout
        stable_since, last = 0.0, None
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a process of {self.name} exited; see the logs in {self.logs}")
            try:
                now = self.nodes()
            except grpc.RpcError:
                now = {}
            covered = set(now) == set(self.names) and all(
                any(a <= layer < b for a, b in now.values()) for layer in range(layers)
            )
            if covered and now == last:
                if time.monotonic() - stable_since >= 5.0:
                    return
            else:
                stable_since, last = time.monotonic(), now if covered else None
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name}: the model was not covered after {timeout:g} s")

    def layout(self) -> list[dict[str, Any]]:
        out = []
        for node_id, (a, b) in sorted(self.nodes().items(), key=lambda kv: kv[1]):
            log = (self.logs / f"{node_id}.log").read_text()
            measured = re.search(r"decode ([0-9.]+) ms per layer per token", log)
            out.append({"node": node_id, "layers": [a, b],
                        "decode_ms_per_layer": float(measured.group(1)) if measured else None})
        return out

    async def workload(self, sessions: int, tokens: int, prompt_len: int, vocab: int) -> float:
        """Tokens per second over ``sessions`` concurrent generations."""
        backend = RoutedBackend(CoordinatorRoutes(self.address), max_context=2048, eos_token_ids=())

        async def one(i: int) -> int:
            g = torch.Generator().manual_seed(i)
            prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
            n = 0
            async for _ in backend.tokens(prompt, SamplingParams(), tokens):
                n += 1
            return n

        t0 = time.perf_counter()
        counts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(sessions))), 600)
        elapsed = time.perf_counter() - t0
        await backend.aclose()
        return sum(counts) / elapsed

    async def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, 40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for q in self.quotas:
            q.remove()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    throttle = args.throttle or ("quota" if CpuQuota.available() else "threads")
    cores = [float(c) for c in args.cores.split(",")] if throttle == "quota" else None
    threads = [1, 1, 1] if cores else [int(t) for t in args.threads.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-assign-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.random:
        h, i, n = (int(x) for x in args.random.split(","))
        model = random_model(work, h, i, n)
    else:
        from swarm_proto.store import resolve_model

        model = resolve_model(args.model)
    vocab = read_args(model).vocab_size
    args_ = read_args(model)
    # Room for a bit more than half the model per node: no node can serve it alone, so the
    # swarm must split it into a pipeline (the case where the split matters).
    budget = int(layer_bytes(args_, "float32") * (args_.num_layers * args.memory_fraction + 0.5))
    auto = Swarm("auto", model, threads, pinned=False, logs=work, budget=budget, cores=cores)
    equal = Swarm("equal", model, threads, pinned=True, logs=work, budget=budget, cores=cores)
    results: dict[str, list[float]] = {"auto": [], "equal": []}
    try:
        # One at a time: each measures its speed on an otherwise quiet machine.
        await auto.start()
        await equal.start()
        for swarm in (auto, equal):  # warm-up: first forwards, channels
            await swarm.workload(2, 4, args.prompt_len, vocab)
        for _ in range(args.runs):
            for swarm in (auto, equal):
                results[swarm.name].append(await swarm.workload(args.sessions, args.tokens, args.prompt_len, vocab))
        layouts = {"auto": auto.layout(), "equal": equal.layout()}
    finally:
        await auto.stop()
        await equal.stop()
    auto_tps, equal_tps = statistics.median(results["auto"]), statistics.median(results["equal"])
    # Both layouts judged with the speeds the auto swarm's nodes measured (same thread
    # counts, node by node), so the estimate compares layouts, not measurements.
    measured = {n["node"].split("-", 1)[1]: n["decode_ms_per_layer"] for n in layouts["auto"]}
    same_speeds = [{**n, "decode_ms_per_layer": measured.get(n["node"].split("-", 1)[1])} for n in layouts["equal"]]
    estimate = {
        "auto": estimated_tokens_per_s(layouts["auto"], read_args(model).num_layers),
        "equal": estimated_tokens_per_s(same_speeds, read_args(model).num_layers),
    }
    return {
        "benchmark": "assignment",
        "model": model.name,
        "throttle": throttle,
        "cores": cores,
        "threads": threads,
        "sessions": args.sessions,
        "tokens_per_session": args.tokens,
        "prompt_tokens": args.prompt_len,
        "runs": args.runs,
        "memory_budget_bytes": budget,
        "auto_tokens_per_s": round(auto_tps, 2),
        "equal_tokens_per_s": round(equal_tps, 2),
        "speedup": round(auto_tps / equal_tps, 3),
        # what the coordinator's throughput model predicts from the speeds the nodes measured
        "estimated_tokens_per_s": {k: round(v, 2) for k, v in estimate.items()},
        "estimated_speedup": round(estimate["auto"] / estimate["equal"], 3) if estimate["equal"] else None,
        "all_runs": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "layouts": layouts,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def estimated_tokens_per_s(layout: list[dict[str, Any]], num_layers: int) -> float:
    """The coordinator's estimate (swarm_coordinator.assignment) for a layout, from the
    speeds its nodes measured."""
    from swarm_coordinator.assignment import estimate_throughput
    from swarm_coordinator.state import Assignment, LayerRange, NodeState, NodeStatus, NodeView, SwarmState

    views, ranges = [], {}
    for n in layout:
        if not n["layers"] or not n["decode_ms_per_layer"]:
            continue
        r = LayerRange(*n["layers"])
        views.append(NodeView(NodeStatus(n["node"], speed=1e3 / n["decode_ms_per_layer"], hosted=r, state=NodeState.READY)))
        ranges[n["node"]] = r
    return estimate_throughput(SwarmState.of("m", num_layers, 1, views), Assignment(ranges))


def table(r: dict[str, Any]) -> str:
    lines = [
        f"assignment benchmark: {r['model']}, "
        + (f"CPU quotas {r['cores']}" if r["cores"] else f"threads {r['threads']}")
        + f", {r['sessions']} sessions x {r['tokens_per_session']} tokens",
        f"{'split':<8}{'layers per node':<34}{'tokens/s (median)':>18}  runs",
    ]
    for name in ("auto", "equal"):
        layers = ", ".join(f"{n['node'].rsplit('-', 1)[1]}:{n['layers'][0]}-{n['layers'][1]}" for n in r["layouts"][name] if n["layers"])
        lines.append(f"{name:<8}{layers:<34}{r[name + '_tokens_per_s']:>18.2f}  {r['all_runs'][name]}")
    lines.append(f"speedup auto / equal: {r['speedup']:.2f}x (target >= 1.2x); "
                 f"the coordinator's model predicted {r['estimated_speedup']}x from the measured speeds")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default=None, help="model path or name (default: the default model)")
    p.add_argument("--random", default="", metavar="H,I,L", help="a random-weight Llama: hidden, intermediate, layers")
    p.add_argument("--throttle", choices=["quota", "threads"], default=None,
                   help="how the third node is slowed (default: quota where cgroups can be made, else threads)")
    p.add_argument("--cores", default="0.7,0.7,0.35", help="CPUs of the three nodes with --throttle quota")
    p.add_argument("--threads", default="2,2,1", help="torch threads of the three nodes with --throttle threads")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--memory-fraction", type=float, default=0.55, help="each node's memory budget, as a share of the model")
    p.add_argument("--workdir", default="", help="where node logs (and a random model) go")
    p.add_argument("--out", default="bench/results/assignment.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = asyncio.run(main_async(args))
    except (RouteError, RuntimeError, asyncio.TimeoutError) as exc:
        print(f"assignment benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
