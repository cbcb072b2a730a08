"""The planning lease through a real broker (mosquitto), two coordinators' worth of
registries and lease keepers in one process: one holds, the other stands by; when the
holder's connection dies (no goodbye) the standby takes over; a graceful stop hands
over at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from swarm_coordinator.broker import MosquittoBroker, find_mosquitto
from swarm_coordinator.lease import LeaseKeeper
from swarm_coordinator.registry import Registry, RegistryConfig

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (make deps-system)")

TIMEOUT = 10.0


async def until(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async def wait() -> None:
        while not check():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait(), timeout)


async def coordinator(url: str, name: str, changes: list[tuple[str, bool]]) -> tuple[Registry, LeaseKeeper]:
    registry = Registry(RegistryConfig(url, "lease", "m", 4, 1, client_id=name))
    await registry.start(wait=TIMEOUT)
    keeper = LeaseKeeper(registry, name, f"{name}:7600", lambda holding: changes.append((name, holding)),
                         confirm_s=0.3, keepalive=2)
    keeper.start()
    return registry, keeper


async def test_one_holds_the_other_takes_over_when_it_dies_or_stops() -> None:
    changes: list[tuple[str, bool]] = []
    async with MosquittoBroker() as broker:
        reg_a, a = await coordinator(broker.url, "a", changes)
        await until(lambda: a.holding)
        reg_b, b = await coordinator(broker.url, "b", changes)
        await asyncio.sleep(1.0)
        assert a.holding and not b.holding
        assert reg_b.lease is not None and reg_b.lease.holder == "a" and reg_b.lease.address == "a:7600"
        first_epoch = reg_b.lease.epoch

        assert a._holder is not None
        await a._holder.abort()  # the holder's connection dies without a goodbye: the Will deletes the lease
        await until(lambda: b.holding)
        assert reg_a.lease is not None and reg_a.lease.holder == "b" and reg_a.lease.epoch > first_epoch
        await until(lambda: not a.holding)  # the old holder sees the newer epoch and stands by
        assert [c for c in changes if c[0] == "a"] == [("a", True), ("a", False)] and ("b", True) in changes

        await b.stop()  # graceful: the lease is released and "a" claims it again
        await until(lambda: a.holding)
        await a.stop()
        for reg in (reg_a, reg_b):
            await reg.stop()
