"""Bad models and bad calls get clear errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from swarm_node.engine.loading import load_slice
from swarm_node.engine.model import SeqChunk
from swarm_node.errors import CacheOverflowError, ModelFormatError, PositionError, SliceRangeError
from swarm_proto.model_args import read_args


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = copy_model(tiny_models["tied"], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="unknown architecture 'gpt_neox'"):
        read_args(path)


def test_missing_tensor(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = copy_model(tiny_models["tied"], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    load_slice(path, 0, 3)  # layers that do not need it still load
    with pytest.raises(ModelFormatError, match=r"missing tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        load_slice(path, 2, 6)


def test_truncated_safetensors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = copy_model(tiny_models["tied"], tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        load_slice(path, 0, 6)


def test_truncated_gguf(default_model: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with default_model.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(default_model.stat().st_size // 2))
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        load_slice(cut, 0, 30)


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_slice(tmp_path, 0, 1)


@pytest.mark.parametrize("start,end", [(-1, 3), (0, 7), (4, 4), (5, 2)])
def test_slice_out_of_range(start: int, end: int, tiny_models: dict[str, Path]) -> None:
    with pytest.raises(SliceRangeError, match=r"not inside the model's 6 layers"):
        load_slice(tiny_models["tied"], start, end)


def test_prompt_longer_than_cache(tiny_models: dict[str, Path]) -> None:
    model = load_slice(tiny_models["tied"], 0, 6)
    cache = model.new_cache(16)
    with pytest.raises(CacheOverflowError, match="exceed the cache's max length 16"):
        model(torch.arange(3, 23), [SeqChunk(cache, 0, 20)])
    assert cache.length == 0  # nothing was written


def test_gap_in_positions(tiny_models: dict[str, Path]) -> None:
    model = load_slice(tiny_models["tied"], 0, 6)
    cache = model.new_cache(32)
    model(torch.arange(3, 8), [SeqChunk(cache, 0, 5)])
    with pytest.raises(PositionError, match="starts at position 9 but the cache holds only 5"):
        model(torch.tensor([4]), [SeqChunk(cache, 9, 1)])


def test_input_count_must_match_chunks(tiny_models: dict[str, Path]) -> None:
    model = load_slice(tiny_models["tied"], 0, 6)
    with pytest.raises(ValueError, match="3 inputs for chunks totalling 4"):
        model(torch.arange(3, 6), [SeqChunk(model.new_cache(8), 0, 4)])
