"""docker/: no Docker engine runs here, so the files are checked for what they claim:
every command the compose file runs parses with the real command-line parsers, points
at services that exist, and the image installs the packages and scripts the project
declares."""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def parse(command: list[str]) -> Any:
    from swarm_client.cli import build_parser as swarm_parser
    from swarm_coordinator.cli import build_parser as coordinator_parser
    from swarm_node.cli import build_parser as node_parser

    parsers = {"swarm": swarm_parser, "swarm-node": node_parser, "swarm-coordinator": coordinator_parser}
    return parsers[command[0]]().parse_args(command[1:])


def test_compose_commands_parse_and_point_at_services() -> None:
    services = compose()["services"]
    assert {"mosquitto", "coordinator", "node1", "node2", "node3"} <= set(services)
    coordinator = parse(services["coordinator"]["command"])
    assert coordinator.mqtt.startswith("mqtt://mosquitto:") and coordinator.host == "0.0.0.0"
    nodes = [name for name in services if name.startswith("node")]
    assert len(nodes) == 3
    for name in nodes:
        ns = parse(services[name]["command"])
        assert ns.coordinator == f"coordinator:{coordinator.port}"
        assert ns.advertise == f"{name}:{ns.port}" and ns.node_id == name and not ns.layers
        assert "models:/models" in services[name]["volumes"]
    assert parse(services["model"]["command"]).command == "model"
    auth = parse(services["mqtt-auth"]["command"])
    assert auth.write_mqtt_auth and auth.mqtt_nodes.split(",") == nodes and auth.swarm_id == coordinator.swarm_id
    assert "SWARM_TOKEN" in services["coordinator"]["environment"] and "SWARM_MQTT_PASSWORD" in services["coordinator"]["environment"]
    assert "models:/models" in services["coordinator"]["volumes"]


def test_dockerfile_installs_the_declared_packages_and_scripts() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        top = package.split("/")[0]
        assert re.search(rf"^COPY {top} \./{top}$", text, re.M), f"{top} is not copied into the image"
    assert re.search(r"^ARG BASE=python:", text, re.M)  # CPU by default, CUDA base as a build argument
    scripts = set(project["project"]["scripts"])
    used = {c["command"][0] for c in compose()["services"].values() if "command" in c}
    assert used <= scripts
    cmd = re.search(r'^CMD \["([^"]+)"', text, re.M)
    assert cmd is not None and cmd.group(1) in scripts
    conf = (DOCKER / "mosquitto.conf").read_text()
    assert "listener 1883" in conf and "persistence false" in conf
    assert "allow_anonymous false" in conf and "acl_file" in conf and "password_file" in conf
