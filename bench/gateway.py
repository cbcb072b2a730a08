"""Gateway benchmark: what the HTTP gateway adds on top of the client library.

A real swarm runs on this machine (``swarm-coordinator`` with its gateway, and
``--nodes`` nodes that join it). The same streaming generations (greedy, EOS ignored
so every stream has exactly ``--tokens`` tokens) go two ways, alternating so that
machine noise hits both alike:

- direct: the client library in this process (``AsyncSwarmClient`` over the
  coordinator's routes), as an application embedding it would;
- gateway: streaming from the coordinator's ``/v1/chat/completions`` (which runs
  the same client library inside it), read by a minimal SSE reader, or by the
  official ``openai`` client with ``--http-client openai``.

With C concurrent streams, each figure is the median over rounds of the mean over
streams of: time to first token, per-token latency after the first token
((t_last - t_first) / (tokens - 1)) and the whole request. The gateway's added
per-token latency at 16 streams should stay under 5 %. Two diagnostics come with each
row, since a shared machine is noisy: CPU time per token outside the nodes (this
process plus the coordinator: the gateway path's extra is what the gateway and the
HTTP client cost), the coordinator's share of it, and the nodes' mean batch size.

    .venv/bin/python bench/gateway.py [--nodes 2] [--tokens 32] [--rounds 5] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

PROMPT = "Explain in a few sentences why the sky is blue."


def _script(name: str) -> list[str]:
    path = Path(sys.executable).parent / name
    return [str(path)] if path.exists() else [sys.executable, "-m", {"swarm-node": "swarm_node.cli"}.get(name, "swarm_coordinator.cli")]


def _wait_line(proc: subprocess.Popen[str], marker: str, timeout: float = 180.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args[0]} exited before printing {marker!r}")
        if marker in line:
            return line.split(marker, 1)[1].strip()
    raise TimeoutError(marker)


class Swarm:
    def __init__(
        self,
        model: str,
        nodes: int,
        threads: int,
        logs: Path,
        budget: int = 0,
        node_args: list[str] | None = None,
        coordinator_args: list[str] | None = None,
    ) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.node_metrics: list[str] = []
        coord = self._start(
            _script("swarm-coordinator")
            + ["--model", model, "--port", "0", "--http-port", "0", "--mqtt-port", "0", *(coordinator_args or [])],
            logs / "coordinator.log",
        )
        line = _wait_line(coord, "swarm-coordinator listening on")
        self.address = line.split()[0]
        self.url = "http://" + dict(f.split("=", 1) for f in line.split()[1:])["http"]
        self.model = model
        for i in range(nodes):
            node = self._start(
                _script("swarm-node")
                + ["--coordinator", self.address, "--model", model, "--port", "0", "--threads", str(threads)]
                + ["--node-id", f"bench-{i}", "--metrics-port", "0"]
                + (["--memory-budget", str(budget)] if budget else [])
                + list(node_args or []),
                logs / f"node-{i}.log",
            )
            self.node_metrics.append(_wait_line(node, "metrics on"))
            _wait_line(node, "joined the swarm")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as resp:
                    health = json.loads(resp.read())
                if health["nodes_online"] >= nodes and health["uncovered_layers"] == 0:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the swarm did not cover the model")

    def _start(self, args: list[str], log: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        self.procs.append(proc)
        return proc

    def coordinator_cpu_s(self) -> float:
        """CPU seconds the coordinator process (where the gateway runs) used so far."""
        try:
            fields = Path(f"/proc/{self.procs[0].pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batches(self) -> tuple[float, float]:
        """(forward passes, steps in them) over all nodes so far."""
        from prometheus_client.parser import text_string_to_metric_families

        count = total = 0.0
        for url in self.node_metrics:
            with urllib.request.urlopen(url, timeout=10) as resp:
                for family in text_string_to_metric_families(resp.read().decode()):
                    for sample in family.samples:
                        if sample.name == "swarm_node_batch_size_steps_count":
                            count += sample.value
                        elif sample.name == "swarm_node_batch_size_steps_sum":
                            total += sample.value
        return count, total

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _summary(t0: float, stamps: list[float], n: int) -> dict[str, float]:
    first, last = stamps[0], stamps[-1]
    return {"ttft_s": first - t0, "per_token_s": (last - first) / max(1, n - 1), "total_s": last - t0, "tokens": n}


async def direct_stream(client: Any, messages: Any, tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    n = 0
    async for event in client.stream_chat(messages, max_tokens=tokens, ignore_eos=True, temperature=0.0):
        if event.token_ids:
            stamps.append(time.perf_counter())
            n += len(event.token_ids)
    return _summary(t0, stamps, n)


async def gateway_stream(api: Any, model: str, messages: Any, tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    n = 0
    stream = await api.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    # Chunks carry text: a token that completes no character yet arrives with the next one.
    return _summary(t0, stamps, max(n, len(stamps)))


async def raw_stream(http: Any, model: str, messages: Any, tokens: int) -> dict[str, float]:
    """The gateway path with a minimal SSE reader (no per-chunk objects), so that the
    figure is the gateway's cost rather than the HTTP client library's."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    n = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices")
            if choices and choices[0]["delta"].get("content"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    return _summary(t0, stamps, max(n, len(stamps)))


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


async def bench(args: argparse.Namespace, swarm: Swarm) -> dict[str, Any]:
    import httpx2
    import openai

    from swarm_client.api import AsyncSwarmClient

    client = await asyncio.to_thread(lambda: AsyncSwarmClient.remote(coordinator=swarm.address, model=swarm.model, token=""))
    api = openai.AsyncOpenAI(base_url=swarm.url + "/v1", api_key="bench", max_retries=0, timeout=600)
    http = httpx2.AsyncClient(base_url=swarm.url, timeout=600, limits=httpx2.Limits(max_connections=64))
    model = (await api.models.list()).data[0].id
    messages = [{"role": "user", "content": PROMPT}]

    async def via_gateway() -> dict[str, float]:
        if args.http_client == "openai":
            return await gateway_stream(api, model, messages, args.tokens)
        return await raw_stream(http, model, messages, args.tokens)

    # Warm both paths (channels, tokenizer caches, the nodes' first forward passes).
    await direct_stream(client, messages, 4)
    await gateway_stream(api, model, messages, 4)
    await raw_stream(http, model, messages, 4)

    out: dict[str, Any] = {}
    for c in args.concurrency:
        rows: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for r in range(args.rounds):
            order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
            for way in order:
                cpu0, (b0, s0) = swarm.coordinator_cpu_s(), await asyncio.to_thread(swarm.batches)
                own0 = time.process_time()
                if way == "direct":
                    runs = await asyncio.gather(*(direct_stream(client, messages, args.tokens) for _ in range(c)))
                else:
                    runs = await asyncio.gather(*(via_gateway() for _ in range(c)))
                own1 = time.process_time()
                cpu1, (b1, s1) = swarm.coordinator_cpu_s(), await asyncio.to_thread(swarm.batches)
                row = {k: _mean(list(runs), k) for k in ("ttft_s", "per_token_s", "total_s", "tokens")}
                n_tokens = max(1.0, sum(r["tokens"] for r in runs))
                row["coordinator_cpu_ms_per_token"] = (cpu1 - cpu0) * 1e3 / n_tokens
                # Everything but the nodes: this process (the caller) plus the coordinator.
                row["client_side_cpu_ms_per_token"] = ((own1 - own0) + (cpu1 - cpu0)) * 1e3 / n_tokens
                row["mean_batch"] = (s1 - s0) / max(1.0, b1 - b0)
                rows[way].append(row)
        med = {way: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for way, rs in rows.items()}
        d, g = med["direct"], med["gateway"]
        out[str(c)] = {
            "direct": d,
            "gateway": g,
            "added_per_token_ms": (g["per_token_s"] - d["per_token_s"]) * 1e3,
            "added_per_token_pct": 100 * (g["per_token_s"] / d["per_token_s"] - 1),
            "added_ttft_ms": (g["ttft_s"] - d["ttft_s"]) * 1e3,
            "added_request_ms": (g["total_s"] - d["total_s"]) * 1e3,
            "added_cpu_ms_per_token": g["client_side_cpu_ms_per_token"] - d["client_side_cpu_ms_per_token"],
            # Each round runs both ways back to back: the median of the per-round ratios
            # cancels the machine's slow drift better than the ratio of the medians.
            "paired_per_token_pct": 100 * (
                statistics.median(gr["per_token_s"] / dr["per_token_s"] for gr, dr in zip(rows["gateway"], rows["direct"])) - 1
            ),
            "rounds": rows,
        }
    await api.close()
    await http.aclose()
    await client.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model file or folder (default: the default model)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument(
        "--replicas", action="store_true",
        help="let each node hold the whole model (default: memory budgets that make every route span all nodes)",
    )
    p.add_argument(
        "--http-client", choices=("raw", "openai"), default="raw",
        help="gateway path: a minimal SSE reader (default) or the official openai client (its own per-chunk CPU counts too)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gateway.json")
    args = p.parse_args()

    from swarm_proto.store import resolve_model

    model = str(resolve_model(args.model))
    logs = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    budget = 0
    if not args.replicas:
        # Each node gets room for a little more than its share of the layers, so that a
        # route runs through every node (a pipeline) instead of one full replica.

        from swarm_proto.model_args import layer_bytes, read_args

        shape = read_args(model)
        budget = (-(-shape.num_layers // args.nodes) + 1) * layer_bytes(shape, "float32")
    print(f"starting a swarm of {args.nodes} nodes ({model}); logs in {logs}", file=sys.stderr)
    swarm = Swarm(model, args.nodes, args.threads, logs, budget)
    try:
        results = asyncio.run(bench(args, swarm))
    finally:
        swarm.stop()

    print(
        f"\n{'streams':>7} {'path':>8} {'ttft ms':>9} {'per token ms':>13} {'request ms':>11} {'batch':>6}"
        f" {'coord cpu ms/tok':>17} {'all cpu ms/tok':>15}"
    )
    for c, row in results.items():
        for way in ("direct", "gateway"):
            r = row[way]
            print(
                f"{c:>7} {way:>8} {r['ttft_s'] * 1e3:9.1f} {r['per_token_s'] * 1e3:13.2f} {r['total_s'] * 1e3:11.1f}"
                f" {r['mean_batch']:6.1f} {r['coordinator_cpu_ms_per_token']:17.3f} {r['client_side_cpu_ms_per_token']:15.3f}"
            )
        print(
            f"{'':>7} {'added':>8} {row['added_ttft_ms']:9.1f} {row['added_per_token_ms']:+10.2f}"
            f" ({row['added_per_token_pct']:+.1f}%) {row['added_request_ms']:+8.1f} {'':>6} {'':>17}"
            f" {row['added_cpu_ms_per_token']:+15.3f}"
        )
        print(f"{'':>7} {'paired':>8} {'':>9} {row['paired_per_token_pct']:+12.1f}%  (median of per-round ratios)")
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    report = {
        "model": model,
        "nodes": args.nodes,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "http_client": args.http_client,
        "route": "replicas" if args.replicas else "pipeline over all nodes",
        "machine": machine,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
