"""One status poll for every server a provider is waiting on.

Fifty servers booting at once, each polled on its own every 0.1 s, is 500 requests a
second against the provider's rate limit, and the CPU of both ends. Waiters here
register their server id; a single poller asks the provider for the states of all its
servers in one list call per tick and hands each waiter its server's state. A server
absent from the list is reported as ``None``.

The poller starts with the first waiter and stops when none is left. Its interval
starts short and doubles up to the provider's poll interval, and goes back to short
when a server it has not seen before starts waiting (a new server may be up quickly).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

from runtime.errors import PermanentError, ThrottledError, TransientError

ListStates = Callable[[], Awaitable[dict[str, str]]]


class StateBoard:
    def __init__(self, list_states: ListStates, delays: Callable[[], Iterator[float]]) -> None:
        self._list_states = list_states
        self._delays = delays
        self._waiting: dict[str, list[asyncio.Future[str | None]]] = {}
        self._known: set[str] = set()
        self._fresh = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self.polls = 0  # list calls made, for tests and benchmarks

    async def next_state(self, server_id: str, timeout: float) -> str | None:
        """The server's state at the next poll (None: not listed). Raises TimeoutError
        after ``timeout`` seconds, and what the list call raised if it failed for good."""
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(server_id, []).append(fut)
        if server_id not in self._known:
            self._known.add(server_id)
            self._fresh.set()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_loop())
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._forget(server_id, fut)

    def done_with(self, server_id: str) -> None:
        """The caller will not wait on this server again."""
        self._known.discard(server_id)

    def _forget(self, server_id: str, fut: asyncio.Future[str | None]) -> None:
        futs = self._waiting.get(server_id)
        if futs is not None and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._waiting[server_id]

    async def _poll_loop(self) -> None:
        delays = self._delays()
        while self._waiting:
            self._fresh.clear()
            delay = next(delays)
            with contextlib.suppress(TimeoutError):
                # A server not seen before restarts the fast start of the interval.
                await asyncio.wait_for(self._fresh.wait(), delay)
                delays = self._delays()
                await asyncio.sleep(next(delays))
            if not self._waiting:
                break
            try:
                states = await self._list_states()
            except (TransientError, ThrottledError) as exc:
                await asyncio.sleep(exc.retry_after or 0.0)  # the waiters keep waiting
                continue
            except PermanentError as exc:
                self._settle(None, exc)
                continue
            finally:
                self.polls += 1
            self._settle(states, None)

    def _settle(self, states: dict[str, str] | None, error: Exception | None) -> None:
        waiting, self._waiting = self._waiting, {}
        for server_id, futs in waiting.items():
            for fut in futs:
                if fut.done():
                    continue
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result((states or {}).get(server_id))
