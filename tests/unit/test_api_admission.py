"""Admission control behind the API: at most N live workflows, the rest first come
first served, and a queued one can be withdrawn (cancelled before it started)."""

from __future__ import annotations

import asyncio

from actors.admission import Admission


async def test_at_most_limit_live_and_fifo_after() -> None:
    gate = Admission(2)
    order: list[str] = []
    release = asyncio.Event()

    async def workflow(wid: str) -> None:
        assert await gate.acquire(wid)
        order.append(wid)
        assert gate.live <= 2
        await release.wait()
        gate.release()

    tasks = [asyncio.create_task(workflow(f"w{i}")) for i in range(6)]
    await asyncio.sleep(0.01)
    assert order == ["w0", "w1"] and gate.queued == ["w2", "w3", "w4", "w5"]
    release.set()
    await asyncio.gather(*tasks)
    assert order == [f"w{i}" for i in range(6)]
    assert gate.live == 0 and gate.queued == []


async def test_a_withdrawn_workflow_never_takes_a_slot() -> None:
    gate = Admission(1)
    assert await gate.acquire("a")
    waiting = asyncio.create_task(gate.acquire("b"))
    after = asyncio.create_task(gate.acquire("c"))
    await asyncio.sleep(0.01)
    assert gate.withdraw("b") and not gate.withdraw("nope")
    assert await waiting is False
    gate.release()
    assert await after is True
    assert gate.live == 1
