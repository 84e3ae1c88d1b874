"""Group commit on the writer's side: many items, one store write.

Items call ``put`` and wait; a single flusher sends everything queued since the last
write as one batch, so while one write is in flight the next batch is filling up.
``put`` returns only when the batch that holds the record is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Doc = dict[str, Any]
Sink = Callable[[list[Doc], list[Doc]], Awaitable[None]]


class GroupCommitter:
    def __init__(self, sink: Sink, *, max_batch: int = 5000) -> None:
        self._sink = sink
        self._max_batch = max_batch
        self._records: list[Doc] = []
        self._events: list[Doc] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        self.records_written = 0

    async def put(self, record: Doc, event: Doc | None = None) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._records.append(record)
        if event is not None:
            self._events.append(event)
        self._waiters.append(fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await fut

    async def _flush_loop(self) -> None:
        while self._records or self._events:
            records, self._records = (
                self._records[: self._max_batch],
                self._records[self._max_batch :],
            )
            events, self._events = self._events, []
            waiters, self._waiters = self._waiters[: len(records)], self._waiters[len(records) :]
            try:
                await self._sink(records, events)
            except Exception as exc:
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            self.batches += 1
            self.records_written += len(records)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def drain(self) -> None:
        """Wait until everything queued so far is written."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
