"""Regenerate the Python stubs for ``swarm.proto`` (``python -m swarm_proto.build``).

The stubs are committed so that installing the package needs no protoc. Run with
``--check`` to regenerate into a temporary folder and fail if the committed files
differ (CI does this through ``tests/proto/test_generated.py``).

Generation runs with ``-I <proto/>`` and the file at ``swarm_proto/swarm.proto`` so
the generated gRPC module imports ``from swarm_proto import swarm_pb2``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent
PROTO_FILE = "swarm_proto/swarm.proto"
GENERATED = ("swarm_pb2.py", "swarm_pb2.pyi", "swarm_pb2_grpc.py")

# Lines that only record which protoc / grpcio-tools produced the file. A newer tool
# stamps them differently without changing the protocol, so --check ignores them
# unless asked to be strict.
_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)$", re.M | re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on swarm.proto, writing the three stub files into ``out_dir``."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{_well_known_include()}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            src = Path(tmp) / "swarm_proto" / name
            dst = out_dir / name
            dst.write_bytes(src.read_bytes())
            written.append(dst)
    return written


def _well_known_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).resolve().parent / "_proto")


def normalize(text: str) -> str:
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version stamp>", text)
    return text


def check(*, strict: bool = False) -> list[str]:
    """Return a unified diff per committed stub that regeneration would change."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in GENERATED:
            fresh = (Path(tmp) / name).read_text()
            committed_path = PACKAGE_DIR / name
            committed = committed_path.read_text() if committed_path.exists() else ""
            if not strict:
                fresh, committed = normalize(fresh), normalize(committed)
            if fresh != committed:
                diff = difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    fromfile=f"committed/{name}",
                    tofile=f"regenerated/{name}",
                )
                problems.append("".join(diff))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm_proto.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    parser.add_argument("--strict", action="store_true", help="with --check, also compare tool version stamps")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(strict=args.strict)
        for diff in problems:
            sys.stdout.write(diff)
        if problems:
            sys.stderr.write("generated stubs are stale: run `python -m swarm_proto.build`\n")
            return 1
        return 0
    for path in generate(PACKAGE_DIR):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
