"""Spreading simulated nodes over processes (swarm_coordinator.sim.shard): the node
shares, the per-process count of served layers, the harness's merge of the processes'
masks, and a simulated node reporting each change of what it serves. No broker, no
processes."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from swarm_coordinator.sim.fleet import PROFILES, SimNode
from swarm_coordinator.sim.harness import MODELS, Harness, SimConfig
from swarm_coordinator.sim.shard import ServedLayers, full_mask, shares, span_mask
from swarm_proto.presence import Assign, LayerRange
from swarm_proto.presence_client import BrokerAddress


def test_shares_split_evenly_and_add_up() -> None:
    assert shares(10, 3) == [4, 3, 3]
    assert shares(3000, 3) == [1000, 1000, 1000]
    assert shares(2, 4) == [1, 1, 0, 0]
    assert shares(7, 1) == [7]
    for total in range(50):
        for procs in range(1, 8):
            parts = shares(total, procs)
            assert sum(parts) == total and max(parts) - min(parts) <= 1
    with pytest.raises(ValueError):
        shares(10, 0)


def test_span_mask_clips_to_the_model() -> None:
    assert span_mask(LayerRange(0, 3), 8) == 0b111
    assert span_mask(LayerRange(2, 4), 8) == 0b1100
    assert span_mask(LayerRange(6, 12), 8) == 0b11000000
    assert full_mask(80).bit_count() == 80


def test_served_layers_match_a_recount_through_random_changes() -> None:
    rng = random.Random(7)
    layers = 24
    served = ServedLayers(layers)
    truth: dict[str, LayerRange] = {}
    for _ in range(2000):
        node = f"n{rng.randrange(30)}"
        if rng.random() < 0.3:
            span = None
        else:
            start = rng.randrange(layers)
            span = LayerRange(start, rng.randrange(start + 1, layers + 3))  # may run past the model
        before = served.mask
        changed = served.set(node, span)
        if span is None:
            truth.pop(node, None)
        else:
            truth[node] = span
        expected = 0
        for s in truth.values():
            expected |= span_mask(s, layers)
        assert served.mask == expected
        assert changed == (before != expected)
        assert len(served) == len(truth)
        assert all(c >= 0 for c in served.counts)
    for node in list(truth):
        served.set(node, None)
    assert served.mask == 0 and served.counts == [0] * layers and len(served) == 0


def test_harness_coverage_ors_its_own_and_the_workers_masks() -> None:
    config = SimConfig(nodes=0, procs=2)
    harness = Harness(config, "mqtt://127.0.0.1:1")
    try:
        run = harness.runs[0]
        layers = run.model.num_layers
        harness.workers = [SimpleNamespace(index=0), SimpleNamespace(index=1)]  # type: ignore[list-item]
        assert harness._coverage(run) == 0.0
        harness.remote[(0, run.model.name)] = span_mask(LayerRange(0, layers // 2), layers)
        assert harness._coverage(run) == 0.5
        harness.remote[(1, run.model.name)] = span_mask(LayerRange(layers // 2 - 1, layers), layers)
        assert harness._coverage(run) == 1.0
        harness.remote[(1, harness.runs[1].model.name)] = full_mask(harness.runs[1].model.num_layers)
        harness.remote[(0, run.model.name)] = 0  # worker 0's nodes stopped serving
        assert harness._coverage(run) == pytest.approx((layers - layers // 2 + 1) / layers)
    finally:
        harness._tmp.cleanup()  # type: ignore[union-attr]


def test_a_worker_harness_reports_each_mask_change() -> None:
    sent: list[dict[str, object]] = []
    harness = Harness(SimConfig(nodes=0), "mqtt://127.0.0.1:1", worker=2, emit=sent.append)
    try:
        run = harness.runs[0]
        node = SimpleNamespace(node_id="sim2x00001")
        harness._on_serving(run, node, LayerRange(0, 4))  # type: ignore[arg-type]
        harness._on_serving(run, node, LayerRange(0, 4))  # type: ignore[arg-type]  (no change: nothing sent)
        harness._on_serving(run, node, None)  # type: ignore[arg-type]
        assert sent == [{"mask": [run.model.name, 0b1111]}, {"mask": [run.model.name, 0]}]
        assert harness._prefix == "sim2x"
    finally:
        harness._tmp.cleanup()  # type: ignore[union-attr]


def test_sim_node_reports_when_it_stops_and_starts_serving() -> None:
    seen: list[LayerRange | None] = []
    model = MODELS[0]
    node = SimNode(BrokerAddress.parse("mqtt://127.0.0.1:1"), model.name, model.name, "sim00001", PROFILES[0],
                   model.layer_bytes, random.Random(1), load_s_per_layer=0.0,
                   on_serving=lambda n, span: seen.append(span))
    # not connected: the status publishes are dropped, the state changes all the same
    asyncio.run(node._host(Assign("sim00001", model.name, LayerRange(3, 9), 1)))
    assert seen == [None, LayerRange(3, 9)] and node.serving == LayerRange(3, 9)
    asyncio.run(node._host(Assign("sim00001", model.name, None, 2)))
    assert seen[-1] is None and node.serving is None
