"""Read a Hugging Face model folder: config.json plus safetensors (single or sharded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from swarm_node.errors import ModelFormatError


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> file name, from the sharded index or the single file's header."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ModelFormatError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    with _open(single) as f:
        return {name: single.name for name in f.keys()}


def _open(path: Path):  # type: ignore[no-untyped-def]
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"{path}: unreadable safetensors file ({exc})") from exc


def read_tensors(folder: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors (those absent from the files are simply not returned)."""
    where = _weight_map(folder)
    by_file: dict[str, list[str]] = {}
    for name in names:
        if name in where:
            by_file.setdefault(where[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, wanted in by_file.items():
        path = folder / file
        if not path.is_file():
            raise ModelFormatError(f"{folder}: shard {file} is missing")
        with _open(path) as f:
            for name in wanted:
                try:
                    out[name] = f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as exc:
                    raise ModelFormatError(f"{path}: cannot read tensor {name} ({exc})") from exc
    return out
