"""A swarm across delayed links (docs/wan.md): the broker, the coordinator, four nodes
and the client each in a network namespace; every link 10 ms one way, except those of
``b2``, a replica of ``b``'s layers that sits 30 ms away from everyone.

Checks: the relay really delays (round trips of at least twice the one-way delay, a
lower bound that cannot flake); the nodes' reported round trips reach the
coordinator; routes take the near replica; greedy and seeded generations through the
swarm equal the whole model in one process (``--local``); a node killed in the middle
of a generation is routed around (to ``b2``) with the same tokens.

Needs root (network namespaces), as in CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.chaos import GREEDY, SEEDED, prompts
from helpers import make_tiny_model
from wan.swarm_bed import WanNode, WanSwarm

from swarm_client.local import LocalBackend
from swarm_proto.wire import SamplingParams

pytestmark = pytest.mark.slow

DELAY = 0.010
FAR = 0.030
NODES = [WanNode("a", "0:2"), WanNode("b", "2:4"), WanNode("b2", "2:4"), WanNode("c", "4:6")]
MAX_NEW = 20
CASES = [(p, params) for p, params in zip(prompts(4, seed=14), [GREEDY, SEEDED, GREEDY, SEEDED])]


def _params(p: SamplingParams) -> dict[str, object]:
    return {k: getattr(p, k) for k in ("temperature", "top_p", "top_k", "seed", "repetition_penalty")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("wan-model"), "llama3")


@pytest.fixture(scope="module")
def wan(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WanSwarm]:
    if os.geteuid() != 0:
        pytest.fail("the WAN bed needs root (network namespaces); CI runs the suite as root")
    parties = ["broker", "coordinator", "client", "a", "b", "c"]
    far = {(p, "b2"): FAR for p in parties} | {("b2", p): FAR for p in parties}
    swarm = WanSwarm(tiny, tmp_path_factory.mktemp("wan-bed"), NODES, delay=DELAY, delays=far,
                     node_args=["--dtype", "float32"])
    try:
        swarm.start()
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def local(tiny: Path) -> list[list[int]]:
    """Every case's tokens from the whole model in this process (``--local``)."""
    backend = LocalBackend.load(tiny, dtype="float32")
    refs = [[t.token_id for t in backend.tokens(prompt, params, MAX_NEW)] for prompt, params in CASES]
    assert any(len(set(r)) > 4 for r in refs)
    return refs


def test_every_link_is_delayed_and_measured(wan: WanSwarm) -> None:
    parties = wan.bed.parties
    got = wan.drive({"ping": [parties[n].address for n in ("a", "b", "b2", "c")]})["pings"]
    for name in ("a", "b", "c"):
        assert got[parties[name].address] >= 2 * DELAY
    assert got[parties["b2"].address] >= 2 * FAR
    # the nodes measured their links through the relay too, and reported them
    listed = wan.list_nodes()
    assert listed["a"].peer_rtt_s["b"] >= 2 * DELAY
    assert listed["a"].peer_rtt_s["b2"] >= 2 * FAR
    assert listed["b2"].peer_rtt_s["c"] >= 2 * FAR


def test_generations_equal_local_and_take_the_near_replica(wan: WanSwarm, local: list[list[int]]) -> None:
    job = {"generations": [{"prompt": p, "params": _params(params), "max_new": MAX_NEW} for p, params in CASES]}
    result = wan.drive(job)
    for i, gen in enumerate(result["generations"]):
        assert gen["tokens"] == local[i], f"case {i}"
        assert gen["routes"] == [["a", "b", "c"]], f"case {i}: {gen['routes']}"
        assert not gen["failovers"]


def test_a_node_killed_mid_generation_is_routed_around(wan: WanSwarm, local: list[list[int]]) -> None:
    prompt, params = CASES[1]
    job = {"generations": [{"prompt": prompt, "params": _params(params), "max_new": MAX_NEW,
                            "kill": {"role": "middle", "step": 8}}]}
    result = wan.drive(job)
    gen = result["generations"][0]
    assert result["killed"] == ["b"]
    assert gen["tokens"] == local[1]
    assert gen["routes"][0] == ["a", "b", "c"] and gen["routes"][-1] == ["a", "b2", "c"]
    assert [f["node_id"] for f in gen["failovers"]] == ["b"]


def test_a_crashed_run_leaves_nothing_behind() -> None:
    """What a killed run left (its pid is dead) is removed before the next bed starts."""
    import subprocess

    from wan.bed import clean_stale

    if os.geteuid() != 0:
        pytest.fail("the WAN bed needs root (network namespaces); CI runs the suite as root")
    dead = 2**22 + 12345  # above pid_max's default: no such process
    ns, link = f"lsw-{dead}-x", f"lswb{dead}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True)
    try:
        removed = clean_stale()
        assert ns in removed and link in removed
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
