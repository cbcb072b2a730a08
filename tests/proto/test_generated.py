"""The committed stubs match what `python -m swarm_proto.build` would generate."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from swarm_proto import build  # noqa: E402


def test_committed_stubs_are_up_to_date() -> None:
    problems = build.check()
    assert not problems, "stale stubs; run `python -m swarm_proto.build`:\n" + "\n".join(problems)


def test_check_detects_a_stale_stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in build.GENERATED:
        (tmp_path / name).write_text((build.PACKAGE_DIR / name).read_text())
    with (tmp_path / "swarm_pb2.pyi").open("a") as f:
        f.write("# edited by hand\n")
    monkeypatch.setattr(build, "PACKAGE_DIR", tmp_path)
    problems = build.check()
    assert len(problems) == 1 and "edited by hand" in problems[0]
    assert build.main(["--check"]) == 1


def test_version_stamps_are_ignored_unless_strict() -> None:
    text = (build.PACKAGE_DIR / "swarm_pb2_grpc.py").read_text()
    bumped = text.replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9")
    assert bumped != text
    assert build.normalize(bumped) == build.normalize(text)


def test_grpc_module_imports_through_the_package() -> None:
    text = (build.PACKAGE_DIR / "swarm_pb2_grpc.py").read_text()
    assert "from swarm_proto import swarm_pb2" in text
    assert "\nimport swarm_pb2" not in text
