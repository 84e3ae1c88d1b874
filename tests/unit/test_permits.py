"""``Permits``, the operation actor's batched client of the provider pool, on a fake pool:
every permit granted goes back to the pool, and only calls that did not raise count as
successes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from actors.operation import Permits


class _Method:
    """Stands in for an actor method: ``.remote(...)`` returns an awaitable."""

    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.fn(*args))


class FakePool:
    def __init__(self, release_latency: float = 0.005) -> None:
        self.in_flight = 0
        self.granted = 0
        self.succeeded = 0
        self.release_latency = release_latency
        self.acquire = _Method(self._acquire)
        self.release = _Method(self._release)

    async def _acquire(self, key: str, want: int) -> tuple[int, float]:
        await asyncio.sleep(0.001)
        self.in_flight += want
        self.granted += want
        return want, 0.0

    async def _release(self, key: str, n: int, succeeded: int) -> None:
        await asyncio.sleep(self.release_latency)
        self.in_flight -= n
        self.succeeded += succeeded


async def _settled(pool: FakePool, timeout: float = 5.0) -> None:
    """Until every permit is back (or ``timeout``: a lost release never comes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pool.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # and nothing more arrives


async def _call(permits: Permits, delay: float, fail: bool = False) -> None:
    await asyncio.sleep(delay)
    try:
        async with permits.permit():
            await asyncio.sleep(0.001)
            if fail:
                raise RuntimeError("429")
    except RuntimeError:
        pass


def test_a_release_made_while_a_release_call_is_in_flight_still_reaches_the_pool() -> None:
    async def main() -> FakePool:
        pool = FakePool(release_latency=0.02)
        permits = Permits(pool, "upcloud", False)
        # The second call ends while the release of the first is on its way to the pool
        # (it starts ~20 ms after the first ends and takes 20 ms), and nothing comes after.
        await asyncio.gather(_call(permits, 0.0), _call(permits, 0.03))
        await _settled(pool)
        return pool

    pool = asyncio.run(main())
    assert pool.granted == 2 and pool.in_flight == 0 and pool.succeeded == 2


def test_only_calls_that_did_not_raise_count_as_successes() -> None:
    async def main() -> FakePool:
        pool = FakePool()
        permits = Permits(pool, "upcloud", False)
        await asyncio.gather(*(_call(permits, i * 0.003, fail=i % 2 == 0) for i in range(10)))
        await _settled(pool)
        return pool

    pool = asyncio.run(main())
    assert pool.granted == 10 and pool.in_flight == 0 and pool.succeeded == 5


def test_permits_left_by_a_waiter_that_timed_out_go_back_to_the_pool() -> None:
    async def main() -> tuple[FakePool, Permits]:
        pool = FakePool()
        permits = Permits(pool, "upcloud", False)

        async def with_timeout(t: float) -> None:
            try:
                async with asyncio.timeout(t), permits.permit():
                    await asyncio.sleep(0.001)
            except TimeoutError:
                pass

        # Three wait for one batch; one gives up before the pool answers.
        await asyncio.gather(with_timeout(0.0005), with_timeout(1), with_timeout(1))
        await _settled(pool)
        return pool, permits

    pool, permits = asyncio.run(main())
    assert pool.granted == 3 and pool.in_flight == 0 and pool.succeeded == 2
    assert permits._tokens == 0


def test_an_unlimited_provider_never_calls_the_pool() -> None:
    async def main() -> FakePool:
        pool = FakePool()
        permits = Permits(pool, "local", True)
        await asyncio.gather(*(_call(permits, 0) for _ in range(5)))
        return pool

    pool = asyncio.run(main())
    assert pool.granted == 0 and pool.in_flight == 0
