"""The state board: many waiters, one list call per tick."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from runtime.errors import PermanentError, TransientError
from runtime.providers.state_board import StateBoard


class FakeCloud:
    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.calls = 0
        self.fail_with: list[Exception] = []

    async def list_states(self) -> dict[str, str]:
        self.calls += 1
        if self.fail_with:
            raise self.fail_with.pop(0)
        return dict(self.states)


def fast() -> Iterator[float]:
    while True:
        yield 0.01


async def test_many_waiters_share_each_poll() -> None:
    cloud = FakeCloud()
    cloud.states = {f"s{i}": "maintenance" for i in range(50)}
    board = StateBoard(cloud.list_states, fast)
    seen = await asyncio.gather(*(board.next_state(f"s{i}", 5) for i in range(50)))
    assert seen == ["maintenance"] * 50
    assert cloud.calls == 1 and board.polls == 1


async def test_an_unlisted_server_is_none() -> None:
    cloud = FakeCloud()
    board = StateBoard(cloud.list_states, fast)
    assert await board.next_state("ghost", 5) is None


async def test_transient_list_errors_keep_waiters_waiting() -> None:
    cloud = FakeCloud()
    cloud.states = {"s1": "started"}
    cloud.fail_with = [TransientError("503"), TransientError("503")]
    board = StateBoard(cloud.list_states, fast)
    assert await board.next_state("s1", 5) == "started"
    assert cloud.calls == 3


async def test_a_permanent_list_error_reaches_every_waiter() -> None:
    cloud = FakeCloud()
    cloud.fail_with = [PermanentError("401 AUTHENTICATION_FAILED")]
    board = StateBoard(cloud.list_states, fast)
    results = await asyncio.gather(
        board.next_state("a", 5), board.next_state("b", 5), return_exceptions=True
    )
    assert all(isinstance(r, PermanentError) for r in results)


async def test_a_waiter_times_out_and_the_poller_stops_when_nobody_waits() -> None:
    cloud = FakeCloud()

    def slow() -> Iterator[float]:
        while True:
            yield 10.0

    board = StateBoard(cloud.list_states, slow)
    with pytest.raises(TimeoutError):
        await board.next_state("s1", 0.05)
    await asyncio.sleep(0.05)
    assert board._poller is not None
    # Nobody waits any more: the poller ends at its next wake-up without a call.
    assert cloud.calls == 0
