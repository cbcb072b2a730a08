"""The scale harness: real coordinators, a real broker, N simulated nodes with churn.

:class:`Harness` runs, in one asyncio loop, the simulated nodes of :mod:`.fleet` (each a
real MQTT presence) for two models at once, one ``swarm-coordinator`` process per
model (each its own swarm id on the same broker: a coordinator serves one model), a
Poisson churn of joins, graceful leaves and crashes, a load of ``GetRoute`` calls over
real gRPC, and a sampler of coverage. Time is compressed by ``speedup`` (simulated
seconds per real second): lifetimes, load times, the reload window and the rebalance
interval are divided by it; MQTT keepalives and heartbeats stay real.

With ``procs > 1`` the nodes run in that many worker processes instead (:mod:`.worker`,
:mod:`.shard`), each node still with its own MQTT connection and Last Will; the harness
keeps the coordinators, the route load, the sampler and the figures, and merges the
workers' counts.

Coverage is ground truth, from the simulated nodes themselves: at each sample, is every
layer of the model served by a live node that reports READY with it? (Each process counts
its nodes' served layers as their states change, :class:`.shard.ServedLayers`, and the
sampler ORs the processes' masks.) Routes are what
the coordinator answers. Reloads are counted at the nodes (an assignment that moves a
node already hosting a range), per node-hour of simulated time.

Invariants: every structure grows with the number of samples or routes only in
counters (percentile samples are a bounded reservoir), never per message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from swarm_coordinator.sim.fleet import SimNode, draw_profile
from swarm_coordinator.sim.shard import ServedLayers, shares
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.model_args import ModelArgs, layer_bytes
from swarm_proto.presence import LayerRange
from swarm_proto.presence_client import BrokerAddress
from swarm_proto.transport import call_metadata

log = logging.getLogger(__name__)

__all__ = ["MODELS", "Harness", "SimConfig", "SimModel", "percentile"]


@dataclass(frozen=True)
class SimModel:
    name: str  # also the swarm id
    share: float  # of the nodes that join it
    config: dict[str, Any]  # an HF config.json: the coordinator reads the shape from it

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer at 8 bits per weight (half of bfloat16)."""
        return layer_bytes(ModelArgs.from_hf_config(self.config), "bfloat16") // 2


