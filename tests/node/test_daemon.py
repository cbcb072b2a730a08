"""Real ``swarm-node`` processes on 127.0.0.1, each hosting a slice of a tiny model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from helpers import reference_model
from swarm_client.remote import Hop, RouteError, RouteSession
from swarm_proto import swarm_pb2, swarm_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = [1, 45, 9, 210, 77, 3, 18, 140, 66, 5, 301, 12, 98, 7]


@dataclass
class NodeProcess:
    proc: subprocess.Popen[str]
    log: Path
    start: int
    end: int
    _address: list[str]
    _reader: threading.Thread

    @property
    def address(self) -> str:
        """Wait (once) for the "listening on" line; the processes start in parallel."""
        self._reader.join(90)
        if not self._address:
            self.proc.kill()
            raise AssertionError(f"swarm-node did not start:\n{self.log.read_text()}")
        return self._address[0]

    @property
    def hop(self) -> Hop:
        return Hop(self.address, self.start, self.end)

    def logs(self) -> str:
        return self.log.read_text()


def _command() -> list[str]:
    script = Path(sys.executable).parent / "swarm-node"
    return [str(script)] if script.exists() else [sys.executable, "-m", "swarm_node.cli"]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    procs: list[NodeProcess] = []

    def start(model: Path | None, layers: str | None, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
        args = _command() + ["--port", "0", "--threads", "1", *extra]
        if model is not None:
            args += ["--model", str(model)]
        if layers is not None:
            args += ["--layers", layers]
        log = tmp_path / f"node-{len(procs)}.log"
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env={**os.environ, **(env or {})},
        )
        found: list[str] = []
        reader = threading.Thread(target=_read_address, args=(proc, found), daemon=True)
        reader.start()
        a, b = (layers or (env or {}).get("SWARM_LAYERS", "0:6")).split(":")
        node = NodeProcess(proc, log, int(a), int(b), found, reader)
        procs.append(node)
        return node

    yield start
    for node in procs:
        if node.proc.poll() is None:
            node.proc.terminate()
    for node in procs:
        try:
            node.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


def _read_address(proc: subprocess.Popen[str], found: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            found.append(line.split("listening on", 1)[1].strip())
            return


async def _info(address: str) -> swarm_pb2.NodeInfo:
    async with grpc.aio.insecure_channel(address) as ch:
        return await swarm_pb2_grpc.NodeStub(ch).Info(swarm_pb2.InfoRequest(), timeout=10)


def _hf_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    model = reference_model(path)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


async def test_three_processes_generate_what_transformers_generates(spawn: Any, tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama3"]
    nodes = [spawn(path, layers) for layers in ("0:2", "2:4", "4:6")]
    hops = [n.hop for n in nodes]
    tokens = []
    async with RouteSession(hops, max_length=64, prefill_chunk=5) as s:  # 3 pipelined chunks
        out = await s.prefill(PROMPT)
        tokens.append(out.token)
        for _ in range(11):
            out = await s.decode(tokens[-1])  # type: ignore[arg-type]
            tokens.append(out.token)
    assert tokens == _hf_greedy(path, PROMPT, 12)

    infos = [await _info(n.address) for n in nodes]
    assert [(i.start, i.end, i.num_layers) for i in infos] == [(0, 2, 6), (2, 4, 6), (4, 6, 6)]
    assert all(i.active_sessions == 0 and i.stats.steps == 14 for i in infos)
    for n in nodes:
        logs = n.logs()
        assert f"session {s.session_id} opened" in logs
        assert f"session {s.session_id} closed: 14 steps, 25 positions" in logs


async def test_flags_fall_back_to_environment_variables(spawn: Any, tiny_models: dict[str, Path]) -> None:
    env = {
        "SWARM_MODEL": str(tiny_models["tied"]),
        "SWARM_LAYERS": "0:6",
        "SWARM_MAX_SESSIONS": "1",
        "SWARM_MAX_LENGTH": "32",
        "SWARM_DTYPE": "bfloat16",
        "SWARM_NODE_ID": "env-node",
    }
    node = spawn(None, None, env=env)
    info = await _info(node.address)
    assert (info.node_id, info.max_sessions, info.max_length, info.dtype) == ("env-node", 1, 32, "bfloat16")
    assert info.device == "cpu" and info.start == 0 and info.end == 6

    with pytest.raises(RouteError) as err:
        async with RouteSession([node.hop], max_length=64):
            pass
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
    async with RouteSession([node.hop], max_length=32) as s:
        await s.prefill(PROMPT[:4])
        with pytest.raises(RouteError) as err:
            async with RouteSession([node.hop], max_length=32):
                pass
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await _info(node.address)).stats.sessions_refused == 1


async def test_sigterm_ends_sessions_cleanly_and_exits(spawn: Any, tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama3"]
    head, tail = spawn(path, "0:3", "--drain-timeout", "5"), spawn(path, "3:6")
    async with RouteSession([head.hop, tail.hop], max_length=32, timeout=20) as s:
        out = await s.prefill(PROMPT)
        head.proc.send_signal(signal.SIGTERM)
        assert head.proc.wait(timeout=30) == 0
        with pytest.raises(RouteError) as err:
            await s.decode(out.token)  # type: ignore[arg-type]
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.value.message
    assert "draining" in head.logs()
    # The successor got a Close, not a broken stream, and freed the session.
    assert (await _info(tail.address)).active_sessions == 0
    assert f"session {s.session_id} closed" in tail.logs()


async def test_killed_node_is_named_and_the_rest_frees_the_session(spawn: Any, tiny_models: dict[str, Path]) -> None:
    path = tiny_models["qwen2"]
    nodes = [spawn(path, layers) for layers in ("0:2", "2:4", "4:6")]
    async with RouteSession([n.hop for n in nodes], max_length=32, timeout=20) as s:
        out = await s.prefill(PROMPT)
        nodes[1].proc.kill()
        nodes[1].proc.wait()
        with pytest.raises(RouteError) as err:
            await s.decode(out.token)  # type: ignore[arg-type]
    assert err.value.address == nodes[1].address
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        infos = [await _info(n.address) for n in (nodes[0], nodes[2])]
        if all(i.active_sessions == 0 for i in infos):
            break
        await asyncio.sleep(0.05)
    assert all(i.active_sessions == 0 for i in infos)


def test_bad_flags_exit_with_a_message(tiny_models: dict[str, Path]) -> None:
    cmd = _command() + ["--model", str(tiny_models["llama3"]), "--layers", "4:2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "layer range 4:2" in proc.stderr
    proc = subprocess.run(_command() + ["--model", str(tiny_models["llama3"]), "--layers", "0:9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "not inside the model's 6 layers" in proc.stderr


async def test_default_model_over_three_processes(spawn: Any, default_model: Path, default_reference: Any, default_tokenizer: Any) -> None:
    """SmolLM2 (GGUF, 30 layers) cut in three: the greedy continuation transformers gives."""
    nodes = [spawn(default_model, layers, "--threads", "2") for layers in ("0:11", "11:22", "22:30")]
    prompt = default_tokenizer("The capital of France is")["input_ids"]
    tokens: list[int] = []
    async with RouteSession([n.hop for n in nodes], max_length=64, prefill_chunk=3) as s:
        out = await s.prefill(prompt)
        tokens.append(out.token)  # type: ignore[arg-type]
        for _ in range(5):
            out = await s.decode(tokens[-1])
            tokens.append(out.token)  # type: ignore[arg-type]
    with torch.no_grad():
        ref = default_reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    assert tokens[: len(ref)] == ref.tolist()  # generate() stops early at EOS
    assert default_tokenizer.decode(tokens).startswith(" Paris")


async def test_the_cli_waits_for_room_on_a_busy_node_and_says_so(
    spawn: Any, default_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``swarm generate --route ... --stats`` on a node whose KV budget holds one session,
    taken: the CLI is refused "busy", waits (within --timeout), and reports the wait."""
    from swarm_client import cli

    node = spawn(default_model, "0:30", "--kv-budget", "3M")  # 30 layers x 1536 B x 64 positions = 2.9 MB: one session
    async with RouteSession([node.hop], max_length=16) as held:
        await held.prefill([1, 2, 3])
        argv = ["generate", "Hi", "--route", node.address, "--model", str(default_model), "--max-tokens", "3",
                "--temperature", "0", "--stats", "--timeout", "120"]  # fmt: skip
        run = asyncio.ensure_future(asyncio.to_thread(cli.main, argv))
        for _ in range(600):  # until the CLI's open was refused
            if (await _info(node.address)).stats.sessions_refused >= 1:
                break
            await asyncio.sleep(0.05)
        assert not run.done()
    assert await run == 0  # room once `held` closed
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("busy: "))
    assert int(line.split()[1]) >= 1 and "failovers: 0" in line, err
