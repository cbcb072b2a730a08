"""The gateway's line: FIFO per key, round robin over keys, bounds, turns passed on."""

from __future__ import annotations

import asyncio

import pytest

from swarm_coordinator.http.queue import FairQueue, QueueFull, QueueTimeout, Ticket


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _full_queue(**kwargs: float) -> tuple[FairQueue, Ticket]:
    """A queue that has seen the swarm refuse busy: one generation running, nobody waiting."""
    q = FairQueue(**kwargs)  # type: ignore[arg-type]
    running = await q.enter("k")
    q.started(running)
    q.full = True
    return q, running


async def test_room_means_no_wait() -> None:
    q = FairQueue()
    t = await q.enter("a")
    assert t.waited_s == 0.0 and len(q) == 0
    q.started(t)
    q.finished(t)
    assert q.running == 0 and not q.full


async def test_fifo_within_a_key_and_round_robin_across_keys() -> None:
    q, running = await _full_queue(probe_s=60.0)
    order: list[str] = []

    async def gen(key: str, name: str) -> None:
        t = await q.enter(key)
        order.append(name)
        q.started(t)

    tasks = []
    for key, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        tasks.append(asyncio.create_task(gen(key, name)))
        await _settle()
    assert len(q) == 6 and q.waiting_by_key() == {"a": 3, "b": 2, "c": 1}
    q.finished(running)  # one room freed: a1 goes; every start lets the next try
    await asyncio.gather(*tasks)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


async def test_a_refused_generation_returns_to_the_front_of_the_line() -> None:
    q, running = await _full_queue(probe_s=60.0)
    first = Ticket("x", -1, 0.0, 1e12)  # it arrived before the others and was refused busy
    later = asyncio.create_task(q.enter("y"))
    await _settle()
    back = asyncio.create_task(q.again(first, retry_after_s=30.0))
    await _settle()
    assert len(q) == 2
    q.finished(running)
    await asyncio.wait_for(back, 5)  # the early arrival gets the turn
    assert not later.done()
    q.started(first)
    await asyncio.wait_for(later, 5)


async def test_the_line_is_bounded() -> None:
    q, _ = await _full_queue(max_waiting=2, probe_s=60.0)
    waiters = [asyncio.create_task(q.enter("a")) for _ in range(2)]
    await _settle()
    with pytest.raises(QueueFull) as err:
        await q.enter("b")
    assert err.value.retry_after_header == "1" and q.refused == 1
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert len(q) == 0


async def test_waiting_is_bounded_in_time() -> None:
    q, _ = await _full_queue(max_wait_s=0.05, probe_s=60.0)
    second = asyncio.create_task(q.enter("b"))
    await _settle()
    with pytest.raises(QueueTimeout):
        await q.enter("a")  # not the head: only the deadline ends its wait
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)


async def test_the_head_tries_by_itself_after_the_hint() -> None:
    q, _ = await _full_queue(probe_s=0.01)  # nothing ever finishes here
    t = await asyncio.wait_for(q.enter("a"), 5)
    assert t.waited_s > 0 and len(q) == 0


async def test_a_cancelled_turn_is_passed_on() -> None:
    q, running = await _full_queue(probe_s=60.0)
    a = asyncio.create_task(q.enter("a"))
    await _settle()
    b = asyncio.create_task(q.enter("b"))
    await _settle()
    q.finished(running)  # a is granted ...
    a.cancel()  # ... but its caller left before using it
    await asyncio.gather(a, return_exceptions=True)
    await asyncio.wait_for(b, 5)
    assert len(q) == 0


async def test_a_refused_generation_is_bounded_too() -> None:
    q, _ = await _full_queue(max_waiting=1, probe_s=60.0)
    waiting = asyncio.create_task(q.enter("a"))
    await _settle()
    with pytest.raises(QueueFull):
        await q.again(Ticket("b", 99, 0.0, 1e12), retry_after_s=2.0)
    assert len(q) == 1 and q.retry_after_s() == 2.0
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_a_refusal_right_after_a_granted_turn_retries_soon() -> None:
    q, running = await _full_queue(probe_s=60.0, settle_s=0.01)
    t = asyncio.create_task(q.enter("a"))
    await _settle()
    q.finished(running)  # room freed: a's turn
    ticket = await asyncio.wait_for(t, 5)
    assert ticket.granted
    # refused anyway (the room was still being freed): a quick retry, without waiting for a grant
    await asyncio.wait_for(q.again(ticket, retry_after_s=30.0), 5)
    assert not ticket.granted
