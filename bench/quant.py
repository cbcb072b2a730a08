"""Quantized weights: our engine (float32, bfloat16, quantized) against llama.cpp, side by side.

Same GGUF file, same thread count, the engines alternating run by run so that machine
noise hits all alike; each figure is the median of --runs runs. Rows per model and
thread count: decode tokens/s at batch 1 and 8 (llama.cpp: batch 1 only, `llama-bench`
has no parallel sequences), prefill of 128 tokens (tokens/s), and the weights held in
memory against the file's tensor bytes (llama.cpp maps the file: its weights are the
file).

Models: the default SmolLM2 Q4_1, and a 1B-class Llama shape (22 layers, hidden 2048,
MLP 5632, 32 heads / 4 KV heads) with random weights written as Q4_0 and Q8_0 GGUF into
the cache (vocabulary 49152, SmolLM2's: llama.cpp needs a tokenizer and takes SmolLM2's
`tokenizer.*` fields, which fix the vocabulary size).

llama.cpp is a bench-only dependency, built outside the repository (never in `make test`):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d ~/.cache/llama-swarm-bench
    cd ~/.cache/llama-swarm-bench && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \\
          -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j2 --target llama-bench

    PYTHONPATH=proto:node .venv/bin/python bench/quant.py [--threads 1,2] [--runs 3] [--models smollm2,1b-q4_0,1b-q8_0]

On a CUDA machine, ``--gpu`` runs the GPU rows instead: a Llama-3-8B-shaped model (32
layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocabulary 128256) with random
bfloat16 weights, written once with ``save_pretrained`` (16 GB, into --gpu-dir), then our
engine holding it as bfloat16, int8 and int4 (``--quantize``; engine.quant_cuda): GPU
memory held after the load and decode tokens/s at batch 1 and 16 (median of --runs runs
of 32 steps). Needs torch with CUDA, transformers and safetensors; no gguf:

    PYTHONPATH=proto:node python bench/quant.py --gpu [--gpu-dir DIR] [--budget 170]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE = Path(os.environ.get("SWARM_BENCH_CACHE", Path.home() / ".cache" / "llama-swarm-bench"))
LLAMA_BENCH = CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin" / "llama-bench"
SHAPE_1B = {"layers": 22, "hidden": 2048, "mlp": 5632, "heads": 32, "kv_heads": 4}

# our engine's variants: (dtype, weights, kernel dtype)
VARIANTS: dict[str, tuple[torch.dtype, str, torch.dtype | None]] = {
    "float32": (torch.float32, "float", None),
    "bfloat16": (torch.bfloat16, "float", None),
    "quantized": (torch.float32, "gguf", torch.bfloat16),  # the node's default on CPU
    # the same without batch invariance (causal prefill kernel, pooled batched decode): its price
    "quantized-noinv": (torch.float32, "gguf", torch.bfloat16),
    # the same without the layers' rounding spread (engine.quant.SPREAD): its price
    "quantized-nospread": (torch.float32, "gguf", torch.bfloat16),
    # Q4_0/Q4_1/Q8_0 on PyTorch's int4 kernel instead of the VNNI one (engine.blockq)
    "quantized-aten": (torch.float32, "gguf", torch.bfloat16),
}


def write_1b(kind: str, donor: Path) -> Path:
    """A random 1B-class Llama as GGUF of type `kind` (Q4_0 or Q8_0), cached."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    out = CACHE / f"llama-1b-random.{kind}.gguf"
    if out.exists():
        return out
    s = SHAPE_1B
    c, f, h, kv = s["hidden"], s["mlp"], s["heads"], s["kv_heads"]
    d = c // h
    qt = GGMLQuantizationType[kind]
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("llama-1b-random")
    w.add_block_count(s["layers"])
    w.add_embedding_length(c)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_context_length(2048)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(2 if kind == "Q4_0" else 7)
    r = GGUFReader(str(donor))
    vocab = 0
    for key, field in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            values = field.contents()
            w.add_array(key, values)
            if key == "tokenizer.ggml.tokens":
                vocab = len(values)
        else:
            w.add_key_value(key, field.contents(), vtype)
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], quantized: bool = True) -> None:
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if quantized:
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, np.ones(shape, dtype=np.float32))

    add("token_embd.weight", (vocab, c))
    add("output.weight", (vocab, c))
    add("output_norm.weight", (c,), False)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (c,), False)
        add(p + "ffn_norm.weight", (c,), False)
        add(p + "attn_q.weight", (c, c))
        add(p + "attn_k.weight", (kv * d, c))
        add(p + "attn_v.weight", (kv * d, c))
        add(p + "attn_output.weight", (c, c))
        add(p + "ffn_gate.weight", (f, c))
        add(p + "ffn_up.weight", (f, c))
        add(p + "ffn_down.weight", (c, f))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def ours(path: Path, dtype: torch.dtype, weights: str, kdtype: torch.dtype | None,
         invariant: bool = True, spread: bool = True, vnni: bool = True) -> tuple[Any, dict[str, Callable[[int], float]]]:
    from unittest import mock

    from swarm_node.engine import blockq, quant
    from swarm_node.engine.loading import load_slice
    from swarm_node.engine.model import SeqChunk
    from swarm_proto.model_args import read_args

    with mock.patch.object(blockq, "takes", blockq.takes if vnni else lambda kind, shape: False):
        model = load_slice(path, 0, read_args(path).num_layers, dtype=dtype, weights=weights, kernel_dtype=kdtype)
    model.batch_invariant = model.batch_invariant and invariant
    if not spread:
        for m in model.modules():
            if isinstance(m, quant.QuantLinear):
                m.spread = None
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (128,), generator=gen)

    def decode(batch: int, steps: int = 32) -> float:
        caches = [model.new_cache(16 + steps) for _ in range(batch)]
        logits = model(prompt[: 16 * batch].reshape(-1) if batch <= 8 else prompt[:16].repeat(batch),
                       [SeqChunk(c, 0, 16) for c in caches])
        t = time.perf_counter()
        for _ in range(steps):
            logits = model(logits.argmax(-1), [SeqChunk(c, c.length, 1) for c in caches])
        return batch * steps / (time.perf_counter() - t)

    def prefill(_: int = 0) -> float:
        cache = model.new_cache(128)
        t = time.perf_counter()
        model(prompt, [SeqChunk(cache, 0, 128)])
        return 128 / (time.perf_counter() - t)

    return model, {"decode_b1": lambda: decode(1), "decode_b8": lambda: decode(8), "prefill_128": prefill}


