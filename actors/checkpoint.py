"""The checkpoint actor: the only owner of the store.

Writers from every operation actor queue here; one writer task drains the queue into
one store write per backend (group commit), so concurrent operations share fsyncs.
It numbers events for the live progress streams and wakes the streams' waiters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

from actors import metrics
from runtime import crashpoints
from runtime.store import Event, Record, Store, open_store
from runtime.store.lock import DirLock

log = logging.getLogger(__name__)
Doc = dict[str, Any]
BACKENDS = ("surrealdb", "filesystem")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class CheckpointActor:
    def __init__(
        self, data_dir: str, surrealdb_url: str | None = None, crash_at: str | None = None
    ) -> None:
        crashpoints.configure(crash_at)  # fault tests only
        self.data_dir = Path(data_dir)
        # One orchestrator per data dir: a second one fails here, before touching data.
        self._lock = DirLock(self.data_dir / "run")
        # The store clients are not thread-safe: one thread does all store I/O.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._stores: dict[str, Store] = {}
        self._surrealdb_url = surrealdb_url
        self._backend_of: dict[str, str] = {}
        self._queue: list[tuple[list[Doc], list[Doc], asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._new_events: asyncio.Condition | None = None
        self.seq = max((self._store(b).last_seq() for b in self._existing_backends()), default=0)
        self.write_latencies: list[float] = []

    # -- stores ---------------------------------------------------------------------

    def _existing_backends(self) -> list[str]:
        found = []
        if (self.data_dir / "db").exists() or self._surrealdb_url:
            found.append("surrealdb")
        if (self.data_dir / "journal").exists():
            found.append("filesystem")
        return found

    def _store(self, backend: str) -> Store:
        if backend not in self._stores:
            self._stores[backend] = open_store(
                backend,  # type: ignore[arg-type]
                self.data_dir,
                self._surrealdb_url,
            )
        return self._stores[backend]

    def _backend(self, workflow_id: str, records: Sequence[Doc] = ()) -> str:
        if workflow_id in self._backend_of:
            return self._backend_of[workflow_id]
        for rec in records:
            if rec["kind"] == "workflow" and rec["workflow_id"] == workflow_id:
                backend = str(rec["doc"].get("storage_backend", "surrealdb"))
                self._backend_of[workflow_id] = backend
                return backend
        backend = "surrealdb"
        if (self.data_dir / "journal" / workflow_id).exists():
            backend = "filesystem"
        self._backend_of[workflow_id] = backend
        return backend

    async def _run_io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # -- writes ---------------------------------------------------------------------

    async def write(self, records: list[Doc], events: list[Doc]) -> int:
        """Durably write ``records`` (``{workflow_id, kind, key, doc}``) and ``events``
        (``{workflow_id, type, data}``). Returns the last event sequence number."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((records, events, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            started = time.perf_counter()
            try:
                await self._commit(batch)
            except Exception as exc:
                log.exception("checkpoint write failed")
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self.write_latencies.append(elapsed)
            del self.write_latencies[:-1000]
            metrics.checkpoint_write(elapsed, sum(len(records) for records, _, _ in batch))
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_result(self.seq)
            await self._notify()

    async def _commit(self, batch: list[tuple[list[Doc], list[Doc], Any]]) -> None:
        per_backend: dict[str, tuple[list[Record], list[Event]]] = {}
        seq = self.seq
        for records, events, _ in batch:
            for r in records:
                backend = self._backend(r["workflow_id"], records)
                per_backend.setdefault(backend, ([], []))[0].append(
                    Record(r["workflow_id"], r["kind"], r["key"], r["doc"])
                )
            for e in events:
                seq += 1
                backend = self._backend(e["workflow_id"], records)
                per_backend.setdefault(backend, ([], []))[1].append(
                    Event(seq, e["workflow_id"], e["type"], e.get("data", {}))
                )
        for backend, (recs, evs) in per_backend.items():
            await self._run_io(self._store(backend).write, recs, evs)
        crashpoints.crash_point("during_commit")  # written, not yet acknowledged
        self.seq = seq

    async def _notify(self) -> None:
        if self._new_events is None:
            self._new_events = asyncio.Condition()
        async with self._new_events:
            self._new_events.notify_all()

    # -- reads ----------------------------------------------------------------------

    async def load(self, workflow_id: str) -> dict[tuple[str, str], Doc]:
        backend = self._backend(workflow_id)
        return await self._run_io(self._store(backend).load, workflow_id)  # type: ignore[no-any-return]

    async def workflows(self) -> list[Doc]:
        docs: list[Doc] = []
        for backend in self._existing_backends():
            for doc in await self._run_io(self._store(backend).workflows):
                self._backend_of.setdefault(doc["id"], backend)
                docs.append(doc)
        return docs

    async def events(
        self, workflow_id: str, after_seq: int = 0, limit: int = 1000, wait: float = 0.0
    ) -> list[Doc]:
        """Events after ``after_seq``; with ``wait`` > 0, wait that long for new ones."""
        backend = self._backend(workflow_id)
        store = self._store(backend)
        found: list[Event] = await self._run_io(store.events, workflow_id, after_seq, limit)
        if not found and wait > 0:
            if self._new_events is None:
                self._new_events = asyncio.Condition()
            try:
                async with self._new_events:
                    await asyncio.wait_for(self._new_events.wait(), wait)
            except TimeoutError:
                return []
            found = await self._run_io(store.events, workflow_id, after_seq, limit)
        return [{"seq": e.seq, "type": e.type, "data": e.data} for e in found]

    def stats(self) -> Doc:
        lat = sorted(self.write_latencies)
        return {
            "seq": self.seq,
            "writes": len(lat),
            "write_p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
        }

    def ping(self) -> int:
        return self.seq