def _llama(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int, arch: str = "llama") -> dict[str, Any]:
    return {"model_type": arch, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": inter,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab}


MODELS: tuple[SimModel, ...] = (
    SimModel("llama-70b", 0.7, _llama(80, 8192, 28672, 64, 8, 128256)),  # the 70B shape
    SimModel("qwen-32b", 0.3, _llama(64, 5120, 27648, 40, 8, 152064, "qwen2")),
)


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 200
    seconds: float = 30.0  # measured, after warm-up (real seconds)
    speedup: float = 30.0  # simulated seconds per real second
    mean_lifetime: float = 1800.0  # simulated seconds
    load_s_per_layer: float = 0.5  # simulated seconds to load one layer
    route_rate: float = 100.0  # GetRoute calls per real second, all models together
    sample_interval: float = 0.1  # real seconds between coverage samples
    replicas: int = 0  # the coordinators' --replicas; 0: enough that chains are ~5 nodes
    reload_budget: int = 2  # per node per simulated hour
    churn: bool = True
    seed: int = 1
    models: tuple[SimModel, ...] = MODELS
    warmup_timeout: float = 120.0
    join_batch: int = 50  # initial joins in flight at once
    token: str = "sim-token"  # the swarm token: nodes are admitted by its proof, routes carry it ("": open swarms)
    procs: int = 1  # processes hosting the nodes: 1, this one; K > 1, K worker processes (none here)


PLACED_QUIET_S = 5.0  # warm-up: placement is over when no node got an assignment for this long


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class _Worker:
    """A worker process hosting a share of the nodes (:mod:`.worker`)."""

    index: int
    proc: asyncio.subprocess.Process
    nodes: int
    joined: int = 0
    assigned: int = 0  # its nodes that have an assignment (warm-up)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stats: asyncio.Future[dict[str, Any]] | None = None
    reader: asyncio.Task[None] | None = None

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": command}).encode() + b"\n")


@dataclass
class _ModelRun:
    model: SimModel
    address: str = ""
    proc: asyncio.subprocess.Process | None = None
    samples: int = 0
    covered: int = 0
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (t, share of layers served)


class Harness:
    """``async with Harness(config, broker_url) as h: report = await h.run()``."""

    def __init__(
        self,
        config: SimConfig,
        broker_url: str,
        *,
        workdir: Path | None = None,
        worker: int = -1,
        emit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``worker >= 0`` and ``emit``: this is worker process ``worker`` of a harness
        (:mod:`.worker`): node ids get its number, and each change of the layers its
        nodes serve is sent with ``emit``."""
        self.config = config
        self._prefix = "sim" if worker < 0 else f"sim{worker}x"
        self._emit = emit
        self.served = {m.name: ServedLayers(m.num_layers) for m in config.models}
        self.remote: dict[tuple[int, str], int] = {}  # (worker, model) -> its mask of served layers
        self.workers: list[_Worker] = []
        self.broker_url = broker_url
        self.broker = BrokerAddress.parse(broker_url)
        self.rng = random.Random(config.seed)
        self._tmp = tempfile.TemporaryDirectory(prefix="swarm-sim-") if workdir is None else None
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.runs = [_ModelRun(m) for m in config.models]
        self._metadata = call_metadata(config.token)  # the swarm token on every GetRoute
        self.live: dict[str, tuple[SimNode, _ModelRun, float]] = {}  # node id -> node, model, joined (real)
        self._serial = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.joins = self.leaves = self.crashes = 0
        self.reloads = 0  # nodes moved while hosting, over all nodes (live and gone)
        self.node_seconds = 0.0  # real seconds of node life, over all nodes
        self.route_ok = self.route_failed = 0
        self.route_ms: list[float] = []  # a reservoir
        self.route_errors: dict[str, int] = {}  # by status code name (a handful of keys)
        self.route_error_samples: list[str] = []
        self._route_seen = 0
        self.churn_timeline: list[tuple[float, int]] = []  # (t, churn events in that second)
        self._churn_now = 0
        self._t0 = math.inf  # start of the measured run
        self.placed_at_start = 0  # nodes with an assignment when the measured run started

    # --- coordinators ------------------------------------------------------------------

    async def __aenter__(self) -> Harness:
        cfg = self.config
        scale = 1.0 / cfg.speedup
        for run in self.runs:
            folder = self.workdir / run.model.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(run.model.config))
            port = _free_port()
            replicas = cfg.replicas or max(1, int(cfg.nodes * run.model.share) // 5)
            argv = [
                sys.executable, *_profiler(run.model.name), "-m", "swarm_coordinator.cli", "--model", str(folder), "--port", str(port),
                "--http-port", "0", "--mqtt", self.broker_url, "--swarm-id", run.model.name,
                "--replicas", str(replicas), "--settle", "0.2", "--node-timeout", "10", "--forget-after", str(max(2.0, 600 * scale)),
                "--rebalance-interval", str(max(1.0, 600 * scale)),
                "--reload-budget", str(cfg.reload_budget), "--reload-window", str(3600 * scale),
                "--coordinator-id", f"sim-{run.model.name}", "--log-level", "info",
            ]
            log_file = (self.workdir / f"{run.model.name}.log").open("w")
            run.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=log_file, env={**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_TOKEN": cfg.token}
            )
            assert run.proc.stdout is not None
            line = await asyncio.wait_for(run.proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError(f"coordinator of {run.model.name} did not start: see {log_file.name}")
            run.address = f"127.0.0.1:{port}"
        if cfg.procs > 1:
            await self._start_workers()
        return self

    async def _start_workers(self) -> None:
        cfg = self.config
        batch = max(1, math.ceil(cfg.join_batch / cfg.procs))  # the same joins in flight in all
        for index, nodes in enumerate(shares(cfg.nodes, cfg.procs)):
            sub = replace(cfg, nodes=nodes, procs=1, join_batch=batch, seed=cfg.seed * 1000 + index + 1)
            spec = {"config": {k: v for k, v in asdict(sub).items() if k != "models"},
                    "models": [asdict(m) for m in cfg.models], "broker": self.broker_url, "index": index}
            log_file = (self.workdir / f"worker{index}.log").open("w")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "swarm_coordinator.sim.worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log_file, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            worker = _Worker(index, proc, nodes, stats=asyncio.get_running_loop().create_future())
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(spec).encode() + b"\n")
            worker.reader = asyncio.get_running_loop().create_task(self._read_worker(worker))
            self.workers.append(worker)

    async def _read_worker(self, worker: _Worker) -> None:
        """Fold one worker's reports in: masks of served layers, churn, joins, final counts."""
        assert worker.proc.stdout is not None
        async for line in worker.proc.stdout:
            msg = json.loads(line)
            if "mask" in msg:
                model, mask = msg["mask"]
                self.remote[(worker.index, model)] = int(mask)
            elif "assigned" in msg:
                worker.assigned = int(msg["assigned"])
            elif "churn" in msg:
                self._churn_now += int(msg["churn"])
            elif "joined" in msg:
                worker.joined = int(msg["joined"])
                if msg.get("done"):
                    worker.ready.set()
            elif "stats" in msg and worker.stats is not None and not worker.stats.done():
                worker.stats.set_result(msg["stats"])
        if worker.stats is not None and not worker.stats.done():
            worker.stats.set_exception(RuntimeError(f"simulator worker {worker.index} exited: see worker{worker.index}.log"))
        worker.ready.set()

    async def _stop_workers(self) -> None:
        for worker in self.workers:
            if worker.proc.returncode is None:
                try:
                    worker.send("exit")
                except (ConnectionError, RuntimeError):
                    pass
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.proc.wait(), 60)
            except asyncio.TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
            if worker.reader is not None:
                await asyncio.gather(worker.reader, return_exceptions=True)
        self.workers.clear()

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.leave_all()
        await self._stop_workers()
        await self._stop_coordinators()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def leave_all(self) -> None:
        await asyncio.gather(*(node.leave() for node, _, _ in self.live.values()), return_exceptions=True)
        self.live.clear()

    async def _stop_coordinators(self) -> dict[str, dict[str, Any]]:
        """SIGTERM each coordinator; returns the stats line each logs as it stops."""
        stats: dict[str, dict[str, Any]] = {}
        for run in self.runs:
            if run.proc is not None and run.proc.returncode is None:
                run.proc.terminate()
                try:
                    await asyncio.wait_for(run.proc.wait(), 30)
                except asyncio.TimeoutError:
                    run.proc.kill()
                    await run.proc.wait()
            try:
                lines = (self.workdir / f"{run.model.name}.log").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                if "coordinator stats " in line:
                    stats[run.model.name] = json.loads(line.split("coordinator stats ", 1)[1])
        return stats

    @property
    def coordinator_pids(self) -> list[int]:
        return [run.proc.pid for run in self.runs if run.proc is not None]

    # --- nodes -----------------------------------------------------------------------------

    def _pick_model(self) -> _ModelRun:
        return self.rng.choices(self.runs, weights=[r.model.share for r in self.runs])[0]

    async def _join(self) -> str:
        run = self._pick_model()
        self._serial += 1
        node = SimNode(
            self.broker, run.model.name, run.model.name, f"{self._prefix}{self._serial:05d}", draw_profile(self.rng),
            run.model.layer_bytes, self.rng, load_s_per_layer=self.config.load_s_per_layer / self.config.speedup,
            token=self.config.token, on_serving=lambda node, span, run=run: self._on_serving(run, node, span),
        )
        await node.join()
        self.live[node.node_id] = (node, run, time.monotonic())
        self.joins += 1
        return node.node_id

    def _on_serving(self, run: _ModelRun, node: SimNode, span: LayerRange | None) -> None:
        served = self.served[run.model.name]
        if served.set(node.node_id, span) and self._emit is not None:
            self._emit({"mask": [run.model.name, served.mask]})

    async def _exit(self, node_id: str) -> None:
        node, run, joined = self.live.pop(node_id)
        self._on_serving(run, node, None)
        self.node_seconds += time.monotonic() - max(joined, self._t0)
        self.reloads += max(0, node.loads - 1)
        if self.rng.random() < node.profile.crash_share:
            self.crashes += 1
            await node.crash()
        else:
            self.leaves += 1
            await node.leave()

    async def _life(self, node_id: str) -> None:
        """One node's life: an exponential lifetime, then it leaves or crashes and a newcomer joins."""
        lifetime = self.rng.expovariate(self.config.speedup / self.config.mean_lifetime)
        await asyncio.sleep(lifetime)
        self._churn_now += 2
        await self._exit(node_id)
        self._spawn(self._life(await self._join()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- measuring -----------------------------------------------------------------------

    def _coverage(self, run: _ModelRun) -> float:
        name = run.model.name
        mask = self.served[name].mask
        for worker in self.workers:
            mask |= self.remote.get((worker.index, name), 0)
        return mask.bit_count() / run.model.num_layers

    async def _sampler(self, t0: float) -> None:
        while True:
            now = time.monotonic() - t0
            for run in self.runs:
                share = self._coverage(run)
                run.samples += 1
                run.covered += share == 1.0
                if not run.timeline or now - run.timeline[-1][0] >= 0.5:
                    run.timeline.append((round(now, 2), share))
            if not self.churn_timeline or now - self.churn_timeline[-1][0] >= 1.0:
                self.churn_timeline.append((round(now, 2), self._churn_now))
                self._churn_now = 0
            await asyncio.sleep(self.config.sample_interval)

    async def _router(self) -> None:
        channels = {run.model.name: grpc.aio.insecure_channel(run.address) for run in self.runs}
        stubs = {name: swarm_pb2_grpc.CoordinatorStub(ch) for name, ch in channels.items()}
        interval = 1.0 / self.config.route_rate
        try:
            next_at = time.monotonic()
            while True:
                run = self._pick_model()
                self._spawn(self._one_route(stubs[run.model.name]))
                next_at += self.rng.expovariate(1.0 / interval)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            for ch in channels.values():
                await ch.close()

    async def _one_route(self, stub: swarm_pb2_grpc.CoordinatorStub) -> None:
        started = time.perf_counter()
        try:
            await stub.GetRoute(swarm_pb2.RouteRequest(max_length=2048), timeout=5.0, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self.route_failed += 1
            code = exc.code().name
            self.route_errors[code] = self.route_errors.get(code, 0) + 1
            if len(self.route_error_samples) < 5:
                self.route_error_samples.append(f"{code}: {exc.details()}"[:300])
            return
        self.route_ok += 1
        ms = (time.perf_counter() - started) * 1000
        self._route_seen += 1
        if len(self.route_ms) < 20000:
            self.route_ms.append(ms)
        else:  # reservoir sampling keeps the percentiles honest and the memory bounded
            k = self.rng.randrange(self._route_seen)
            if k < len(self.route_ms):
                self.route_ms[k] = ms

    async def join_initial(self) -> None:
        """Join this process's initial nodes, ``join_batch`` at a time."""
        t0 = time.monotonic()
        batch = self.config.join_batch
        for start in range(0, self.config.nodes, batch):
            await asyncio.gather(*(self._join() for _ in range(min(batch, self.config.nodes - start))))
            log.info("warm-up: %d nodes joined after %.1f s", len(self.live), time.monotonic() - t0)
            if self._emit is not None:
                self._emit({"joined": len(self.live)})

    async def _warm_up(self) -> float:
        """Join the initial nodes and wait until every model is covered; returns seconds."""
        t0 = time.monotonic()
        if self.workers:
            for worker in self.workers:
                worker.send("join")
            for worker in self.workers:
                remaining = self.config.warmup_timeout - (time.monotonic() - t0)
                try:
                    await asyncio.wait_for(worker.ready.wait(), max(1.0, remaining))
                except asyncio.TimeoutError:
                    raise TimeoutError(f"simulator workers joined {[w.joined for w in self.workers]} of "
                                       f"{[w.nodes for w in self.workers]} nodes in {self.config.warmup_timeout:g} s") from None
                if worker.proc.returncode is not None or worker.joined < worker.nodes:
                    raise RuntimeError(f"simulator worker {worker.index} failed: see worker{worker.index}.log")
            log.info("warm-up: %d nodes joined in %d workers after %.1f s",
                     sum(w.joined for w in self.workers), len(self.workers), time.monotonic() - t0)
        else:
            await self.join_initial()
        while not all(self._coverage(run) == 1.0 for run in self.runs):
            if time.monotonic() - t0 > self.config.warmup_timeout:
                raise TimeoutError(f"not covered after {self.config.warmup_timeout:g} s: "
                                   + ", ".join(f"{r.model.name} {self._coverage(r):.0%}" for r in self.runs))
            await asyncio.sleep(0.2)
            if int(time.monotonic() - t0) % 10 == 0:
                log.info("warm-up: %s", ", ".join(f"{r.model.name} {self._coverage(r):.0%}" for r in self.runs))
        for run in self.runs:  # and until each coordinator has heard that they are ready
            async with grpc.aio.insecure_channel(run.address) as channel:
                stub = swarm_pb2_grpc.CoordinatorStub(channel)
                while True:
                    try:
                        await stub.GetRoute(swarm_pb2.RouteRequest(max_length=2048), timeout=5.0, metadata=self._metadata)
                        break
                    except grpc.aio.AioRpcError:
                        if time.monotonic() - t0 > self.config.warmup_timeout:
                            raise
                        await asyncio.sleep(0.2)
        # and until the coordinators have placed the newcomers: a plan placing a burst of
        # them holds a coordinator's loop for seconds at 3,000 nodes (docs/scale.md), so the
        # measured run starts in steady churn, not in the tail of the joins. Spare nodes
        # beyond the replicas may never get an assignment: placement is done when every
        # node has one or the count has not moved for PLACED_QUIET_S.
        last, since = -1, time.monotonic()
        while self.placed() < self.config.nodes and time.monotonic() - since < PLACED_QUIET_S:
            if self.placed() != last:
                last, since = self.placed(), time.monotonic()
            if time.monotonic() - t0 > self.config.warmup_timeout:
                log.warning("warm-up: %d of %d nodes placed after %.0f s; measuring anyway",
                            self.placed(), self.config.nodes, time.monotonic() - t0)
                break
            await asyncio.sleep(0.2)
        self.placed_at_start = self.placed()
        return time.monotonic() - t0

    def assigned(self) -> int:
        """This process's live nodes that have received an assignment (a range or none)."""
        return sum(node.presence.assignment is not None for node, _, _ in self.live.values())

    def placed(self) -> int:
        """Nodes with an assignment, here and in the workers (as they last reported)."""
        return self.assigned() + sum(w.assigned for w in self.workers)

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        asyncio.get_running_loop().set_exception_handler(_quiet_crashes)
        warm = await self._warm_up()
        before = {pid: _proc_cpu(pid) for pid in self.coordinator_pids}
        sims = {"harness": os.getpid(), **{f"worker{w.index}": w.proc.pid for w in self.workers}}
        sim_before = {name: _proc_cpu(pid) for name, pid in sims.items()}
        load_before = os.getloadavg()
        rss0 = {pid: _proc_rss(pid) for pid in before}
        msgs0 = await _broker_received(self.broker_url)
        t0 = time.monotonic()
        self.start_churn()
        for worker in self.workers:
            worker.send("start")
        self._spawn(self._sampler(t0))
        self._spawn(self._router())
        await asyncio.sleep(cfg.seconds)
        elapsed = time.monotonic() - t0
        cpu = {pid: _proc_cpu(pid) - before[pid] for pid in before}
        sim_cpu = {name: _proc_cpu(pid) - sim_before[name] for name, pid in sims.items()}
        load_after = os.getloadavg()
        rss = {pid: _proc_rss(pid) for pid in before}
        msgs1 = await _broker_received(self.broker_url)
        for worker in self.workers:
            worker.send("stop")
        counts = await self.stop_churn()  # churn and routes stop; the nodes stay until exit
        for worker in self.workers:
            assert worker.stats is not None
            theirs = await asyncio.wait_for(worker.stats, 60)
            counts = {key: counts[key] + theirs[key] for key in counts}
        stats = await self._stop_coordinators()
        sim_hours = counts["node_seconds"] * cfg.speedup / 3600
        reloads = counts["reloads"]
        return {
            "nodes": cfg.nodes,
            "seconds": round(elapsed, 1),
            "speedup": cfg.speedup,
            "simulated_minutes": round(elapsed * cfg.speedup / 60, 1),
            "mean_lifetime_min": cfg.mean_lifetime / 60,
            "warmup_s": round(warm, 1),
            "placed_at_start": self.placed_at_start,
            "coverage": {r.model.name: round(r.covered / max(1, r.samples), 5) for r in self.runs},
            "samples": {r.model.name: r.samples for r in self.runs},
            "routes": {"ok": self.route_ok, "failed": self.route_failed, "errors": self.route_errors,
                       "error_samples": self.route_error_samples,
                       "rate_per_s": round((self.route_ok + self.route_failed) / elapsed, 1),
                       "p50_ms": round(percentile(self.route_ms, 0.5), 2),
                       "p99_ms": round(percentile(self.route_ms, 0.99), 2)},
            "churn": {"joins": counts["joins"], "leaves": counts["leaves"], "crashes": counts["crashes"]},
            "reloads": reloads,
            "reloads_per_node_hour": round(reloads / sim_hours, 3) if sim_hours else 0.0,
            "coordinator_cpu_percent": {str(p): round(100 * c / elapsed, 1) for p, c in cpu.items()},
            "coordinator_rss_mb": {str(p): round(m / 2**20, 1) for p, m in rss.items()},
            "coordinator_rss_growth_mb": {str(p): round((rss[p] - rss0[p]) / 2**20, 1) for p in rss},
            "coordinator": stats,
            "simulator_procs": cfg.procs,
            "simulator_cpu_percent": {name: round(100 * c / elapsed, 1) for name, c in sim_cpu.items()},
            "load_average": [round(x, 2) for x in (*load_before, *load_after)],  # 1/5/15 min, before and after
            "broker_msgs_per_s": round((msgs1 - msgs0) / elapsed, 1) if msgs0 >= 0 and msgs1 >= 0 else None,
            "timeline": {"coverage": {r.model.name: r.timeline for r in self.runs}, "churn": self.churn_timeline},
        }


    def start_churn(self) -> None:
        """The measured run starts: every live node lives out a lifetime (with churn)."""
        self._t0 = time.monotonic()
        for node, _, _ in self.live.values():
            node.loads = min(node.loads, 1)  # what warm-up loaded is the first load
        if self.config.churn:
            for node_id in list(self.live):
                self._spawn(self._life(node_id))

    async def stop_churn(self) -> dict[str, float]:
        """Stop churn (and routes); the nodes stay until exit. Returns this process's counts."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        now = time.monotonic()
        return {
            "joins": self.joins, "leaves": self.leaves, "crashes": self.crashes,
            "reloads": self.reloads + sum(max(0, node.loads - 1) for node, _, _ in self.live.values()),
            "node_seconds": self.node_seconds + sum(now - max(joined, self._t0) for _, _, joined in self.live.values()),
        }


def _quiet_crashes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A crashed node's client leaves futures failed with 'unexpected disconnection'
    that nobody reads: that is the crash, not news."""
    import aiomqtt

    if isinstance(context.get("exception"), aiomqtt.MqttError):
        return
    loop.default_exception_handler(context)


def _profiler(name: str) -> list[str]:
    """``SWARM_SIM_PROFILE=DIR``: run each coordinator under cProfile, its profile
    written to ``DIR/<model>.prof`` as it stops (the bench's ``--profile``)."""
    folder = os.environ.get("SWARM_SIM_PROFILE")
    if not folder:
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    return ["-m", "cProfile", "-o", str(Path(folder) / f"{name}.prof")]


def _free_port() -> int:
    from swarm_coordinator.broker import free_port

    return free_port()


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _broker_received(url: str, timeout: float = 3.0) -> int:
    """mosquitto's count of messages received ($SYS, published every sys_interval); -1 if none."""
    import aiomqtt

    addr = BrokerAddress.parse(url)
    try:
        async with aiomqtt.Client(addr.host, addr.port, identifier=f"sim-sys-{os.getpid()}") as client:
            await client.subscribe("$SYS/broker/messages/received")
            async with asyncio.timeout(timeout):
                async for message in client.messages:
                    return int(bytes(message.payload).decode())  # type: ignore[arg-type]
    except (aiomqtt.MqttError, TimeoutError, ValueError):
        return -1
    return -1
