"""A node reads only its slice's tensors: half the layers, about half the memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

PROBE = r"""
import json, sys, torch
from swarm_node.engine.loading import load_slice, model_bytes

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

torch.set_num_threads(1)
start, end = int(sys.argv[2]), int(sys.argv[3])
warm = load_slice(sys.argv[1], start, start + 1)  # warm up the lazy imports and kernels
del warm
before = rss()
model = load_slice(sys.argv[1], start, end)
print(json.dumps({"rss": rss() - before, "params": model_bytes(model)}))
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose layers dominate its size (8 layers of ~12 MB, small vocab)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama3")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 512, 1536, 8
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 4, 64
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("wide") / "model"
    model.save_pretrained(out)
    return out


def measure(path: Path, start: int, end: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(start), str(end)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_half_the_layers_use_about_half_the_memory(wide_model: Path) -> None:
    whole = measure(wide_model, 0, 8)
    half = measure(wide_model, 2, 6)
    assert 0.4 < half["params"] / whole["params"] < 0.55
    # What the process really holds, not only what the parameters claim.
    assert 0.35 < half["rss"] / whole["rss"] < 0.65, (half, whole)


def test_gguf_slice_reads_only_its_layers(default_model: Path) -> None:
    middle = measure(default_model, 10, 20)
    whole = measure(default_model, 0, 30)
    # SmolLM2: 30 layers of ~3.5 M parameters plus a 28 M tied embedding.
    assert 0.2 < middle["params"] / whole["params"] < 0.3
    assert middle["rss"] < 0.45 * whole["rss"], (middle, whole)
