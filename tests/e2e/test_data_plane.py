"""The data plane end to end: SmolLM2 through real ``swarm-node`` processes on loopback.

Three node processes are shared by the whole module: A hosts layers [0, 30), B
[10, 30), C [20, 30). A session may run on part of what a node hosts, so they make
the routes of one node (A 0:30), two (A 0:15, B 15:30) and three (A 0:10, B 10:20,
C 20:30). Each node runs under ``counting_node.py``, which counts every gRPC message
its server receives or sends, per session: the K + 1 traversals per token are counted
on real messages between real processes.

What ``tests/node/test_service.py`` and ``test_daemon.py`` already cover (each bad
field of a step, SIGTERM drain, a killed node named by RouteSession, tiny models over
three processes) is not repeated here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from e2e.gateway_helpers import Proc, local_cli, scrape, script, total
from e2e.trust import Trust
from swarm_client.api import AsyncSwarmClient, SwarmClient
from swarm_client.errors import GenerationError
from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_client.speculation import Speculation
from swarm_proto import PROTOCOL_VERSION, codec, swarm_pb2, swarm_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COUNTING_NODE = Path(__file__).with_name("counting_node.py")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
HIDDEN = 576  # SmolLM2-135M


@dataclass
class Node:
    proc: Proc
    address: str
    metrics: str
    counts: Path
    trust: Trust

    def logs(self) -> str:
        return self.proc.log.read_text()


@dataclass
class Nodes:
    a: Node
    b: Node
    c: Node
    trust: Trust

    def session(self, hops: Sequence[Hop], **kwargs: Any) -> RouteSession:
        """A route session of this test over ``hops`` (with the swarm's token and TLS)."""
        return RouteSession(hops, token=self.trust.token, tls=self.trust.client, **kwargs)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``swarm generate ARGS`` as a client process of these nodes."""
        return subprocess.run(
            script("swarm") + ["generate", *args], capture_output=True, text=True, timeout=120,
            env={**os.environ, **self.trust.client_env()},
        )

    def route(self, k: int) -> list[Hop]:
        a, b, c = self.a.address, self.b.address, self.c.address
        return {
            1: [Hop(a, 0, 30)],
            2: [Hop(a, 0, 15), Hop(b, 15, 30)],
            3: [Hop(a, 0, 10), Hop(b, 10, 20), Hop(c, 20, 30)],
        }[k]

    def route_text(self, k: int) -> str:
        return ",".join(f"{h.address}={h.start}:{h.end}" for h in self.route(k))

    @property
    def all(self) -> list[Node]:
        return [self.a, self.b, self.c]


@pytest.fixture(scope="module")
def nodes(default_model: Path, tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[Nodes]:
    logs = tmp_path_factory.mktemp("data-plane")
    procs = {}
    for name, layers in (("a", "0:30"), ("b", "10:30"), ("c", "20:30")):
        cmd = [sys.executable, str(COUNTING_NODE), str(logs / f"{name}.counts")]
        cmd += ["--model", str(default_model), "--layers", layers, "--port", "0", "--threads", "1"]
        cmd += ["--metrics-port", "0", "--node-id", name, "--dtype", "float32"]  # exact: compared with transformers
        procs[name] = Proc.start(cmd + trust.flags(name), logs / f"{name}.log", env=trust.env)
    try:
        made = {
            name: Node(p, p.wait_line("listening on"), p.wait_line("metrics on"), logs / f"{name}.counts", trust)
            for name, p in procs.items()
        }
        yield Nodes(**made, trust=trust)
    finally:
        for p in procs.values():
            p.stop()


class Remembered:
    """The local client with its answers remembered: the plain and TLS passes of this
    module compare with the same references, computed once."""

    def __init__(self, client: SwarmClient) -> None:
        self.client = client
        self._answers: dict[str, Any] = {}

    def _once(self, method: str, *args: Any, **options: Any) -> Any:
        key = repr((method, args, sorted(options.items())))
        if key not in self._answers:
            self._answers[key] = getattr(self.client, method)(*args, **options)
        return self._answers[key]

    def generate(self, prompt: str, **options: Any) -> Any:
        return self._once("generate", prompt, **options)

    def chat(self, messages: Any, **options: Any) -> Any:
        return self._once("chat", messages, **options)

    def encode(self, text: str) -> list[int]:
        return list(self.client.encode(text))


@pytest.fixture(scope="module")
def local(default_model: Path) -> Iterator[Remembered]:
    """The whole model in this process: what ``swarm generate --local`` runs."""
    with SwarmClient.local(default_model, dtype="float32") as client:
        yield Remembered(client)


async def remote_ids(nodes: Nodes, k: int, model: Path, prompt: str, **options: Any) -> list[int]:
    async with AsyncSwarmClient.remote(route=nodes.route_text(k), model=model, **nodes.trust.library()) as client:
        return list((await client.generate(prompt, **options)).token_ids)


async def info(node: Node) -> swarm_pb2.NodeInfo:
    async with node.trust.aio_channel(node.address) as ch:
        return await swarm_pb2_grpc.NodeStub(ch).Info(swarm_pb2.InfoRequest(), timeout=10, metadata=node.trust.metadata)


async def wait_active(nodes: Sequence[Node], want: int, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        active = [(await info(n)).active_sessions for n in nodes]
        if all(a == want for a in active) or time.monotonic() > deadline:
            return active
        await asyncio.sleep(0.05)


# --- outputs ---------------------------------------------------------------------------


async def test_greedy_over_one_two_and_three_nodes_equals_local_and_transformers(
    nodes: Nodes, local: Remembered, default_model: Path, default_reference: Any
) -> None:
    for prompt in PROMPTS:
        want = list(local.generate(prompt, max_tokens=12).token_ids)
        ids = local.encode(prompt)
        with torch.no_grad():
            ref = default_reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
        assert want == ref.tolist(), prompt
        for k in (1, 2, 3):
            assert await remote_ids(nodes, k, default_model, prompt, max_tokens=12) == want, (prompt, k)


async def test_seeded_sampling_over_three_nodes_equals_local(nodes: Nodes, local: Remembered, default_model: Path) -> None:
    options = dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, max_tokens=20)
    for seed, prompt in zip((3, 11), PROMPTS):
        want = list(local.generate(prompt, seed=seed, **options).token_ids)
        assert await remote_ids(nodes, 3, default_model, prompt, seed=seed, **options) == want
    # The command line: `swarm generate --route` prints what `--local` prints.
    flags = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5", "--max-tokens", "24", "--dtype", "float32"]
    routed = nodes.cli("--route", nodes.route_text(3), "--model", str(default_model), PROMPTS[2], *flags)
    assert routed.returncode == 0, routed.stderr
    assert routed.stdout[:-1] == local_cli(default_model, PROMPTS[2], *flags)


async def test_sixteen_concurrent_sessions_are_batched_and_unchanged(
    nodes: Nodes, local: Remembered, default_model: Path
) -> None:
    prompts = [f"{PROMPTS[i % 3]} {word}" for i, word in enumerate("one two three four five six seven eight".split() * 2)]
    options = [dict(max_tokens=8, temperature=0.8 * (i % 2), seed=i) for i in range(16)]
    want = [list(local.generate(p, **o).token_ids) for p, o in zip(prompts, options)]
    before = [scrape(n.metrics) for n in (nodes.a, nodes.b)]
    async with AsyncSwarmClient.remote(route=nodes.route_text(2), model=default_model, **nodes.trust.library()) as client:
        results = await asyncio.gather(*(client.generate(p, **o) for p, o in zip(prompts, options)))
    assert [list(r.token_ids) for r in results] == want
    for node, old in zip((nodes.a, nodes.b), before):
        new = scrape(node.metrics)
        batches = total(new, "swarm_node_batch_size_steps_count") - total(old, "swarm_node_batch_size_steps_count")
        steps = total(new, "swarm_node_batch_size_steps_sum") - total(old, "swarm_node_batch_size_steps_sum")
        assert steps == sum(len(w) for w in want)  # one step per token (one prefill chunk each)
        # Sessions drift out of step (prompts of different lengths, two pipeline
        # stages), so not every forward holds all 16; most hold several.
        assert steps / batches > 2.5, (node.address, steps, batches)
        assert (await info(node)).stats.max_batch >= 8


REWRITE = [{"role": "user", "content": "Rewrite this function with `total` renamed to `acc`, nothing else:\n"
             "```python\ndef add_all(items):\n    total = 0\n    for item in items:\n        total += item\n"
             "    return total\n```"}]


async def test_speculation_by_prompt_lookup_brings_several_tokens_a_round_trip_and_the_same_text(
    nodes: Nodes, local: Remembered, default_model: Path
) -> None:
    """A rewrite (the output repeats the prompt) over three float32 nodes: greedy and
    seeded tokens equal ``--local``'s, with fewer round trips than tokens."""
    options: list[dict[str, Any]] = [{"max_tokens": 40}, {"max_tokens": 40, "temperature": 0.7, "top_p": 0.9, "seed": 5}]
    for opts in options:
        want = list(local.chat(REWRITE, **opts).token_ids)
        async with AsyncSwarmClient.remote(
            route=nodes.route_text(3), model=default_model, speculate=6, **nodes.trust.library()
        ) as client:
            greedy = "temperature" not in opts
            if greedy:  # always 6 drafts: how many are accepted must not hang on this machine's timings
                client.backend.speculation = Speculation(max_draft=6, adaptive=False)  # type: ignore[attr-defined]
            got = list((await client.chat(REWRITE, **opts)).token_ids)
            stats = client.backend.decode_stats  # type: ignore[attr-defined]
        assert got == want, opts
        assert stats.tokens == len(want), stats
        if greedy:  # (sampled text strays from the prompt: drafts may all miss)
            assert stats.tokens_per_round_trip > 1.6, stats
    # The command line: `--speculate --stats` prints what `--local` prints, and the round trips.
    flags = ["--max-tokens", "24"]
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    routed = nodes.cli("--route", nodes.route_text(2), "--model", str(default_model), prompt, "--speculate", "--stats", *flags)
    assert routed.returncode == 0, routed.stderr
    assert routed.stdout[:-1] == local.generate(prompt, max_tokens=24).text
    assert re.search(r"steps: 24 tokens in \d+ round trips \(\d+\.\d+ tokens/round trip\)", routed.stderr), routed.stderr


@pytest.mark.parametrize("k", [1, 2, 3])
async def test_k_nodes_cost_k_plus_one_messages_per_token(nodes: Nodes, local: Remembered, k: int) -> None:
    prompt = local.encode(PROMPTS[0])
    totals = []
    for decodes in (2, 10):
        async with nodes.session(nodes.route(k), max_length=64) as s:
            out = await s.prefill(prompt)
            for _ in range(decodes):
                out = await s.decode(out.token)  # type: ignore[arg-type]
        streams = await _counted(nodes, s.session_id, expected=k + 1)
        # Every node got one step per token, the tail sent one result per token, and
        # nothing else scales with the tokens (no acks, no per-token setup).
        assert [r["in"].get("step", 0) for r in streams if r["method"] == "Session"] == [1 + decodes] * k
        [results] = [r for r in streams if r["method"] == "Results"]
        assert results["out"] == {"result": 1 + decodes}
        totals.append(sum(sum(r["in"].values()) + sum(r["out"].values()) for r in streams))
    assert (totals[1] - totals[0]) / 8 == k + 1


async def _counted(nodes: Nodes, session_id: str, expected: int) -> list[dict[str, Any]]:
    """The count lines of ``session_id``'s streams, once all ``expected`` have ended."""
    deadline = time.monotonic() + 15
    while True:
        lines = [json.loads(x) for n in nodes.all if n.counts.exists() for x in n.counts.read_text().splitlines()]
        mine = [x for x in lines if x["session"] == session_id]
        if len(mine) >= expected or time.monotonic() > deadline:
            assert len(mine) == expected, mine
            return mine
        await asyncio.sleep(0.05)


# --- bad input, while a good session keeps going ------------------------------------------


async def _raw(node: Node, messages: Sequence[bytes]) -> grpc.aio.AioRpcError:
    """Send raw bytes on a Session stream; the error that ends it."""
    async with node.trust.aio_channel(node.address) as ch:
        call = ch.stream_stream("/swarm.Node/Session", request_serializer=None, response_deserializer=None)(
            iter(messages), metadata=node.trust.metadata
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError("the node accepted it")


def _open(sid: str, start: int, end: int, max_length: int = 64) -> bytes:
    return swarm_pb2.SessionRequest(
        open=swarm_pb2.OpenSession(
            session_id=sid, max_length=max_length, start=start, end=end, protocol_version=PROTOCOL_VERSION
        )
    ).SerializeToString()


def _step(step_id: int, start_pos: int, n: int, hidden: torch.Tensor | None = None) -> bytes:
    msg = swarm_pb2.Step(step_id=step_id, start_pos=start_pos, tokens=[5] * n, sample=True)
    msg.hidden.CopyFrom(codec.encode(torch.zeros(n, HIDDEN) if hidden is None else hidden))
    return swarm_pb2.SessionRequest(step=msg).SerializeToString()


GARBAGE = b"\xff\xfe\x00 not a protobuf \x12\x99"
PROBES = [
    ("malformed bytes first", [GARBAGE], grpc.StatusCode.INVALID_ARGUMENT, "malformed message"),
    ("malformed bytes mid-session", [_open("m", 20, 30), _step(1, 0, 2), GARBAGE], grpc.StatusCode.INVALID_ARGUMENT, "malformed message"),
    ("wrong dtype", [_open("d", 20, 30), _step(1, 0, 2, torch.zeros(2, HIDDEN, dtype=torch.int32))], grpc.StatusCode.INVALID_ARGUMENT, "expected a torch.float32"),
    ("wrong shape", [_open("s", 20, 30), _step(1, 0, 2, torch.zeros(2, HIDDEN - 1))], grpc.StatusCode.INVALID_ARGUMENT, r"expected \[2, 576\]"),
    ("positions out of order", [_open("p", 20, 30), _step(1, 0, 2), _step(2, 5, 1)], grpc.StatusCode.INVALID_ARGUMENT, "starts at position 5 but 2"),
    ("beyond max length", [_open("l", 20, 30, max_length=8), _step(1, 0, 6), _step(2, 6, 3)], grpc.StatusCode.OUT_OF_RANGE, "past max_length 8"),
    ("max length above the node's", [_open("x", 20, 30, max_length=1 << 20)], grpc.StatusCode.OUT_OF_RANGE, "max_length"),
    ("oversized message", [_open("o", 20, 30), b"\x0a" + b"\x00" * (8 << 20)], grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]

CLIENT_THAT_VANISHES = """
import asyncio, os, sys
from swarm_client.remote import Hop, RouteSession
from swarm_proto.tls import TlsFiles
async def main():
    hops = [Hop(a, int(s), int(e)) for a, s, e in (h.split(",") for h in sys.argv[1:])]
    env = os.environ
    tls = TlsFiles(env["SWARM_TLS_CERT"], env["SWARM_TLS_KEY"], env["SWARM_TLS_CA"]) if env.get("SWARM_TLS_CERT") else None
    s = RouteSession(hops, max_length=64, session_id="vanishing", token=env.get("SWARM_TOKEN", ""), tls=tls)
    await s.open()
    await s.prefill([1, 504, 3458, 282, 4649, 314])
    print("ready", flush=True)
    await asyncio.sleep(300)
asyncio.run(main())
"""


async def test_bad_input_gets_a_clear_status_while_a_session_goes_on(nodes: Nodes, local: Remembered) -> None:
    prompt = local.encode(PROMPTS[1])
    want = list(local.generate(PROMPTS[1], max_tokens=len(PROBES) + 6, ignore_eos=True).token_ids)
    got: list[int] = []
    async with nodes.session(nodes.route(3), max_length=128) as good:
        got.append((await good.prefill(prompt)).token)  # type: ignore[arg-type]

        async def go_on() -> None:  # the good session advances between probes
            got.append((await good.decode(got[-1])).token)  # type: ignore[arg-type]

        for name, messages, code, match in PROBES:
            err = await _raw(nodes.c, messages)
            assert err.code() == code, (name, err)
            assert re.search(match, err.details() or ""), (name, err.details())
            await go_on()

        # Results of a session nobody opened, or one already closed: NOT_FOUND.
        async with nodes.session(nodes.route(3), max_length=16) as gone:
            await gone.prefill(prompt)
        for sid in ("never-opened", gone.session_id):
            async with nodes.trust.aio_channel(nodes.c.address) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as rpc:
                    request = swarm_pb2.ResultsRequest(session_id=sid)
                    async for _ in swarm_pb2_grpc.NodeStub(ch).Results(request, metadata=nodes.trust.metadata):
                        pass
            assert rpc.value.code() == grpc.StatusCode.NOT_FOUND and sid in (rpc.value.details() or "")
        await go_on()

        # A successor that refuses (it does not host the layers asked of it): named, and
        # the head frees the session it had opened.
        with pytest.raises(RouteError) as refused:
            async with nodes.session([Hop(nodes.a.address, 0, 10), Hop(nodes.c.address, 10, 30)], max_length=16):
                pass
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.address == nodes.c.address and "hosts [20, 30)" in refused.value.message
        await go_on()

        # A client process that disappears mid-session: every node frees its KV cache.
        hops = [f"{h.address},{h.start},{h.end}" for h in nodes.route(3)]
        client = Proc.start(
            [sys.executable, "-c", CLIENT_THAT_VANISHES, *hops], Path(os.devnull), env=nodes.trust.client_env()
        )
        try:
            client.wait_line("ready", timeout=60)
            assert await wait_active(nodes.all, 2, timeout=5) == [2, 2, 2]
            os.kill(client.proc.pid, signal.SIGKILL)
            client.proc.wait()
        finally:
            client.kill()
        assert await wait_active(nodes.all, 1) == [1, 1, 1]  # only the good session is left
        # Its streams end with a reset or an end of stream, whichever the kernel's
        # close of its sockets turns into first.
        assert re.search(r"session vanishing upstream (went away|finished)", nodes.a.logs())
        await go_on()

        while len(got) < len(want):
            await go_on()
    assert got == want


# --- a node killed (last: it takes the module's node B down) --------------------------------


async def test_sigkill_mid_generation_makes_the_client_raise_not_hang(nodes: Nodes, default_model: Path) -> None:
    tokens, t0 = 0, 0.0
    async with AsyncSwarmClient.remote(route=nodes.route_text(3), model=default_model, **nodes.trust.library()) as client:
        with pytest.raises(GenerationError) as err:
            async with asyncio.timeout(30):
                async for event in client.stream(PROMPTS[2], max_tokens=200, ignore_eos=True):
                    tokens += len(event.token_ids)
                    if tokens >= 3 and nodes.b.proc.proc.poll() is None:
                        nodes.b.proc.kill()
                        t0 = time.monotonic()
    assert time.monotonic() - t0 < 20
    assert tokens < 200 and nodes.b.address in str(err.value)
    assert await wait_active([nodes.a, nodes.c], 0) == [0, 0]

