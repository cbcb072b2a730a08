"""Swarm benchmark: the data plane on loopback, side by side with the model in-process.

Rows, each the median of --runs runs (configurations take turns within a run, so
machine noise hits them alike):

- decode latency per token: the whole model in this process (``--local``) vs routes
  of 1, 2 and 3 ``swarm-node`` processes (layers cut evenly), one greedy session each,
  their steps interleaved (local, 1, 2, 3 nodes, local, ...) so that noise hits all;
- a raw grpc.aio echo: a bidi stream in another process that sends back each message,
  the payload as large as one decode activation; the latency the swarm adds per
  network traversal, (K-node - local) / (K + 1), is compared with half its round trip;
  the same echo is also timed with the server spinning for one local decode step
  before each reply (round trip minus the spin): what the exchange itself costs when,
  as in a swarm, the processes wait between messages (a vCPU that waits goes idle,
  and waking it is not free);
  so is (K-node - the nodes' forward time for those steps, from their metrics) / (K + 1),
  which cancels the noise in the compute on a busy machine (the hop from a node's event
  loop to its forward thread counts as forward time there);
- aggregate decode tokens/s of 1, 4 and 16 concurrent sessions on 2 nodes;
- time to first token of a 512-token prompt on 1 vs 3 nodes (chunked, pipelined prefill).

``--security``: instead of the rows above, the cost of the trust layer, side by side in
one run: per-token decode latency on a 3-node route and 16-session throughput, plain
(no token, in clear) vs secure (mutual TLS + swarm token), the two swarms' steps
interleaved; and what sealing and checking one presence message costs (presence goes
out every ~2 s per node, never on the token path). Writes bench/results/swarm_security.json.

Every process computes with the same number of torch threads (--threads, default 1:
each node gets ``--threads 1`` and the local run ``torch.set_num_threads(1)``).
Writes bench/results/swarm.json and bench/results/swarm.png and prints a table.

    .venv/bin/python bench/swarm.py [--model PATH] [--runs 5] [--tokens 32] [--threads 1] [--security]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from swarm_client.remote import Hop, RouteSession

ROUTES = {1: [(0, 30)], 2: [(0, 15), (15, 30)], 3: [(0, 10), (10, 20), (20, 30)]}
TEXT = (
    "The history of the city begins with a small fishing village on the river. Over the centuries it grew "
    "into a market town, then a port, and finally the capital of a province. Its people built bridges, "
    "churches and schools, and they traded wool, salt and wine with the towns upstream and across the sea. "
)


# --- processes ---------------------------------------------------------------------------


class Node:
    """A ``swarm-node`` process; ``address`` once it listens."""

    def __init__(
        self, model: Path, layers: tuple[int, int], threads: int, log: Path, extra: Sequence[str] = (),
        env: dict[str, str] | None = None, python_args: Sequence[str] = (),
    ) -> None:
        exe = Path(sys.executable).parent / "swarm-node"
        cmd = [str(exe)] if exe.exists() and not python_args else [sys.executable, *python_args, "-m", "swarm_node.cli"]
        cmd += ["--model", str(model), "--layers", f"{layers[0]}:{layers[1]}", "--port", "0"]
        cmd += ["--threads", str(threads), "--log-level", "WARNING", "--metrics-port", "0", *extra]
        self.layers = layers
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
        self._address: list[str] = []
        self.metrics = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "metrics on" in line:
                self.metrics = line.split("metrics on", 1)[1].strip()
            if "listening on" in line:
                self._address.append(line.split("listening on", 1)[1].strip())
                return

    @property
    def address(self) -> str:
        self._reader.join(300)
        if not self._address:
            raise RuntimeError(f"swarm-node {self.layers} did not start (exit {self.proc.poll()})")
        return self._address[0]

    def hop(self) -> Hop:
        return Hop(self.address, *self.layers)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _echo_server(port_out: Any) -> None:
    """A raw bidi-stream echo (bytes in, the same bytes out), in its own process. A
    message starting with a nonzero little-endian double makes it spin that many
    seconds first, as a node computes before it answers."""

    async def echo(requests: Any, context: Any) -> Any:
        async for message in requests:
            (busy,) = struct.unpack_from("<d", message)
            end = time.perf_counter() + busy
            while time.perf_counter() < end:
                pass
            yield message

    async def serve() -> None:
        handler = grpc.method_handlers_generic_handler("bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port_out.send(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


# --- measurements ------------------------------------------------------------------------


class LocalDecoder:
    """Greedy decode steps of ``--local``: ``LocalBackend``, the whole model in this process."""

    def __init__(self, model: Any, prompt: list[int], tokens: int) -> None:
        from swarm_client.local import LocalBackend
        from swarm_proto.wire import SamplingParams

        self._tokens = LocalBackend(model).tokens(prompt, SamplingParams(), tokens + 1)
        next(self._tokens)  # the prefill and the first token

    def step(self) -> float:
        """One decode step: the forward of the last token and the sampling after it."""
        t0 = time.perf_counter()
        next(self._tokens)
        return time.perf_counter() - t0


def forward_seconds(url: str) -> float:
    """The node's total time in forward passes so far (its Prometheus metrics)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "swarm_node_forward_duration_seconds_sum":
                return float(sample.value)
    raise RuntimeError(f"no forward time in {url}")


