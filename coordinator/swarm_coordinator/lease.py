"""Which of several coordinators plans: a retained lease on the broker, held by a live connection.

Two (or more) coordinators run against the same external broker. All of them keep a
registry (rebuilt from retained messages) and answer routes; only the lease holder's
planner publishes assignments. There is no election written here: the broker decides.

- The lease is the retained message on ``swarm/<id>/coordinator/lease``
  (:class:`swarm_proto.presence.Lease`). The holder publishes it over a connection of
  its own whose Last Will deletes it, so when the holder dies (SIGKILL, a lost machine
  after 1.5 keepalives) the broker empties the topic by itself.
- A coordinator that sees the topic empty claims it: it opens its holder connection and
  publishes ``epoch + 1``. The broker orders messages on one topic the same way for every
  subscriber, so after ``confirm_s`` each claimant knows whether the last word was its
  own; the others close their holder connection cleanly (no Will) and stand by.
- A holder that sees its lease replaced by one of a lower epoch (a stale holder coming
  back), or deleted (a standby's stale Will), says it again; one of a higher or equal
  epoch from someone else means it lost, and it stands by.

Invariant: a coordinator plans only while the last lease it saw is its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiomqtt

from swarm_coordinator.registry import Registry
from swarm_proto.presence import Lease, PresenceError, Topics, encode
from swarm_proto.presence_client import Backoff, BrokerAddress, ReconnectingClient

log = logging.getLogger(__name__)

__all__ = ["LeaseHolder", "LeaseKeeper"]


class LeaseHolder(ReconnectingClient):
    """The connection that holds the lease: publishes it on connect, Will deletes it."""

    def __init__(self, broker: BrokerAddress, topics: Topics, lease: Lease, *, keepalive: int) -> None:
        super().__init__(broker, f"lease-{topics.swarm_id}-{lease.holder}", keepalive=keepalive, backoff=Backoff(0.1, 1.0))
        self.topics = topics
        self.lease = lease

    def will(self) -> aiomqtt.Will:
        return aiomqtt.Will(self.topics.lease, b"", qos=1, retain=True)

    async def on_connect(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topics.lease, encode(self.lease), qos=1, retain=True)

    async def assert_lease(self) -> bool:
        return await self.publish(self.topics.lease, encode(self.lease), retain=True)

    async def release(self) -> None:
        """Delete the lease (a clean stop) and disconnect."""
        await self.publish(self.topics.lease, b"", retain=True)
        await self.stop()


class LeaseKeeper:
    """Watches the lease through the registry and claims it when it is free.

    ``on_change(True)`` when this coordinator starts planning, ``on_change(False)`` when it
    stops. ``holder_id`` must be unique among the coordinators of the swarm.
    """

    def __init__(
        self,
        registry: Registry,
        holder_id: str,
        address: str,
        on_change: Callable[[bool], None],
        *,
        confirm_s: float = 0.5,
        keepalive: int = 5,
    ) -> None:
        self.registry = registry
        self.holder_id = holder_id
        self.address = address
        self.on_change = on_change
        self.confirm_s = confirm_s
        self.keepalive = keepalive
        self.holding = False
        self.takeovers = 0  # leases won (tests, metrics)
        self._max_epoch = 0  # the highest epoch seen: a claim goes above it
        self._holder: LeaseHolder | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="swarm-lease")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        holder, self._holder = self._holder, None
        if holder is not None:
            if self.holding:
                await holder.release()
            else:
                await holder.stop()
        self._set(False)

    def _set(self, holding: bool) -> None:
        if holding != self.holding:
            self.holding = holding
            log.warning(
                "coordinator %s %s", self.holder_id, "holds the lease: planning" if holding else "stands by (no lease)"
            )
            self.on_change(holding)

    async def _run(self) -> None:
        # The retained lease (if any) arrives right after the registry subscribes.
        await self.registry.wait_connected(30.0)
        await asyncio.sleep(self.confirm_s)
        while True:
            seen = self.registry.lease_seen
            lease = self.registry.lease
            if lease is not None:
                self._max_epoch = max(self._max_epoch, lease.epoch)
            try:
                await self._step(lease)
            except PresenceError as exc:  # the broker is away: the registry reconnects, we retry
                log.warning("coordinator %s could not claim the lease: %s", self.holder_id, exc)
                await self._drop_holder()
            if not self.holding and self.registry.lease is None:  # a failed claim: retry within a second
                waiter = asyncio.ensure_future(seen.wait())
                await asyncio.wait([waiter], timeout=max(1.0, self.confirm_s))
                waiter.cancel()
            else:
                await seen.wait()

    async def _step(self, lease: Lease | None) -> None:
        mine = lease is not None and lease.holder == self.holder_id
        if self.holding:
            assert self._holder is not None
            if mine:
                return
            if lease is None or lease.epoch < self._holder.lease.epoch:
                log.info("lease %s: re-asserting over %s", self._holder.lease.epoch, lease)
                await self._holder.assert_lease()
                return
            log.warning("coordinator %s lost the lease to %s (epoch %d)", self.holder_id, lease.holder, lease.epoch)
            await self._drop_holder()
            self._set(False)
            return
        if lease is None:
            await self._claim()

    async def _claim(self) -> None:
        last = self.registry.lease
        epoch = max(self._max_epoch, last.epoch if last is not None else 0) + 1
        lease = Lease(self.holder_id, self.address, epoch)
        holder = LeaseHolder(self.registry.broker, self.registry.topics, lease, keepalive=self.keepalive)
        self._holder = holder
        await holder.start(wait=10.0)
        await asyncio.sleep(self.confirm_s)  # every claimant sees the same last word by then
        now = self.registry.lease
        if now is not None and now.holder == self.holder_id and now.epoch == epoch:
            self.takeovers += 1
            self._set(True)
        else:
            log.info("claim of lease %d lost to %s", epoch, now)
            await self._drop_holder()

    async def _drop_holder(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            await holder.stop()  # clean: no Will, the lease that won stays
