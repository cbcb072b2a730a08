"""Fixtures shared by the whole suite: the default model, tiny random models, the referee."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_tiny_model, reference_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The SmolLM2 GGUF in the user cache (`make test` pulls it first)."""
    from swarm_proto import store

    if not store.is_present(verify=False):
        store.pull()
    return store.default_model_path()


@pytest.fixture(scope="session")
def default_reference(default_model: Path) -> Any:
    """transformers running the default model: the referee (about 20 s to load)."""
    return reference_model(default_model)


@pytest.fixture(scope="session")
def default_tokenizer(default_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model.parent, gguf_file=default_model.name)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny random model flavour, saved once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model(root, kind) for kind in ("llama3", "qwen2", "tied", "linear")}
