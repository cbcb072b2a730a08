"""The GGUF index kept in the model cache gives what parsing the file gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm_node.engine import gguf_loader
from swarm_node.engine.loading import slice_tensor_names
from swarm_proto import gguf_index


def test_kept_index_matches_a_fresh_parse(default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    gguf_index._index.cache_clear()
    try:
        parsed = gguf_index.read_args(default_model)  # parses the file, keeps the index
        kept = list((tmp_path / "gguf-index").glob("*.json"))
        assert len(kept) == 1
        names = slice_tensor_names(parsed, 28, 30)
        from_parse = gguf_loader.read_tensors(default_model, parsed, names)

        gguf_index._index.cache_clear()
        assert gguf_index.read_args(default_model) == parsed  # now from the kept index
        from_index = gguf_loader.read_tensors(default_model, parsed, names)
        assert from_index.keys() == from_parse.keys() and len(from_index) == len(names)
        assert all(torch.equal(from_index[n], from_parse[n]) for n in names)

        kept[0].write_text("{not json")  # a damaged index is parsed again and rewritten
        gguf_index._index.cache_clear()
        assert gguf_index.read_args(default_model) == parsed
        assert kept[0].read_text().startswith("{")
        assert '"version"' in kept[0].read_text()
    finally:
        gguf_index._index.cache_clear()
