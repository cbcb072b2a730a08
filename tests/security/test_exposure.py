"""The exposure warning: a daemon bound beyond loopback with neither TLS nor a token.

The condition is one pure function (``swarm_proto.tls.exposed``) that both daemons use;
a node says it in its status, and the dashboard snapshot turns the coordinator's own
warning and every exposed online node into lines of its warning banner (the browser
side is in ``tests/e2e/test_dashboard.py``).
"""

from __future__ import annotations

import time

import pytest

from swarm_coordinator.config import CoordinatorConfig
from swarm_coordinator.http.dashboard import Activity, StaticView, snapshot
from swarm_coordinator.state import NodeView, SwarmState
from swarm_proto.certs import init_ca, issue
from swarm_proto.presence import LayerRange, NodeLoad, NodeState, NodeStatus, decode_status, encode
from swarm_proto.tls import TlsFiles, exposed, exposure_warning


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    certs = tmp_path_factory.mktemp("certs")
    init_ca(certs)
    got = issue(certs, "node")
    return TlsFiles(str(got.cert), str(got.key), str(got.ca))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_is_never_exposed(host: str) -> None:
    assert not exposed(host, token="", tls=None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.7", "192.168.1.20", "node1.lan", "fe80::1"])
def test_beyond_loopback_is_exposed_without_tls_and_token(host: str, tls: TlsFiles) -> None:
    assert exposed(host, token="", tls=None)
    assert not exposed(host, token="t", tls=None)  # the token keeps strangers out of every call
    assert not exposed(host, token="", tls=tls)  # mutual TLS: only holders of a swarm certificate connect
    assert not exposed(host, token="t", tls=tls)


def test_the_coordinator_config_uses_the_same_rule(tls: TlsFiles) -> None:
    assert CoordinatorConfig("m.gguf", host="10.0.0.7").exposed
    assert not CoordinatorConfig("m.gguf", host="10.0.0.7", tls=tls).exposed
    assert not CoordinatorConfig("m.gguf", host="127.0.0.2").exposed
    line = exposure_warning("swarm-coordinator", "10.0.0.7")
    assert "10.0.0.7" in line and "neither TLS nor a swarm token" in line and "SWARM_TOKEN" in line


def test_a_node_says_it_is_exposed_in_its_status() -> None:
    status = NodeStatus("n1", "10.0.0.7:7001", "m", LayerRange(0, 4), exposed=True)
    assert decode_status("n1", encode(status)).exposed
    assert not decode_status("n1", encode(NodeStatus("n1"))).exposed
    # an older node's status, without the field: not exposed as far as anyone can tell
    from swarm_proto.presence import _pack

    assert not decode_status("n1", _pack({"node_id": "n1", "state": "ready"})).exposed


def _view(node_id: str, *, exposed: bool, state: NodeState = NodeState.READY) -> NodeView:
    status = NodeStatus(node_id, f"10.0.0.{len(node_id)}:7001", "m", LayerRange(0, 8), "cpu", 10**9, 100.0, state,
                        exposed=exposed)
    return NodeView(status, NodeLoad(0, 0, 4096, 0.0), None, time.monotonic())


def test_the_dashboard_snapshot_lists_every_exposure() -> None:
    views = [
        _view("open", exposed=True),
        _view("safe", exposed=False),
        _view("gone", exposed=True, state=NodeState.OFFLINE),  # offline: no longer listening
    ]
    view = StaticView(SwarmState.of("m", 8, 1, views))
    own = exposure_warning("swarm-coordinator", "0.0.0.0")
    snap = snapshot(view, Activity(), model_id="m", auth_required=False, warnings=(own,))
    assert snap["warnings"][0] == own
    assert len(snap["warnings"]) == 2 and "node open (10.0.0.4:7001)" in snap["warnings"][1]
    by_id = {n["id"]: n for n in snap["nodes"]}
    assert by_id["open"]["exposed"] and not by_id["safe"]["exposed"]
    quiet = snapshot(StaticView(SwarmState.of("m", 8, 1, [views[1]])), Activity(), model_id="m", auth_required=False)
    assert quiet["warnings"] == []

