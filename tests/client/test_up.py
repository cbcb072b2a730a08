"""``swarm up``'s plan, without processes (tests/e2e/test_control_plane.py starts one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm_client.cli import main
from swarm_client.up import LocalSwarm, UpConfig, split_budget


@pytest.mark.parametrize(
    ("layers", "nodes", "replicas", "per_node"),
    [(30, 3, 1, 10), (30, 2, 1, 15), (30, 4, 1, 8), (30, 3, 2, 20), (30, 3, 3, 30), (2, 5, 1, 1)],
)
def test_split_budget_holds_each_layer_replicas_times_on_no_fewer_nodes(
    layers: int, nodes: int, replicas: int, per_node: int
) -> None:
    budget = split_budget(layers, 1000, nodes, replicas)
    assert budget == per_node * 1000
    room = budget // 1000
    assert room * nodes >= replicas * layers  # every copy of every layer has a place
    if layers * replicas >= nodes:
        assert room * (nodes - 1) < replicas * layers  # one node fewer could not hold them


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="--nodes"):
        UpConfig(nodes=0)
    with pytest.raises(ValueError, match="--replicas"):
        UpConfig(nodes=2, replicas=3)
    with pytest.raises(ValueError, match="dtype"):
        UpConfig(dtype="int3")


def test_default_budget_splits_the_default_model(default_model: Path) -> None:
    from swarm_proto.model_args import layer_bytes, read_args

    per_layer = layer_bytes(read_args(default_model), "float32")
    assert LocalSwarm(UpConfig(nodes=3, model=str(default_model))).node_budget() == 10 * per_layer
    assert LocalSwarm(UpConfig(nodes=4, replicas=2, model=str(default_model))).node_budget() == 15 * per_layer


def test_a_missing_model_fails_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.gguf"
    assert main(["up", "--nodes", "2", "--model", str(missing), "--log-dir", str(tmp_path / "logs")]) == 1
    out = capsys.readouterr()
    assert "missing.gguf" in out.err
    assert not list((tmp_path / "logs").glob("*.log"))  # no daemon was started
