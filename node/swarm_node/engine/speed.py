"""How fast this node runs a layer, and how much memory it may spend on weights.

The coordinator splits the model's layers in proportion to speed within memory budgets,
so every node measures itself before it joins:

- decode speed: layer-steps per second at batch 1 (one token through one layer, with a
  KV cache that already holds some context), which is what
  :attr:`swarm_proto.presence.NodeStatus.speed` carries;
- prefill speed: positions per second through one layer for a chunk of prompt.

The measurement runs real decoder blocks of the model's shape (random weights: speed
does not depend on the values) on the node's device, dtype and thread count, so it
sees what the node will see. It takes a fraction of a second for small models.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarm_node.engine import quant, quant_cuda
from swarm_node.engine.model import ModelSlice, SeqChunk, inv_freq
from swarm_proto.model_args import ModelArgs, layer_bytes
from swarm_proto.weight_format import gguf_types, kept_quantized

log = logging.getLogger(__name__)

__all__ = ["Speed", "default_memory_budget", "measure", "parse_bytes"]


@dataclass(frozen=True)
class Speed:
    decode: float  # layer-steps per second at batch 1
    prefill: float  # positions per second through one layer, chunked prompt

    @property
    def decode_ms_per_layer(self) -> float:
        return 1e3 / self.decode

    @property
    def prefill_ms_per_layer_token(self) -> float:
        return 1e3 / self.prefill


def _timed(
    run: Callable[[], object], device: torch.device, budget_s: float, least: int, most: int, block_s: float = 0.05
) -> list[float]:
    """Seconds per run, each sample the mean over a block of runs lasting at least
    ``block_s`` (after one warm-up run): at least ``least`` samples, more while within
    budget. Blocks, not single runs: a CPU quota (a container's, a cgroup's) lets a
    short run through at full speed and then stops the process for the rest of its
    period, so only runs that span periods see the sustained speed."""
    run()
    _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < least or (spent < budget_s and len(times) < most):
        t0 = time.perf_counter()
        n = 0
        while True:
            run()
            n += 1
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= block_s:
                break
        times.append(elapsed / n)
        spent += elapsed
    return times


def _fast_quartile(times: list[float]) -> float:
    return statistics.quantiles(times, n=4)[0] if len(times) >= 4 else min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def measure(
    args: ModelArgs,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    context: int = 64,
    prefill_chunk: int = 128,
    budget_s: float = 2.0,
    weights: str = "float",
    bits: int = 4,
    kernel_dtype: torch.dtype | None = None,
) -> Speed:
    """Time decoder blocks of ``args``' shape on ``device`` (random weights), held in
    weight format ``weights``; quantized formats run ``bits``-bit matrices (a GGUF
    file's dominant type decides: see `quantized_bits`)."""
    device = torch.device(device)
    n = 1 if layer_bytes(args, "float32") // 4 * dtype.itemsize > (256 << 20) else 2
    mid = min(1, args.num_layers - n)  # not the head nor (if possible) the tail: blocks only
    with torch.device("meta"):
        model = ModelSlice(args, mid, mid + n)
    model.embed_tokens = model.norm = model.lm_head = None
    model = model.to_empty(device=device).to(dtype)
    model.rotary.inv_freq = inv_freq(args).to(device)
    for p in model.parameters():
        p.normal_(0.0, 0.02)
    if weights != "float":
        for block in model.layers:
            for owner, name in ((block.attention, "wqkv"), (block.attention, "wo"), (block.feed_forward, "w13"),
                                (block.feed_forward, "w2")):
                w = getattr(owner, name).weight
                if kept_quantized(f"int{bits}", tuple(w.shape)) and device.type == "cuda":
                    setattr(owner, name, quant_cuda.linear_from_float(w, bits, device))
                elif kept_quantized(f"int{bits}", tuple(w.shape)):
                    kd = kernel_dtype or dtype
                    setattr(owner, name, quant.linear_from_float(w.float().cpu(), bits, kd, spread=quant.layer_spread(kd)))
    g = torch.Generator(device="cpu").manual_seed(0)
    cache = model.new_cache(context + prefill_chunk + 64)
    # The fastest quarter of many short runs: what the node does when it has the
    # hardware, so a machine shared with other work (or a burst of it) shows up as
    # outliers rather than as a slower node.
    # prefill: a chunk of prompt into an empty cache (the first run warms up)
    x = torch.randn(prefill_chunk, args.hidden_size, generator=g).to(device, dtype)
    prefill_times = _timed(lambda: model(x, [SeqChunk(cache, 0, prefill_chunk)]), device, budget_s / 2, 4, 30)
    prefill = prefill_chunk * n / _fast_quartile(prefill_times)
    # decode: one token at a time after `context` cached positions
    cache.truncate(context)
    one = torch.randn(1, args.hidden_size, generator=g).to(device, dtype)
    decode_times = _timed(lambda: model(one, [SeqChunk(cache, context, 1)]), device, budget_s / 2, 8, 100)
    decode = n / _fast_quartile(decode_times)
    speed = Speed(decode=decode, prefill=prefill)
    log.info(
        "measured on %s (%s, %s weights, %d threads): decode %.2f ms per layer per token, prefill %.3f ms per layer per token",
        device, str(dtype).removeprefix("torch."), weights, torch.get_num_threads(),
        speed.decode_ms_per_layer, speed.prefill_ms_per_layer_token,
    )
    return speed


def quantized_bits(weights: str, source: str | None) -> int:
    """The width of the kernel a format mostly runs: 4 for int4 and GGUF Q4_0/Q4_1/Q4_K,
    8 otherwise (int8, Q8_0, Q5_K: two 4-bit halves; Q6_K: int8 dequantized per call)."""
    if weights == "gguf" and source is not None:
        kinds = gguf_types(source)
        return 4 if kinds and kinds[0] in ("Q4_0", "Q4_1", "Q4_K") else 8
    return 8 if weights == "int8" else 4


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def default_memory_budget(device: torch.device | str, fraction: float = 0.8) -> int:
    """``fraction`` of the device's free memory (host memory for the CPU and MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return int(_available_host_memory() * fraction)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2.5GB"``, ``"1073741824"`` -> bytes (binary units)."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    if unit not in _UNITS or not num:
        raise ValueError(f"bad size {text!r}: use e.g. 512M, 2G, 1073741824")
    value = float(num) * _UNITS[unit]
    if value < 0:
        raise ValueError(f"bad size {text!r}: negative")
    return int(value)
