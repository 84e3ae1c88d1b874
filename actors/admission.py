"""Admission control for workflow actors: how many run at once, and who waits.

Pure asyncio, no Ray: the orchestrator holds one ``Admission`` and drives it.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Admission:
    """At most ``limit`` live workflow actors (each costs a process, and one more per
    running operation); the others wait here, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.live = 0
        self._waiting: deque[tuple[str, asyncio.Future[bool]]] = deque()

    @property
    def queued(self) -> list[str]:
        return [wid for wid, fut in self._waiting if not fut.done()]

    async def acquire(self, wid: str) -> bool:
        """True once admitted; False if ``withdraw(wid)`` took it out of the queue."""
        if self.live < self.limit and not self.queued:
            self.live += 1
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((wid, fut))
        return await fut

    def release(self) -> None:
        while self._waiting:
            _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot passes to the next in line
                return
        self.live -= 1

    def withdraw(self, wid: str) -> bool:
        for queued, fut in self._waiting:
            if queued == wid and not fut.done():
                fut.set_result(False)
                return True
        return False