def llama_cpp(path: Path, threads: int) -> dict[str, float]:
    """One llama-bench run: prefill of 128 and 32 decode steps (tokens/s)."""
    out = subprocess.run(
        [str(LLAMA_BENCH), "-m", str(path), "-t", str(threads), "-p", "128", "-n", "32", "-r", "1", "-o", "json"],
        check=True, capture_output=True, text=True, timeout=900,
    )
    got: dict[str, float] = {}
    for row in json.loads(out.stdout):
        key = "prefill_128" if row["n_prompt"] > 0 else "decode_b1"
        got[key] = float(row["avg_ts"])
    return got


def file_tensor_bytes(path: Path) -> int:
    from swarm_proto.gguf_index import index

    return sum(t.n_bytes for t in index(path).tensors.values())


def bench_model(
    name: str, path: Path, threads: list[int], runs: int, with_llama: bool, variants: list[str]
) -> list[dict[str, Any]]:
    from swarm_node.engine.loading import model_bytes

    results = []
    engines: dict[str, dict[str, Callable[[], float]]] = {}
    held: dict[str, int] = {}
    for variant in variants:
        dtype, weights, kdtype = VARIANTS[variant]
        model, fns = ours(path, dtype, weights, kdtype, invariant=not variant.endswith("-noinv"),
                          spread=not variant.endswith("-nospread"), vnni=not variant.endswith("-aten"))
        engines[variant] = fns  # type: ignore[assignment]
        held[variant] = model_bytes(model)
    file_bytes = file_tensor_bytes(path)
    for t in threads:
        torch.set_num_threads(t)
        samples: dict[str, dict[str, list[float]]] = {v: {} for v in [*engines, "llama.cpp"]}
        for fns in engines.values():  # warm-up
            for fn in fns.values():
                fn()
        for _ in range(runs):
            for variant, fns in engines.items():
                for row, fn in fns.items():
                    samples[variant].setdefault(row, []).append(fn())
            if with_llama:
                for row, v in llama_cpp(path, t).items():
                    samples["llama.cpp"].setdefault(row, []).append(v)
        for variant, rows in samples.items():
            if not rows:
                continue
            weights = held.get(variant, os.path.getsize(path))
            results.append({
                "model": name, "threads": t, "engine": variant,
                **{row: statistics.median(v) for row, v in rows.items()},
                "samples": rows, "weights_bytes": weights, "file_tensor_bytes": file_bytes,
                "weights_vs_file": weights / file_bytes,
            })
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'model':10} {'thr':>3} {'engine':10} {'dec b1':>8} {'dec b8':>8} {'pre 128':>8} {'MB held':>8} {'x file':>7} {'b1 vs llama.cpp':>16}")
    ref = {(r["model"], r["threads"]): r for r in results if r["engine"] == "llama.cpp"}
    for r in results:
        lc = ref.get((r["model"], r["threads"]))
        ratio = f"{r['decode_b1'] / lc['decode_b1']:.2f}x" if lc and "decode_b1" in lc else "-"
        b8 = f"{r['decode_b8']:8.1f}" if "decode_b8" in r else f"{'-':>8}"
        print(f"{r['model']:10} {r['threads']:3d} {r['engine']:10} {r['decode_b1']:8.1f} {b8} {r['prefill_128']:8.1f} "
              f"{r['weights_bytes'] / 1e6:8.1f} {r['weights_vs_file']:7.2f} {ratio:>16}")


