"""The import graph of the four packages, read with ``ast``, keeps the layers.

    swarm_proto  <-  swarm_node  <-  swarm_client  <-  swarm_coordinator
                     (engine <- daemon)

- ``swarm_node.engine.*`` imports nothing of ``swarm_node`` but the engine and
  ``swarm_node.errors``;
- ``swarm_proto`` imports none of the other three; ``swarm_node`` neither the client
  nor the coordinator; the coordinator nothing of ``swarm_node``;
- the client imports ``swarm_node`` only inside functions (``--local``) or for type
  checking, and never ``swarm_coordinator``;
- the client and the coordinator import torch (and safetensors) only inside functions,
  and nothing they import when loaded imports it when loaded either: ``pip install
  llama-swarm`` has no torch (``tests/e2e/test_control_plane.py`` runs them so).

An import is *eager* when it runs as its module loads (module or class level, ``try``
blocks included), *typing* under ``if TYPE_CHECKING:``, *lazy* inside a function.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "swarm_proto": ROOT / "proto" / "swarm_proto",
    "swarm_node": ROOT / "node" / "swarm_node",
    "swarm_client": ROOT / "client" / "swarm_client",
    "swarm_coordinator": ROOT / "coordinator" / "swarm_coordinator",
}
ENGINE_ONLY = ("torch", "safetensors")  # third-party packages of the [node] extra


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports, absolute: a module, or a package's member
    kind: str  # "eager", "typing" or "lazy"
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target} ({self.kind})"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the importing module's package
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import statement in ``source`` (the code of ``module``) with its kind."""
    found: list[Import] = []

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend(Import(module, t, kind, node.lineno) for t in _targets(node, module, is_package))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = "lazy"
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "typing" if kind == "eager" else kind)
            for child in node.orelse:
                visit(child, kind)
            return
        else:
            inner = kind
        for sub in ast.iter_child_nodes(node):
            visit(sub, inner)

    visit(ast.parse(source), "eager")
    return found


def scan(packages: dict[str, Path]) -> dict[str, list[Import]]:
    """Module name -> its imports, for every ``.py`` file of the packages."""
    graph: dict[str, list[Import]] = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            is_package = rel[-1] == "__init__"
            module = ".".join([name, *(rel[:-1] if is_package else rel)])
            graph[module] = imports_of(path.read_text(encoding="utf-8"), module, is_package)
    return graph


