"""Engine benchmark: this engine vs transformers, same weights, same threads, side by side.

Rows: prefill of a 128-token prompt (seconds), greedy decode tokens/s at batch 1
and batch 8. Each figure is the median of --runs runs, the two engines
alternating so that machine noise hits both alike.

    .venv/bin/python bench/engine.py [--model PATH] [--threads 2] [--runs 5] [--out bench/results/engine.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def no_sync() -> None:
    pass


def ours_runner(model: Any, sync: Callable[[], None] = no_sync) -> dict[str, Callable[[torch.Tensor, int], float]]:
    """Timed prefill and greedy decode through our engine; `sync` waits for the device."""
    from swarm_node.engine.model import SeqChunk

    def prefill(ids: torch.Tensor, _: int) -> float:
        cache = model.new_cache(ids.shape[1])
        sync()
        t = time.perf_counter()
        model(ids[0], [SeqChunk(cache, 0, ids.shape[1])])
        sync()
        return time.perf_counter() - t

    def decode(ids: torch.Tensor, steps: int) -> float:
        b, n = ids.shape
        caches = [model.new_cache(n + steps) for _ in range(b)]
        logits = model(ids.reshape(-1), [SeqChunk(c, 0, n) for c in caches])
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            toks = logits.argmax(-1)
            logits = model(toks, [SeqChunk(c, c.length, 1) for c in caches])
        sync()
        return b * steps / (time.perf_counter() - t)

    return {"prefill": prefill, "decode": decode}


def hf_runner(model: Any, sync: Callable[[], None] = no_sync) -> dict[str, Callable[[torch.Tensor, int], float]]:
    """The same through transformers, with its own KV cache."""

    @torch.inference_mode()
    def prefill(ids: torch.Tensor, _: int) -> float:
        sync()
        t = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        sync()
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode(ids: torch.Tensor, steps: int) -> float:
        out = model(ids, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        logits = out.logits[:, -1]
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            toks = logits.argmax(-1, keepdim=True)
            out = model(toks, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        sync()
        return ids.shape[0] * steps / (time.perf_counter() - t)

    return {"prefill": prefill, "decode": decode}


Row = tuple[str, str, torch.Tensor, str]  # label, runner kind, prompt ids [B, n], "lower"/"higher" is better


def compare(engines: dict[str, dict[str, Callable[[torch.Tensor, int], float]]], rows: list[Row], runs: int, steps: int) -> list[dict[str, Any]]:
    """Median of `runs` samples per engine and row, the engines alternating run by run."""
    results: list[dict[str, Any]] = []
    for label, kind, ids, better in rows:
        samples: dict[str, list[float]] = {name: [] for name in engines}
        for name, fns in engines.items():  # warm-up
            fns[kind](ids, 4)
        for _ in range(runs):
            for name, fns in engines.items():
                samples[name].append(fns[kind](ids, steps))
        med = {name: statistics.median(v) for name, v in samples.items()}
        ratio = med["transformers"] / med["ours"] if better == "lower" else med["ours"] / med["transformers"]
        results.append({"row": label, "median": med, "samples": samples, "speedup": ratio})
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'':26} {'ours':>10} {'transformers':>13} {'ours vs tf':>11}")
    for r in results:
        print(f"{r['row']:26} {r['median']['ours']:10.3f} {r['median']['transformers']:13.3f} {r['speedup']:10.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the pulled SmolLM2 GGUF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per run")
    ap.add_argument("--out", default="bench/results/engine.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from swarm_node.engine.loading import load_slice
    from swarm_proto.model_args import read_args
    from swarm_proto.store import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    n_layers = read_args(path).num_layers
    ours = load_slice(path, 0, n_layers)
    if path.is_file():
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref.eval()
    engines = {"ours": ours_runner(ours), "transformers": hf_runner(ref)}

    gen = torch.Generator().manual_seed(0)
    vocab = ours.args.vocab_size
    rows = [
        ("prefill 128 tokens (s)", "prefill", torch.randint(3, vocab, (1, 128), generator=gen), "lower"),
        ("decode batch 1 (tok/s)", "decode", torch.randint(3, vocab, (1, 16), generator=gen), "higher"),
        ("decode batch 8 (tok/s)", "decode", torch.randint(3, vocab, (8, 16), generator=gen), "higher"),
    ]
    results = compare(engines, rows, args.runs, args.steps)

    report = {
        "model": str(path),
        "threads": args.threads,
        "runs": args.runs,
        "torch": torch.__version__,
        "rows": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(results)
    print(f"(median of {args.runs} runs, {args.threads} threads; JSON in {out})")


if __name__ == "__main__":
    main()