SHAPE_8B = {"layers": 32, "hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
GPU_VARIANTS = {"int4": "int4", "bfloat16": "float", "int8": "int8"}  # engine -> weight format, in run order


def write_8b(out: Path) -> Path:
    """A random Llama-3-8B-shaped bfloat16 checkpoint (built on the GPU), written once."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = SHAPE_8B
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="4GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    tmp.rename(out)
    return out


def gpu_decode(model: Any, batch: int, steps: int) -> float:
    """Decode tokens/s: `batch` sequences of 16 prompt tokens, then `steps` greedy steps."""
    from swarm_node.engine.model import SeqChunk

    caches = [model.new_cache(16 + steps) for _ in range(batch)]
    prompt = torch.arange(3, 19, device=model.device).repeat(batch)
    logits = model(prompt, [SeqChunk(c, 0, 16) for c in caches])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        logits = model(logits.argmax(-1), [SeqChunk(c, c.length, 1) for c in caches])
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def bench_gpu(root: Path, runs: int, steps: int, budget_s: float, engines: list[str]) -> list[dict[str, Any]]:
    """The GPU rows, printed as they come; engines left when `budget_s` has passed are skipped."""
    from swarm_node.engine.loading import load_slice, model_bytes

    t0 = time.perf_counter()
    path = write_8b(root)
    print(f"checkpoint {path} ready after {time.perf_counter() - t0:.0f} s", flush=True)
    results: list[dict[str, Any]] = []
    for engine in engines:
        if time.perf_counter() - t0 > budget_s:
            print(f"{engine}: skipped (time box of {budget_s:.0f} s spent)", flush=True)
            continue
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        model = load_slice(path, 0, SHAPE_8B["layers"], dtype=torch.bfloat16, weights=GPU_VARIANTS[engine], device="cuda")
        torch.cuda.synchronize()
        row: dict[str, Any] = {
            "model": "llama3-8b-random", "engine": engine, "device": torch.cuda.get_device_name(),
            "load_s": time.perf_counter() - t, "gpu_bytes": torch.cuda.memory_allocated() - base,
            "gpu_peak_load_bytes": torch.cuda.max_memory_allocated() - base, "weights_bytes": model_bytes(model),
        }
        for batch in (1, 16):
            gpu_decode(model, batch, 4)  # warm-up
            samples = [gpu_decode(model, batch, steps) for _ in range(runs)]
            row[f"decode_b{batch}"] = statistics.median(samples)
            row.setdefault("samples", {})[f"decode_b{batch}"] = samples
        results.append(row)
        print(f"{engine}: {json.dumps({k: v for k, v in row.items() if k != 'samples'})}", flush=True)
        del model
    print(f"GPU rows done after {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def print_gpu_table(results: list[dict[str, Any]]) -> None:
    ref = {r["engine"]: r for r in results}.get("bfloat16")
    print(f"{'engine':9} {'GB on GPU':>9} {'GB wts':>7} {'dec b1':>8} {'dec b16':>8} {'b1 vs bf16':>10} {'load s':>7}")
    for r in results:
        ratio = f"{r['decode_b1'] / ref['decode_b1']:.2f}x" if ref else "-"
        print(f"{r['engine']:9} {r['gpu_bytes'] / 1e9:9.2f} {r['weights_bytes'] / 1e9:7.2f} {r['decode_b1']:8.1f} "
              f"{r['decode_b16']:8.1f} {ratio:>10} {r['load_s']:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="smollm2,1b-q4_0,1b-q8_0")
    ap.add_argument("--no-llama", action="store_true", help="our engine only (no llama-bench binary)")
    ap.add_argument("--engines", default="float32,bfloat16,quantized",
                    help=f"our variants to run (of {','.join(VARIANTS)})")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/quant.json, quant_gpu.json with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="the CUDA rows (Llama-3-8B shape) instead of the CPU ones")
    ap.add_argument("--gpu-dir", default=str(CACHE / "llama3-8b-random"), help="where the random checkpoint is kept")
    ap.add_argument("--gpu-engines", default=",".join(GPU_VARIANTS), help=f"of {','.join(GPU_VARIANTS)}")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per run (--gpu)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds after which --gpu skips engines left")
    args = ap.parse_args()

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        gpu_results = bench_gpu(Path(args.gpu_dir), args.runs, args.steps, args.budget, args.gpu_engines.split(","))
        out = Path(args.out or "bench/results/quant_gpu.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": gpu_results, "torch": torch.__version__}, indent=1))
        print_gpu_table(gpu_results)
        return

    from swarm_proto.store import resolve_model

    smol = resolve_model(None)
    with_llama = not args.no_llama
    if with_llama and not LLAMA_BENCH.exists():
        raise SystemExit(f"no llama-bench at {LLAMA_BENCH}: build it (see this file's docstring) or pass --no-llama")
    threads = [int(t) for t in args.threads.split(",")]
    results: list[dict[str, Any]] = []
    for name in args.models.split(","):
        path = smol if name == "smollm2" else write_1b(name.split("-")[1].upper(), smol)
        results += bench_model(name, path, threads, args.runs, with_llama, args.engines.split(","))
        print_table(results)
    out = Path(args.out or "bench/results/quant.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "torch": torch.__version__}, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
