"""The engine on a GPU in bfloat16, against transformers on the same card.

1. Equivalence: random-weight Llama models (a small one with grouped KV heads
   and an untied head, and the 7B-shaped one below) in bfloat16, the same
   weights in both engines: relative logit error ||ours - ref|| / ||ref|| over
   a 64-token prompt. Target below 2e-2; the script exits non-zero above it.
2. Speed: a randomly initialised Llama-2-7B-shaped model (32 layers, hidden
   4096, MLP 11008, 32 heads, vocabulary 32000), greedy decode tokens/s at
   batch 1 and batch 16, median of --runs runs, the engines alternating; on
   CUDA also our engine with its decode graphs off ("ours eager").

Runs in a few minutes on one H100; needs torch with CUDA and transformers.

    python bench/gpu_engine.py [--runs 5] [--steps 64] [--out bench/results/gpu_engine.json]
    python bench/gpu_engine.py --device cpu --small   # a dry run of the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import Row, compare, hf_runner, ours_runner, print_table  # noqa: E402

from swarm_node.engine.loading import build_slice  # noqa: E402
from swarm_node.engine.model import ModelSlice, SeqChunk  # noqa: E402
from swarm_proto.model_args import ModelArgs  # noqa: E402

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
SMALL_GQA = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
)


def random_pair(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> tuple[ModelSlice, Any, dict[str, float]]:
    """transformers' LlamaForCausalLM with random weights in `dtype`, our slice over the
    same tensors, and how far each is from transformers in float32 on those weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        ref = LlamaForCausalLM(cfg).eval()  # float32 first: the exact reference
    ids = torch.randint(3, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        exact = ref(ids[None]).logits[0].float()
    # Cast the weights; the rotary tables stay float32, as from_pretrained(dtype=...) leaves them.
    buffers = {name: b.clone() for name, b in ref.named_buffers()}
    ref = ref.to(dtype)
    for name, b in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(ref.get_submodule(owner), attr, b)
    args = ModelArgs.from_hf_config(cfg.to_dict())
    ours = build_slice(args, 0, args.num_layers, dict(ref.state_dict()), dtype=dtype, device=device)
    with torch.inference_mode():
        mine = ours(ids, [SeqChunk(ours.new_cache(len(ids)), 0, len(ids))], all_logits=True).float()
        theirs = ref(ids[None]).logits[0].float()
    errors = {
        "relative_error": _rel(mine, theirs),  # the target: ours vs transformers, both in bfloat16
        "top1_agreement": (mine.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
        "ours_vs_float32": _rel(mine, exact),
        "transformers_vs_float32": _rel(theirs, exact),
    }
    return ours, ref, errors


def eager_runner(model: ModelSlice, sync: Any) -> dict[str, Any]:
    """``ours_runner`` with the slice's decode graphs switched off while it runs."""
    fns = ours_runner(model, sync)

    def off(fn: Any) -> Any:
        def run(ids: torch.Tensor, steps: int) -> float:
            mode, model.graph_mode = model.graph_mode, "off"
            try:
                return fn(ids, steps)
            finally:
                model.graph_mode = mode

        return run

    return {kind: off(fn) for kind, fn in fns.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def profile(name: str, fn: Any, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"--- {name}: 4 decode steps at batch 16")
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per run")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--small", action="store_true", help="tiny shapes instead of 7B (a dry run)")
    ap.add_argument("--profile", action="store_true", help="also print each engine's top operators in batch-16 decode")
    ap.add_argument("--out", default="bench/results/gpu_engine.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else args.device,
        "torch": torch.__version__,
        "dtype": "bfloat16",
    }
    t0 = time.perf_counter()

    small, big = (TINY, TINY) if args.small else (SMALL_GQA, LLAMA2_7B)
    ours, ref, report["equivalence_small_gqa"] = random_pair(small, device, dtype)
    del ours, ref

    ours, ref, report["equivalence_7b_shape"] = random_pair(big, device, dtype)
    print(json.dumps(report, indent=2), flush=True)

    vocab = ours.args.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = [
        ("decode batch 1 (tok/s)", "decode", torch.randint(3, vocab, (1, args.prompt), generator=gen).to(device), "higher"),
        ("decode batch 16 (tok/s)", "decode", torch.randint(3, vocab, (16, args.prompt), generator=gen).to(device), "higher"),
    ]
    engines = {"ours": ours_runner(ours, sync), "transformers": hf_runner(ref, sync)}
    if device.type == "cuda":  # the same engine with its decode graphs off (engine/graphs.py)
        engines["ours eager"] = eager_runner(ours, sync)
    report["rows"] = compare(engines, rows, args.runs, args.steps)
    if args.profile:
        for name, fns in engines.items():
            profile(name, lambda: fns["decode"](rows[1][2], 4), device)
    report["seconds"] = time.perf_counter() - t0
    report["runs"], report["steps"], report["prompt"] = args.runs, args.steps, args.prompt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, bfloat16, random weights of shape {'tiny' if args.small else 'Llama-2-7B'}")
    print_table(report["rows"])
    for r in report["rows"]:
        if "ours eager" in r["median"]:
            m = r["median"]
            print(f"{r['row']:26} ours without CUDA graphs {m['ours eager']:.3f} (graphs {m['ours'] / m['ours eager']:.2f}x)")
    print(f"(median of {args.runs} runs of {args.steps} steps after a {args.prompt}-token prompt; {report['seconds']:.0f} s; JSON in {out})")
    worst = max(report[k]["relative_error"] for k in ("equivalence_small_gqa", "equivalence_7b_shape"))
    if worst > 2e-2:
        sys.exit(f"relative logit error {worst:.3g} above the 2e-2 target")


if __name__ == "__main__":
    main()
