"""Policy benchmark: what the acceptable-use policy costs a streamed generation.

The gateway app runs in process (the official ``openai`` client over httpx's ASGI
transport) on a scripted backend that answers instantly, so the figure is the
gateway's own work per token, with nothing to hide it: the worst case for the policy's
relative cost. The same streamed completion (``--tokens`` tokens) is requested
through two apps, alternating each round so that machine noise hits both alike:

- off: no ``--policy``;
- on: ``docs/policy.example.toml`` plus ``--extra-rules`` more pattern rules on the
  completion (hold-back 32 characters, scan window 512).

Per round: microseconds per token for each. The table is the median over rounds, and
the policy's added microseconds per token; compare it with a decode step of a real
swarm (tens of milliseconds on CPU, ~10-30 ms on a GPU).

    .venv/bin/python bench/policy.py [--tokens 256] [--rounds 9] [--extra-rules 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx2
import openai

from swarm_client import SwarmClient
from swarm_client.tokenizer import Tokenizer
from swarm_client.types import SampledToken, TokenSource
from swarm_coordinator.http import GatewayConfig, create_app
from swarm_proto.wire import SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest. "
OFFSET = 3


class _Bytes:
    """A byte-level stand-in for a tokenizer: token = byte + 3."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __len__(self) -> int:
        return 256 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + OFFSET for b in text.encode()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")


class _Script(TokenSource):
    max_context = 1 << 20
    eos_token_ids = (2,)

    def tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[SampledToken]:
        data = (TEXT * (max_new_tokens // len(TEXT) + 1)).encode()
        for b in data[:max_new_tokens]:
            yield SampledToken(b + OFFSET, -0.1)


def _app(policy: str | None) -> Any:
    client = SwarmClient(_Script(), Tokenizer(_Bytes(), source="/models/bench-bytes"))  # type: ignore[arg-type]
    return create_app(client, None, GatewayConfig(policy_file=policy))


async def _stream(app: Any, tokens: int) -> float:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gw")
    api = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0)
    t0 = time.perf_counter()
    stream = await api.completions.create(model="bench-bytes", prompt="Go", max_tokens=tokens, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    elapsed = time.perf_counter() - t0
    assert len(text) == tokens, (len(text), tokens)
    await http.aclose()
    return elapsed / tokens * 1e6


def _policy_file(extra: int, root: Path) -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "policy.example.toml").read_text()
    for i in range(extra):
        text += f'\n[[rule]]\nid = "extra-{i}"\npattern = "forbidden phrase number {i}\\\\b"\napplies_to = "both"\naction = "stop"\n'
    path = root / "policy.toml"
    path.write_text(text)
    return str(path)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        apps = {"off": _app(None), "on": _app(_policy_file(args.extra_rules, Path(tmp)))}
        for app in apps.values():
            await _stream(app, 16)  # warm up
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(args.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            for name in order:
                runs[name].append(await _stream(apps[name], args.tokens))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "tokens": args.tokens,
        "rounds": args.rounds,
        "rules": 2 + args.extra_rules,
        "us_per_token": {k: round(v, 1) for k, v in med.items()},
        "policy_added_us_per_token": round(med["on"] - med["off"], 1),
        "ratio": round(med["on"] / med["off"], 3),
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--extra-rules", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "policy.json")
    args = p.parse_args()
    result = asyncio.run(bench(args))
    print(f"{'policy':<8}{'us/token':>10}")
    for k, v in result["us_per_token"].items():
        print(f"{k:<8}{v:>10.1f}")
    print(f"added by {result['rules']} rules: {result['policy_added_us_per_token']} us/token (x{result['ratio']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
