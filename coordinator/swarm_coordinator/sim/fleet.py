"""Simulated nodes for the control plane: real MQTT presence, no model compute.

A :class:`SimNode` is a node as the coordinator sees it: a :class:`PresenceClient` of
its own (the very class ``swarm-node`` uses: retained status with an offline Last
Will, load every ``load_interval`` seconds, assignments from ``assign/<id>``), a
speed, a memory budget and a link delay drawn from :data:`PROFILES` (consumer GPUs,
Macs, CPUs), and a reliability that decides whether it leaves gracefully or crashes.
When an assignment arrives it "loads" for ``layers * load_s_per_layer`` seconds
(status LOADING), then reports READY with the assigned range, as a real node does.

Why one MQTT connection per simulated node (and not one multiplexed connection): the
Last Will is per connection, and a crash must look to the broker exactly like a real
node dying; a thousand aiomqtt clients share one asyncio loop well enough (each is a
socket plus a few tasks). A crash closes the socket without an MQTT DISCONNECT, so the
broker publishes the Will; a graceful leave publishes ``offline`` and disconnects.

Invariants: nothing here computes; all randomness comes from the ``random.Random``
passed in (runs are repeatable up to timing); times are real seconds, already
compressed by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from swarm_proto.presence import Assign, LayerRange, NodeLoad, NodeState, NodeStatus
from swarm_proto.presence_client import Backoff, BrokerAddress, PresenceClient
from swarm_proto.trust import Identity, Sealer, membership_proof

log = logging.getLogger(__name__)

__all__ = ["PROFILES", "HardwareProfile", "SimNode", "draw_profile"]

GB = 1 << 30


@dataclass(frozen=True)
class HardwareProfile:
    """One kind of volunteer machine, for a 70B-class model at 8 bits (~0.85 GB/layer).

    ``speed`` is layer-steps per second (one token through one layer, memory-bandwidth
    bound: bandwidth / layer bytes); ``crash_share`` is the share of its exits that are
    crashes rather than graceful leaves.
    """

    name: str
    weight: float  # share of the swarm
    memory_gb: float  # what it offers for weights
    bandwidth_gbs: float  # memory bandwidth, which sets decode speed
    link_ms: tuple[float, float]  # one-way link delay range to its peers
    crash_share: float

    def speed(self, layer_bytes: int) -> float:
        return self.bandwidth_gbs * GB / layer_bytes


PROFILES: tuple[HardwareProfile, ...] = (
    HardwareProfile("rtx4090", 0.14, 22.0, 1000.0, (5.0, 40.0), 0.2),
    HardwareProfile("rtx3090", 0.14, 22.0, 930.0, (5.0, 40.0), 0.2),
    HardwareProfile("rtx4070", 0.12, 11.0, 500.0, (5.0, 60.0), 0.25),
    HardwareProfile("rtx3060", 0.14, 11.0, 360.0, (5.0, 60.0), 0.3),
    HardwareProfile("mac-m2max-64", 0.10, 48.0, 400.0, (10.0, 60.0), 0.1),
    HardwareProfile("mac-m3pro-36", 0.10, 26.0, 150.0, (10.0, 60.0), 0.1),
    HardwareProfile("mac-m1-16", 0.08, 10.0, 68.0, (10.0, 80.0), 0.15),
    HardwareProfile("cpu-ddr5-64", 0.10, 56.0, 60.0, (5.0, 80.0), 0.4),
    HardwareProfile("cpu-ddr4-32", 0.08, 28.0, 35.0, (5.0, 80.0), 0.4),
)


def draw_profile(rng: random.Random) -> HardwareProfile:
    return rng.choices(PROFILES, weights=[p.weight for p in PROFILES])[0]


class SimNode:
    """One simulated node of ``swarm_id``: ``await join()``, then ``leave()`` or ``crash()``."""

    def __init__(
        self,
        broker: BrokerAddress,
        swarm_id: str,
        model: str,
        node_id: str,
        profile: HardwareProfile,
        layer_bytes: int,
        rng: random.Random,
        *,
        load_s_per_layer: float = 0.01,
        load_interval: float = 2.0,
        keepalive: int = 10,
        token: str = "",
        on_serving: Callable[[SimNode, LayerRange | None], None] | None = None,
    ) -> None:
        """``token``: the swarm token; the node's fresh key carries its proof of membership
        (swarm_proto.trust), so a coordinator with a token admits it like a real node.
        ``on_serving(node, span)`` is called as the node starts or stops serving (the
        moment its status changes, as :attr:`serving` does), so a caller can keep count
        without polling every node."""
        self.on_serving = on_serving
        self.profile = profile
        self.layer_bytes = layer_bytes
        self.load_s_per_layer = load_s_per_layer
        self.link_ms = rng.uniform(*profile.link_ms)
        status = NodeStatus(
            node_id=node_id,
            model=model,
            address=f"sim.invalid:{rng.randrange(1024, 65535)}",  # never dialled: routes are only counted
            device=profile.name,
            memory_budget=int(profile.memory_gb * GB),
            speed=profile.speed(layer_bytes),
            state=NodeState.STARTING,
            layer_bytes=layer_bytes,
            weight_format="int8",
        )
        identity = Identity.generate()
        self.presence = PresenceClient(
            broker,
            swarm_id,
            status,
            load=self._load,
            on_assign=self._on_assign,
            load_interval=load_interval,
            keepalive=keepalive,
            backoff=Backoff(0.2, 5.0),
            sealer=Sealer(identity, membership_proof(token, swarm_id, identity.public)),
        )
        self._loading: asyncio.Task[None] | None = None
        self.loads = 0  # assignments acted on (first load included)

    @property
    def node_id(self) -> str:
        return self.presence.status.node_id

    @property
    def serving(self) -> LayerRange | None:
        status = self.presence.status
        return status.hosted if status.state is NodeState.READY else None

    def _load(self) -> NodeLoad:
        return NodeLoad(free_kv_tokens=32768, kv_tokens=32768, free_sessions=16)

    async def join(self, timeout: float = 30.0) -> None:
        await self.presence.start(wait=timeout)

    def _on_assign(self, assign: Assign) -> None:
        if self._loading is not None:
            self._loading.cancel()
        self._loading = asyncio.get_running_loop().create_task(self._host(assign))

    async def _host(self, assign: Assign) -> None:
        """Load what was assigned (LOADING for a while), then serve it (READY)."""
        status = self.presence.status
        if assign.layers is None:
            self._serving(None)
            await self.presence.set_status(replace(status, hosted=None, state=NodeState.STARTING))
            return
        self.loads += 1
        self._serving(None)
        await self.presence.set_status(replace(status, model=assign.model, state=NodeState.LOADING))
        await asyncio.sleep(len(assign.layers) * self.load_s_per_layer)
        status = self.presence.status
        self._serving(assign.layers)
        await self.presence.set_status(replace(status, hosted=assign.layers, state=NodeState.READY))

    def _serving(self, span: LayerRange | None) -> None:
        if self.on_serving is not None:
            self.on_serving(self, span)

    async def leave(self, timeout: float = 10.0) -> None:
        """Graceful: offline status, clean disconnect (no Will)."""
        self._stop_loading()
        try:
            await asyncio.wait_for(self.presence.stop(), timeout)
        except asyncio.TimeoutError:  # aiomqtt can wait forever for the broker's goodbye
            log.warning("simulated node %s: no clean disconnect within %g s", self.node_id, timeout)

    async def crash(self) -> None:
        """Abrupt: the socket closes without DISCONNECT, so the broker sends the Will."""
        self._stop_loading()
        await self.presence.abort()

    def _stop_loading(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            self._loading = None

