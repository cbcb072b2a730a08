"""The control plane at scale: 200 simulated nodes with churn against real coordinators.

One mosquitto broker, one ``swarm-coordinator`` process per model (an 80-layer 70B
shape and a 64-layer 32B shape), 200 simulated nodes (real MQTT presence each, see
``swarm_coordinator.sim``) that join, leave and crash as Poisson processes with a
30-minute mean lifetime, time compressed 60x, and 100 GetRoute calls/s over gRPC.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from swarm_coordinator.broker import MosquittoBroker, find_mosquitto
from swarm_coordinator.sim.harness import Harness, SimConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (make deps-system)"),
]

NODES = 200


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    config = SimConfig(nodes=NODES, seconds=25.0, speedup=60.0, mean_lifetime=1800.0, route_rate=100.0)

    async def run(url: str) -> dict[str, Any]:
        async with Harness(config, url) as harness:
            return await harness.run()

    with MosquittoBroker() as broker:
        return asyncio.run(run(broker.url))


def test_every_layer_stays_covered_through_churn(report: dict[str, Any]) -> None:
    churn = report["churn"]
    assert churn["leaves"] + churn["crashes"] >= 50, churn  # a lot happened: about half the nodes came and went
    assert churn["crashes"] >= 5, churn
    for model, covered in report["coverage"].items():
        assert report["samples"][model] >= 100
        assert covered >= 0.999, (model, covered, report["timeline"]["coverage"][model])


def test_routes_are_answered(report: dict[str, Any]) -> None:
    routes = report["routes"]
    assert routes["ok"] >= 1000, routes
    assert routes["failed"] <= routes["ok"] * 0.001, routes
    for model, stats in report["coordinator"].items():
        assert stats["routes"] > 0 and stats["plans"] > 0, (model, stats)


def test_memory_stays_bounded(report: dict[str, Any]) -> None:
    joins = report["churn"]["joins"]
    for model, stats in report["coordinator"].items():
        # nodes offline for longer than --forget-after (10 s here) are forgotten
        assert stats["nodes_known"] < joins * 0.9, (model, stats, joins)
    for pid, grew in report["coordinator_rss_growth_mb"].items():
        assert grew < 50, (pid, grew)


def test_churn_reloads_few_layers(report: dict[str, Any]) -> None:
    # incremental plans keep survivors where they are; the budget is 2 per node-hour
    assert report["reloads_per_node_hour"] <= 2.0, report