async def decode_latencies(
    local: Any, hops: dict[int, list[Hop]], prompt: list[int], tokens: int, metrics: dict[int, list[str]]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each greedy decode step, local and along each route, interleaved step
    by step so that a burst of machine noise hits every configuration alike; and per
    route, the mean step minus the nodes' forward time (their metrics) per step: the
    cost of the traversals themselves, free of the noise in the compute."""
    decoder = LocalDecoder(local, prompt, tokens)
    times: dict[str, list[float]] = {"local": [], **{f"{k} nodes": [] for k in hops}}
    sessions = {k: RouteSession(h, max_length=len(prompt) + tokens + 1) for k, h in hops.items()}
    try:
        last = {}
        for k, s in sessions.items():
            await s.open()
            last[k] = (await s.prefill(prompt)).token
        before = {k: sum(forward_seconds(u) for u in urls) for k, urls in metrics.items()}
        for _ in range(tokens):
            times["local"].append(decoder.step())
            for k, s in sessions.items():
                t0 = time.perf_counter()
                last[k] = (await s.decode(last[k])).token  # type: ignore[arg-type]
                times[f"{k} nodes"].append(time.perf_counter() - t0)
        outside = {
            f"{k} nodes": statistics.fmean(times[f"{k} nodes"]) - (sum(forward_seconds(u) for u in urls) - before[k]) / tokens
            for k, urls in metrics.items()
        }
    finally:
        for s in sessions.values():
            await s.close()
    return times, outside


async def echo_round_trip(address: str, payload: int, n: int, busy: float = 0.0) -> float:
    """Median seconds for one message out and back on one long-lived bidi stream, less
    the ``busy`` seconds the server spins before answering."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.stream_stream("/bench.Echo/Stream")()
        data = struct.pack("<d", busy) + os.urandom(max(0, payload - 8))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await call.write(data)
            await call.read()
            times.append(time.perf_counter() - t0 - busy)
        await call.done_writing()
        return statistics.median(times[min(5, n // 4):])


async def throughput(
    hops: Sequence[Hop], prompts: Sequence[list[int]], tokens: int, kw: dict[str, Any] | None = None
) -> float:
    """Aggregate decode tokens/s of ``len(prompts)`` sessions at once (prefills excluded);
    ``kw``: RouteSession options (TLS, token)."""
    ready = 0
    go = asyncio.Event()
    ends: list[float] = []

    async def one(prompt: list[int]) -> None:
        nonlocal ready
        async with RouteSession(hops, max_length=len(prompt) + tokens + 1, **(kw or {})) as s:
            out = await s.prefill(prompt)
            ready += 1
            if ready == len(prompts):
                go.set()
            await go.wait()
            for _ in range(tokens):
                out = await s.decode(out.token)  # type: ignore[arg-type]
            ends.append(time.perf_counter())

    tasks = [asyncio.ensure_future(one(p)) for p in prompts]
    await go.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    return len(prompts) * tokens / (max(ends) - t0)


async def mean_batch(addresses: Sequence[str]) -> list[tuple[int, int]]:
    """(steps, forward passes) computed so far by each node."""
    from swarm_proto import swarm_pb2, swarm_pb2_grpc

    out = []
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as ch:
            stats = (await swarm_pb2_grpc.NodeStub(ch).Info(swarm_pb2.InfoRequest(), timeout=10)).stats
        out.append((stats.batched_steps, stats.batches))
    return out


async def first_token(hops: Sequence[Hop], prompt: list[int]) -> float:
    """Seconds from opening a session to the first sampled token of ``prompt``."""
    t0 = time.perf_counter()
    async with RouteSession(hops, max_length=len(prompt) + 1) as s:
        await s.prefill(prompt)
        return time.perf_counter() - t0


# --- report ------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = report["decode_latency_ms"]
    fig, (ax1, ax4, ax2, ax3) = plt.subplots(1, 4, figsize=(20, 4.6))
    ks = [0, 1, 2, 3]
    measured = [lat["local"], *(lat[f"{k} nodes"] for k in (1, 2, 3))]
    bound = [lat["local"] + (k + 1) * report["per_traversal_target_ms"] if k else lat["local"] for k in ks]
    ax1.plot(ks, measured, "o-", label="measured")
    ax1.plot(ks, bound, "--", color="gray", label="target: local + (K+1) x 1.5 x echo RTT/2")
    ax1.set_xticks(ks, ["local", "1 node", "2 nodes", "3 nodes"])
    ax1.set_ylabel("ms per token")
    ax1.set_ylim(bottom=0)
    ax1.set_title("Decode latency vs nodes (batch 1)")
    ax1.legend(fontsize=8)

    per, out = report["added_per_traversal_ms"], report["outside_forward_per_traversal_ms"]
    kk = [1, 2, 3]
    ax4.plot(kk, [per[f"{k} nodes"] for k in kk], "o-", label="(K-node - local) / (K+1)")
    ax4.plot(kk, [out[f"{k} nodes"] for k in kk], "s-", label="(K-node - nodes' forward time) / (K+1)")
    ax4.axhline(report["per_traversal_target_ms"], ls="--", color="gray", label="target: 1.5 x echo RTT/2")
    ax4.axhline(report["echo_rtt_ms"] / 2, ls=":", color="black", label="raw grpc.aio echo RTT/2")
    ax4.axhline(report["echo_rtt_after_compute_ms"] / 2, ls="-.", color="tab:red", label="the echo with a step of compute between: RTT/2")
    ax4.axhline(0, color="black", lw=0.5)
    ax4.set_xticks(kk, [f"{k} node{'s' if k > 1 else ''}" for k in kk])
    ax4.set_ylabel("ms per network traversal")
    ax4.set_title("Latency the swarm adds per traversal")
    ax4.legend(fontsize=7)

    tput = report["tokens_per_s_2_nodes"]
    conc = sorted(int(c) for c in tput)
    ax2.plot(conc, [tput[str(c)] for c in conc], "o-", label="measured")
    ax2.axhline(5 * tput["1"], ls="--", color="gray", label="target at 16: 5x one session")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(conc, [str(c) for c in conc])
    ax2.set_xlabel("concurrent sessions")
    ax2.set_ylabel("tokens/s (aggregate)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Throughput on 2 nodes")
    ax2.legend(fontsize=8)

    ttft = report["ttft_512_s"]
    names = list(ttft)
    ax3.bar(names, [ttft[n] for n in names], color=["tab:blue", "tab:orange"])
    ax3.axhline(1.2 * ttft["1 node"], ls="--", color="gray", label="target: 1.2x 1 node")
    ax3.set_ylabel("seconds")
    ax3.set_title("Time to first token, 512-token prompt")
    ax3.legend(fontsize=8)
    fig.suptitle(f"llama-swarm on loopback, {report['model_name']}, {report['threads']} thread(s) per process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    samples = [measure() for _ in range(runs)]
    return statistics.median(samples), samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from swarm_client.tokenizer import load_tokenizer
    from swarm_node.engine.loading import load_slice
    from swarm_proto.store import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    logs = Path(args.out).parent / "swarm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    nodes = {k: [Node(path, span, args.threads, logs / f"k{k}-{i}.log") for i, span in enumerate(spans)] for k, spans in ROUTES.items()}
    parent, child = multiprocessing.Pipe()
    echo = multiprocessing.Process(target=_echo_server, args=(child,), daemon=True)
    echo.start()
    try:
        local = load_slice(path, 0, 30)
        tok = load_tokenizer(path)
        prompt = tok.encode("The capital of France is")
        long_prompt = (tok.encode(TEXT * 12))[:512]
        assert len(long_prompt) == 512
        hops = {k: [n.hop() for n in ns] for k, ns in nodes.items()}
        echo_address = f"127.0.0.1:{parent.recv()}"
        payload = local.args.hidden_size * 4  # one decode activation in float32
        print(f"nodes up; {args.runs} runs of {args.tokens} decode tokens ...", file=sys.stderr)

        # Warm-up: first sessions pay for lazy allocations on every node.
        metrics = {k: [n.metrics for n in ns] for k, ns in nodes.items()}
        await decode_latencies(local, hops, prompt, 4, metrics)
        for k in ROUTES:
            await first_token(hops[k], long_prompt[:128])
        await echo_round_trip(echo_address, payload, 50)

        # Per run: the median step of each configuration; reported: the median run.
        lat: dict[str, list[float]] = {"local": [], **{f"{k} nodes": [] for k in ROUTES}}
        outside: dict[str, list[float]] = {f"{k} nodes": [] for k in ROUTES}
        rtt: list[float] = []
        rtt_busy: list[float] = []  # with one local step of compute before each reply
        for _ in range(args.runs):
            steps, out = await decode_latencies(local, hops, prompt, args.tokens, metrics)
            for name, v in steps.items():
                lat[name].append(statistics.median(v))
            for name, v in out.items():
                outside[name].append(v)
            rtt.append(await echo_round_trip(echo_address, payload, 200))
            rtt_busy.append(await echo_round_trip(echo_address, payload, args.tokens, busy=statistics.median(steps["local"])))

        tput: dict[str, list[float]] = {}
        batch: dict[str, list[float]] = {}  # mean steps per forward pass, per node
        addresses = [h.address for h in hops[2]]
        for concurrency in (1, 4, 16):
            prompts = [tok.encode(f"{TEXT[: 40 + 7 * i]}") for i in range(concurrency)]
            before = await mean_batch(addresses)
            tput[str(concurrency)] = [await throughput(hops[2], prompts, args.tokens) for _ in range(args.runs)]
            after = await mean_batch(addresses)
            batch[str(concurrency)] = [(s1 - s0) / max(1, b1 - b0) for (s0, b0), (s1, b1) in zip(before, after)]

        ttft: dict[str, list[float]] = {"1 node": [], "3 nodes": []}
        for _ in range(args.runs):
            ttft["1 node"].append(await first_token(hops[1], long_prompt))
            ttft["3 nodes"].append(await first_token(hops[3], long_prompt))
    finally:
        for ns in nodes.values():
            for n in ns:
                n.stop()
        echo.terminate()

    med = statistics.median
    lat_ms = {name: med(v) * 1e3 for name, v in lat.items()}
    rtt_ms = med(rtt) * 1e3
    rtt_busy_ms = med(rtt_busy) * 1e3
    per_traversal = {f"{k} nodes": (lat_ms[f"{k} nodes"] - lat_ms["local"]) / (k + 1) for k in ROUTES}
    outside_ms = {f"{k} nodes": med(outside[f"{k} nodes"]) * 1e3 / (k + 1) for k in ROUTES}
    tput_med = {c: med(v) for c, v in tput.items()}
    ttft_med = {name: med(v) for name, v in ttft.items()}
    target_ms = 1.5 * rtt_ms / 2
    return {
        "model": str(path),
        "model_name": path.stem,
        "threads": args.threads,
        "runs": args.runs,
        "decode_tokens": args.tokens,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "grpc": grpc.__version__,
        "decode_latency_ms": lat_ms,
        "echo_payload_bytes": payload,
        "echo_rtt_ms": rtt_ms,
        "echo_rtt_after_compute_ms": rtt_busy_ms,
        "added_per_traversal_ms": per_traversal,
        "per_traversal_target_ms": target_ms,
        "outside_forward_per_traversal_ms": outside_ms,
        "tokens_per_s_2_nodes": tput_med,
        "mean_batch_2_nodes": batch,
        "ttft_512_s": ttft_med,
        "targets": {
            "per traversal <= 1.5 x echo RTT/2": all(v <= target_ms for v in per_traversal.values()),
            "16 sessions >= 5x one": tput_med["16"] >= 5 * tput_med["1"],
            "3-node TTFT <= 1.2x 1-node": ttft_med["3 nodes"] <= 1.2 * ttft_med["1 node"],
        },
        "samples": {"decode_latency_s": lat, "outside_forward_s": outside, "echo_rtt_s": rtt, "echo_rtt_after_compute_s": rtt_busy, "tokens_per_s": tput, "ttft_s": ttft},
    }


async def security(args: argparse.Namespace) -> dict[str, Any]:
    """Plain vs mutual TLS + token on the same 3-node split, interleaved; and the seal cost."""
    import secrets
    import tempfile

    from swarm_client.tokenizer import load_tokenizer
    from swarm_proto.certs import init_ca, issue
    from swarm_proto.presence import NodeLoad, SessionLoad, Topics, encode
    from swarm_proto.store import resolve_model
    from swarm_proto.tls import TlsFiles
    from swarm_proto.trust import Identity, PresenceGuard, Sealer, decode_sealed, membership_proof

    path = resolve_model(args.model)
    logs = Path(args.out).parent / "swarm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    certs = Path(tempfile.mkdtemp(prefix="bench-certs-"))
    init_ca(certs)
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "SWARM_TOKEN": token}

    def tls_args(name: str) -> list[str]:
        got = issue(certs, name)
        return ["--tls-cert", str(got.cert), "--tls-key", str(got.key), "--tls-ca", str(got.ca)]

    spans = ROUTES[3]
    plain = [Node(path, s, args.threads, logs / f"plain-{i}.log") for i, s in enumerate(spans)]
    secure = [Node(path, s, args.threads, logs / f"secure-{i}.log", tls_args(f"n{i}"), env) for i, s in enumerate(spans)]
    client = issue(certs, "client")
    tls = TlsFiles(str(client.cert), str(client.key), str(client.ca))
    kinds = {"plain": ([n.hop() for n in plain], {}), "secure": ([n.hop() for n in secure], {"tls": tls, "token": token})}
    tok = load_tokenizer(path)
    prompt = tok.encode("The capital of France is")
    lat: dict[str, list[float]] = {"plain": [], "secure": []}
    tput: dict[str, list[float]] = {"plain": [], "secure": []}
    try:
        print(f"6 nodes up; {args.runs} runs of {args.tokens} tokens, plain and secure interleaved ...", file=sys.stderr)
        for run_index in range(args.runs + 1):  # run 0 warms up
            sessions = {k: RouteSession(h, max_length=len(prompt) + args.tokens + 1, **kw) for k, (h, kw) in kinds.items()}
            steps: dict[str, list[float]] = {"plain": [], "secure": []}
            last = {}
            for k, s in sessions.items():
                await s.open()
                last[k] = (await s.prefill(prompt)).token
            for _ in range(args.tokens):
                for k, s in sessions.items():
                    t0 = time.perf_counter()
                    last[k] = (await s.decode(last[k])).token  # type: ignore[arg-type]
                    steps[k].append(time.perf_counter() - t0)
            for s in sessions.values():
                await s.close()
            if run_index:
                for k in lat:
                    lat[k].append(statistics.median(steps[k]))
            order = ("plain", "secure") if run_index % 2 else ("secure", "plain")
            prompts = [tok.encode(f"{TEXT[: 40 + 7 * i]}") for i in range(16)]
            for k in order:
                hops, kw = kinds[k]
                value = await throughput(hops, prompts, args.tokens, kw)
                if run_index:
                    tput[k].append(value)
    finally:
        for n in [*plain, *secure]:
            n.stop()

    # One load message with 32 sessions (the largest a node sends), sealed and checked.
    topics = Topics("bench")
    identity = Identity.generate()
    sealer = Sealer(identity, membership_proof(token, "bench", identity.public))
    guard = PresenceGuard("bench", token=token)
    status_topic = topics.status("n")
    from swarm_proto.presence import NodeStatus

    kind, node_id, payload, seal = decode_sealed(topics, status_topic, sealer.seal(status_topic, encode(NodeStatus("n"))))
    guard.check(kind, node_id, payload, seal)
    load = encode(NodeLoad(sessions=tuple(SessionLoad(f"s{i}", 0, 10, 100, 20, 50, 1.0, 0.1) for i in range(32))))
    n = 2000
    t0 = time.perf_counter()
    sealed = [sealer.seal(topics.load("n"), load) for _ in range(n)]
    seal_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for data in sealed:
        kind, node_id, payload, seal = decode_sealed(topics, topics.load("n"), data)
        guard.check(kind, node_id, payload, seal)
    check_us = (time.perf_counter() - t0) / n * 1e6

    med = statistics.median
    lat_ms = {k: med(v) * 1e3 for k, v in lat.items()}
    tput_med = {k: med(v) for k, v in tput.items()}
    cost = lat_ms["secure"] / lat_ms["plain"] - 1
    return {
        "model": str(path),
        "threads": args.threads,
        "runs": args.runs,
        "decode_tokens": args.tokens,
        "decode_latency_3_nodes_ms": lat_ms,
        "tokens_per_s_16_sessions_3_nodes": tput_med,
        "latency_cost": cost,
        "throughput_cost": 1 - tput_med["secure"] / tput_med["plain"],
        "seal_us": seal_us,
        "open_and_check_us": check_us,
        "load_bytes": len(load),
        "sealed_load_bytes": len(sealed[0]),
        "targets": {"TLS + signing <= 5% per token": cost <= 0.05},
        "samples": {"decode_latency_s": lat, "tokens_per_s": tput},
    }


def print_security(r: dict[str, Any]) -> None:
    lat, t = r["decode_latency_3_nodes_ms"], r["tokens_per_s_16_sessions_3_nodes"]
    print(f"trust layer on a 3-node route ({r['threads']} thread(s) per node, median of {r['runs']} runs x {r['decode_tokens']} tokens)")
    print(f"  decode ms/token:     plain {lat['plain']:.2f}   TLS+token {lat['secure']:.2f}   cost {r['latency_cost'] * 100:+.1f}%")
    print(f"  16 sessions tok/s:   plain {t['plain']:.1f}   TLS+token {t['secure']:.1f}   cost {r['throughput_cost'] * 100:+.1f}%")
    print(
        f"  presence seal {r['seal_us']:.0f} us, open+check {r['open_and_check_us']:.0f} us per message"
        f" ({r['load_bytes']} B load -> {r['sealed_load_bytes']} B sealed; one per node every ~2 s)"
    )
    for name, ok in r["targets"].items():
        print(f"  target {name}: {'met' if ok else 'MISSED'}")


def print_table(r: dict[str, Any]) -> None:
    lat, per = r["decode_latency_ms"], r["added_per_traversal_ms"]
    print(f"decode latency per token (batch 1, {r['threads']} thread(s) per process, median of {r['runs']} x {r['decode_tokens']} tokens)")
    out = r["outside_forward_per_traversal_ms"]
    print(f"  {'':10} {'ms/token':>9} {'added/traversal':>16} {'outside forward/traversal':>26}")
    print(f"  {'local':10} {lat['local']:9.2f}")
    for k in (1, 2, 3):
        print(f"  {f'{k} nodes':10} {lat[f'{k} nodes']:9.2f} {per[f'{k} nodes']:13.3f} ms {out[f'{k} nodes']:23.3f} ms")
    print(
        f"  raw grpc.aio echo of {r['echo_payload_bytes']} B: round trip {r['echo_rtt_ms']:.3f} ms,"
        f" target per traversal <= 1.5 x RTT/2 = {r['per_traversal_target_ms']:.3f} ms"
    )
    print(
        f"  the same echo, the server computing {lat['local']:.1f} ms (one local step) before each reply:"
        f" round trip {r['echo_rtt_after_compute_ms']:.3f} ms beyond the compute, i.e. {r['echo_rtt_after_compute_ms'] / 2:.3f} ms per traversal"
    )
    t = r["tokens_per_s_2_nodes"]
    print("aggregate decode tokens/s on 2 nodes: " + ", ".join(f"{c} sessions {v:.1f}" for c, v in t.items()) + f"  ({t['16'] / t['1']:.1f}x at 16)")
    mb = r["mean_batch_2_nodes"]
    print("  mean steps per forward (head, tail): " + ", ".join(f"{c} sessions {b[0]:.1f}/{b[1]:.1f}" for c, b in mb.items()))
    f = r["ttft_512_s"]
    print(f"time to first token, 512-token prompt: 1 node {f['1 node']:.3f} s, 3 nodes {f['3 nodes']:.3f} s ({f['3 nodes'] / f['1 node']:.2f}x)")
    for name, ok in r["targets"].items():
        print(f"  target {name}: {'met' if ok else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the pulled SmolLM2 GGUF)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every process (nodes and local)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per run")
    ap.add_argument("--out", default="bench/results/swarm.json")
    ap.add_argument("--security", action="store_true", help="only plain vs TLS + token (and the presence seal cost)")
    args = ap.parse_args()
    if args.security:
        if args.out == ap.get_default("out"):
            args.out = "bench/results/swarm_security.json"
        sec = asyncio.run(security(args))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(sec, indent=2))
        print_security(sec)
        print(f"(JSON in {args.out})")
        return
    report = asyncio.run(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    png = out.with_suffix(".png")
    plot(report, png)
    print_table(report)
    print(f"(JSON in {out}, plot in {png})")


if __name__ == "__main__":
    main()