def _under(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def _resolve(target: str, graph: dict[str, list[Import]]) -> str | None:
    """The module of ours that ``target`` names (``pkg.mod.Name`` -> ``pkg.mod``)."""
    while target:
        if target in graph:
            return target
        target = target.rpartition(".")[0]
    return None


def _eager_closure(start: str, graph: dict[str, list[Import]]) -> Iterator[tuple[list[str], Import]]:
    """Every eager import reached while ``start`` loads (parent packages included),
    with the chain of modules that leads to it."""
    seen: set[str] = set()
    stack: list[list[str]] = [[start]]
    while stack:
        chain = stack.pop()
        module = chain[-1]
        if module in seen:
            continue
        seen.add(module)
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        stack.extend([*chain, p] for p in parents if p in graph)
        for imp in graph[module]:
            if imp.kind != "eager":
                continue
            yield chain, imp
            ours = _resolve(imp.target, graph)
            if ours is not None:
                stack.append([*chain, ours])
                if imp.target in graph and imp.target != ours:
                    stack.append([*chain, imp.target])


def violations(graph: dict[str, list[Import]]) -> list[str]:
    """Every import that breaks the layering rules of this module's docstring."""
    bad: list[str] = []
    for module, imports in graph.items():
        for imp in imports:
            t = imp.target
            if _under(module, "swarm_node.engine"):
                if _under(t, "swarm_node") and not (
                    t == "swarm_node" or _under(t, "swarm_node.engine") or _under(t, "swarm_node.errors")
                ):
                    bad.append(f"engine imports the daemon: {imp}")
            if _under(module, "swarm_proto") and any(
                _under(t, p) for p in ("swarm_node", "swarm_client", "swarm_coordinator")
            ):
                bad.append(f"proto imports a package above it: {imp}")
            if _under(module, "swarm_node") and any(_under(t, p) for p in ("swarm_client", "swarm_coordinator")):
                bad.append(f"node imports a package above it: {imp}")
            if _under(module, "swarm_client"):
                if _under(t, "swarm_coordinator"):
                    bad.append(f"client imports the coordinator: {imp}")
                if _under(t, "swarm_node") and imp.kind == "eager":
                    bad.append(f"client imports the node eagerly (only lazily, for --local): {imp}")
            if _under(module, "swarm_coordinator") and _under(t, "swarm_node"):
                bad.append(f"coordinator imports the node: {imp}")
    for module in graph:
        if not (_under(module, "swarm_client") or _under(module, "swarm_coordinator")):
            continue
        for chain, imp in _eager_closure(module, graph):
            if any(_under(imp.target, p) for p in ENGINE_ONLY):
                via = " -> ".join(chain)
                bad.append(f"loading {module} imports {imp.target} (via {via}): {imp}")
    return sorted(set(bad))


def test_the_tree_keeps_the_layers() -> None:
    graph = scan(PACKAGES)
    assert len(graph) > 60 and "swarm_node.engine.model" in graph and "swarm_client.cli" in graph
    assert violations(graph) == []


def test_the_scan_sees_real_imports() -> None:
    """The rules are not vacuous: the imports they allow are there, and seen as such."""
    graph = scan(PACKAGES)
    local = {(i.target, i.kind) for i in graph["swarm_client.local"]}
    assert ("torch", "lazy") in local and ("swarm_node.engine.loading.load_slice", "lazy") in local
    assert ("swarm_node.engine.model.ModelSlice", "typing") in local
    assert any(i.target == "torch" and i.kind == "eager" for i in graph["swarm_node.engine.model"])


def test_the_base_install_has_no_torch() -> None:
    """``pip install llama-swarm`` brings what the client and the coordinator import;
    the ``node`` extra adds the engine's packages."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requirements}

    base, node = names(project["dependencies"]), names(project["optional-dependencies"]["node"])
    assert not base & set(ENGINE_ONLY) and set(ENGINE_ONLY) <= node
    assert {"grpcio", "protobuf", "transformers", "tokenizers", "gguf", "aiomqtt", "amqtt", "starlette"} <= base


# -- the checker on synthetic trees --------------------------------------------------------

CLEAN = {
    "swarm_proto/__init__.py": "",
    "swarm_proto/wire.py": "import grpc\nfrom . import errors\n",
    "swarm_proto/errors.py": "",
    "swarm_proto/codec.py": "import torch\n",
    "swarm_node/__init__.py": "",
    "swarm_node/errors.py": "",
    "swarm_node/rpc.py": "import torch\nfrom swarm_node.engine import model\nfrom swarm_proto import codec\n",
    "swarm_node/engine/__init__.py": "",
    "swarm_node/engine/model.py": "import torch\nfrom swarm_node.errors import SwarmNodeError\nfrom ..errors import X\n",
    "swarm_client/__init__.py": "from swarm_client.api import Client\n",
    "swarm_client/api.py": (
        "from typing import TYPE_CHECKING\nfrom swarm_proto.wire import Hop\n"
        "if TYPE_CHECKING:\n    import torch\n    from swarm_node.engine.model import Slice\n"
        "def local():\n    import torch\n    from swarm_node.engine import model\n"
    ),
    "swarm_coordinator/__init__.py": "",
    "swarm_coordinator/server.py": "from swarm_client import api\nfrom swarm_proto import wire\n",
}

BROKEN = {
    "swarm_node/engine/model.py": ("from swarm_node.rpc import NodeService\n", "engine imports the daemon"),
    "swarm_node/engine/__init__.py": ("from .. import rpc\n", "engine imports the daemon"),
    "swarm_proto/wire.py": ("def f():\n    from swarm_client import api\n", "proto imports a package above it"),
    "swarm_node/rpc.py": ("from swarm_coordinator import server\n", "node imports a package above it"),
    "swarm_client/api.py": ("import swarm_node.engine.model\n", "client imports the node eagerly"),
    "swarm_client/__init__.py": ("def up():\n    from swarm_coordinator import server\n", "client imports the coordinator"),
    "swarm_coordinator/server.py": ("if TYPE_CHECKING:\n    from swarm_node import rpc\n", "coordinator imports the node"),
    "swarm_coordinator/__init__.py": ("try:\n    import torch\nexcept ImportError:\n    pass\n", "imports torch"),
}


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {name: root / name for name in ("swarm_proto", "swarm_node", "swarm_client", "swarm_coordinator")}


def test_a_clean_synthetic_tree_passes(tmp_path: Path) -> None:
    assert violations(scan(_write(tmp_path, CLEAN))) == []


@pytest.mark.parametrize("path", sorted(BROKEN))
def test_each_violation_is_caught(path: str, tmp_path: Path) -> None:
    addition, message = BROKEN[path]
    files = dict(CLEAN)
    files[path] = files[path] + addition
    found = violations(scan(_write(tmp_path, files)))
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert any(message in v and module in v for v in found), found


def test_torch_reached_through_an_eager_chain_is_caught(tmp_path: Path) -> None:
    """The client loads a proto module that loads torch: no torch-free install."""
    files = dict(CLEAN)
    files["swarm_proto/wire.py"] += "from swarm_proto.codec import encode\n"
    found = violations(scan(_write(tmp_path, files)))
    assert found and all("imports torch" in v and "swarm_proto.codec" in v for v in found), found
    assert any(v.startswith("loading swarm_client.api ") for v in found)
    assert any(v.startswith("loading swarm_coordinator.server ") for v in found)
