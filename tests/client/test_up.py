"""``swarm up``'s plan, without processes (tests/e2e/test_control_plane.py starts one)."""

from __future__ import annotations

import pytest

from swarm_client.up import UpConfig, split_budget


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
