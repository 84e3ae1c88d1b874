"""The operation actor: one per running operation; items are asyncio tasks inside it.

It reloads its items from the store when it starts, so a recreated actor carries on
where the killed one stopped: completed items are kept, items with an intent and no
result are reconciled before anything is created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.names import CHECKPOINT, NAMESPACE, PROVIDER_POOL
from runtime import crashpoints
from runtime.engine import FORWARD, OperationRunner, RunnerContext
from runtime.groupcommit import GroupCommitter
from runtime.planner import OperationPlan, Plan, build_plan
from runtime.providers.base import Provider, ServerRef
from runtime.providers.registry import build_provider
from runtime.records import ITEM, OPERATION, idempotency_key, item_key, new_item_doc, now
from runtime.settings import Settings
from runtime.states import ItemState, OpState
from runtime.transports.base import Transport
from runtime.transports.registry import build_transport
from schemas.catalog import catalog_dirs, load_catalog
from schemas.loader import workflow_from_data
from schemas.models import OperationType, TaskservSpec

log = logging.getLogger(__name__)
Doc = dict[str, Any]


def plan_for(spec: Doc, settings: Settings) -> tuple[Plan, dict[str, TaskservSpec]]:
    catalog = load_catalog(
        catalog_dirs({"PROVISIONING_TASKSERV_PATH": ":".join(map(str, settings.taskserv_path))})
    )
    return build_plan(workflow_from_data(spec), catalog), dict(catalog)


class _NoPermit(contextlib.AbstractAsyncContextManager[None]):
    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_PERMIT = _NoPermit()


class Permits:
    """Provider-pool permits for one provider, fetched in batches."""

    def __init__(self, pool: Any, key: str, unlimited: bool) -> None:
        self.pool, self.key, self.unlimited = pool, key, unlimited
        self._tokens = 0
        self._waiting = 0
        self._fetch: asyncio.Task[None] | None = None
        self._to_release = 0
        self._succeeded = 0  # of the calls in _to_release, those that did not raise
        self._releaser: asyncio.Task[None] | None = None

    def permit(self) -> contextlib.AbstractAsyncContextManager[None]:
        # Unlimited (the local provider): no generator and no bookkeeping per call.
        return _NO_PERMIT if self.unlimited else self._permit()

    @contextlib.asynccontextmanager
    async def _permit(self) -> AsyncIterator[None]:
        self._waiting += 1
        try:
            while self._tokens == 0:
                if self._fetch is None or self._fetch.done():
                    self._fetch = asyncio.create_task(self._refill())
                await asyncio.shield(self._fetch)
            self._tokens -= 1
        finally:
            self._waiting -= 1
            self._return_surplus()
        ok = False
        try:
            yield
            ok = True
        finally:
            self._release(1, ok)

    async def _refill(self) -> None:
        granted, retry_in = await self.pool.acquire.remote(self.key, max(1, self._waiting))
        self._tokens += granted
        self._return_surplus()
        if not granted:
            await asyncio.sleep(retry_in)

    def _return_surplus(self) -> None:
        """Tokens no waiter is left to take (a waiter timed out) go back to the pool, which
        counts every granted permit in flight until it is released."""
        surplus = self._tokens - self._waiting
        if surplus > 0:
            self._tokens -= surplus
            self._release(surplus, False)

    def _release(self, n: int, succeeded: bool) -> None:
        self._to_release += n
        self._succeeded += n if succeeded else 0
        if self._releaser is None or self._releaser.done():
            self._releaser = asyncio.create_task(self._release_soon())

    async def _release_soon(self) -> None:
        # Loop until nothing is left: a release that comes while a release call is in
        # flight starts no task of its own, and would otherwise never reach the pool.
        while self._to_release:
            await asyncio.sleep(0.02)  # gather releases into one call
            n, self._to_release = self._to_release, 0
            ok, self._succeeded = self._succeeded, 0
            # Only calls that did not raise count as successes (AIMD's additive increase).
            await self.pool.release.remote(self.key, n, ok)

    def throttled(self, retry_after: float | None) -> None:
        self.pool.throttled.remote(self.key, retry_after)


class _Host:
    """The ``ItemHost`` of this operation: group commit and provider permits."""

    def __init__(self, workflow_id: str, committer: GroupCommitter, permits: Permits) -> None:
        self.workflow_id = workflow_id
        self.committer = committer
        self.permits = permits
        self._last_status: dict[str, str] = {}

    async def persist(self, item: Doc) -> None:
        key = item_key(item["op_id"], item["name"])
        record = {"workflow_id": self.workflow_id, "kind": ITEM, "key": key, "doc": dict(item)}
        event = None
        # Terminal states only: a Running event per item would double the event log,
        # and live counts already show what is in flight.
        if item["status"] != "Running" and self._last_status.get(key) != item["status"]:
            self._last_status[key] = item["status"]
            data = {"op": item["op_id"], "item": item["name"], "status": item["status"]}
            if item.get("error"):
                data["error"] = item["error"]["message"][:500]
            event = {"workflow_id": self.workflow_id, "type": "item", "data": data}
        await self.committer.put(record, event)

    def permit(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.permits.permit()

    def on_throttled(self, retry_after: float | None) -> None:
        self.permits.throttled(retry_after)


@ray.remote(num_cpus=0, max_restarts=0)
class OperationActor:
    """Created by the workflow actor, possibly a wave early (so the ~220 ms of process
    start overlaps the previous wave), with this operation's slice of the plan."""

    def __init__(
        self,
        workflow_id: str,
        op: OperationPlan,
        catalog: dict[str, TaskservSpec],
        settings: Settings,
    ) -> None:
        self.workflow_id, self.op_id, self.settings = workflow_id, op.id, settings
        crashpoints.configure(settings.crash_at)  # fault tests only
        self.op, self.catalog = op, catalog
        self.checkpoint = ray.get_actor(CHECKPOINT, namespace=NAMESPACE)
        self.pool = ray.get_actor(PROVIDER_POOL, namespace=NAMESPACE)
        self.runner: OperationRunner | None = None
        self._run: asyncio.Task[Doc] | None = None
        self._cancelled = False

    def ready(self) -> bool:
        return True

    async def run(
        self,
        capacity: int,
        mode: str = FORWARD,
        items: dict[str, Doc] | None = None,
        servers: dict[str, Doc | None] | None = None,
    ) -> Doc:
        """Run to a terminal state; a second call joins the first.

        ``items`` (this operation's stored item documents) and ``servers`` (the
        references of its target servers) come from the workflow actor when it knows
        them; when they are None (a recreated actor) they are read from the store.
        """
        if self._run is None:
            self._run = asyncio.create_task(self._execute(capacity, mode, items, servers))
        return await asyncio.shield(self._run)

    async def set_capacity(self, capacity: int) -> None:
        if self.runner is not None:
            await self.runner.limiter.set_capacity(min(capacity, self._own_limit()))

    def cancel(self) -> None:
        self._cancelled = True
        if self.runner is not None:
            self.runner.cancel()

    def progress(self) -> dict[str, int]:
        return self.runner.counts() if self.runner else {}

    def _own_limit(self) -> int:
        return self.op.spec.parallel_limit or 1_000_000

    async def _sink(self, records: list[Doc], events: list[Doc]) -> None:
        await self.checkpoint.write.remote(records, events)

    async def _execute(
        self,
        capacity: int,
        mode: str,
        known_items: dict[str, Doc] | None,
        known_servers: dict[str, Doc | None] | None,
    ) -> Doc:
        docs: dict[tuple[str, str], Doc] = {}
        is_taskserv_op = self.op.spec.type is OperationType.TASKSERV_BATCH
        if known_items is None or (is_taskserv_op and known_servers is None):
            docs = await self.checkpoint.load.remote(self.workflow_id)
            known_items = {
                key.split("/", 1)[1]: d
                for (kind, key), d in docs.items()
                if kind == ITEM and d.get("op_id") == self.op_id
            }
            known_servers = self._servers_from(docs)
        items = self._items(known_items)
        committer = GroupCommitter(self._sink)
        provider_name = self.op.spec.provider.value if self.op.spec.provider else "local"
        is_server_op = self.op.spec.type is OperationType.SERVER_BATCH
        pool_key = provider_name if is_server_op else "transport"
        unlimited = True if not is_server_op else await self.pool.unlimited.remote(pool_key)
        host = _Host(self.workflow_id, committer, Permits(self.pool, pool_key, unlimited))
        provider: Provider | None = None
        transports: dict[str, Transport] = {}
        try:
            if is_server_op:
                provider = build_provider(provider_name, self.settings)
            servers = {
                name: ServerRef.from_dict(ref) if ref else None
                for name, ref in (known_servers or {}).items()
            }
            for ref in servers.values():
                if ref is not None and ref.provider not in transports:
                    transports[ref.provider] = build_transport(ref.provider, self.settings)
            ctx = RunnerContext(provider, transports, servers, self.catalog)
            self.runner = OperationRunner(
                self.op, items, host, ctx, capacity=min(capacity, self._own_limit()), mode=mode
            )
            if self._cancelled:
                self.runner.cancel()
            started = now()
            running = OpState.RUNNING.value
            # Not awaited: items need not wait for it; drain() below makes it durable.
            opening = asyncio.create_task(
                self._write_op(committer, {"status": running, "started_at": started}, docs)
            )
            outcome = await self.runner.run()
            await opening
            await committer.drain()
            final = {
                "status": outcome.status.value,
                "counts": outcome.counts,
                "error": outcome.error,
                "started_at": started,
                "finished_at": now(),
                "max_in_flight": outcome.max_in_flight,
            }
            if outcome.coalescing:  # provider calls shared by identical creates, and saved
                final["coalescing"] = outcome.coalescing
            await self._write_op(committer, final, docs)
            if not is_taskserv_op:
                final = {**final, "servers": self._server_results(items)}
            return final
        finally:
            for t in transports.values():
                await t.close()
            if provider is not None:
                await provider.close()

    async def _write_op(self, committer: GroupCommitter, fields: Doc, docs: Doc) -> None:
        doc = dict(docs.get((OPERATION, self.op_id)) or {})
        doc.update({"id": self.op_id, "type": self.op.spec.type.value, "total": len(self.op.items)})
        doc.update(fields)
        event = {
            "workflow_id": self.workflow_id,
            "type": "operation",
            "data": {"op": self.op_id, "status": doc["status"], "counts": doc.get("counts", {})},
        }
        record = {"workflow_id": self.workflow_id, "kind": OPERATION, "key": self.op_id, "doc": doc}
        await committer.put(record, event)

    def _items(self, stored: dict[str, Doc]) -> dict[str, Doc]:
        items: dict[str, Doc] = {}
        for plan_item in self.op.items:
            doc = stored.get(plan_item.name)
            if doc is None:
                key = idempotency_key(self.workflow_id, self.op_id, plan_item.name)
                doc = new_item_doc(self.op_id, plan_item.name, plan_item.kind, key)
            items[plan_item.name] = dict(doc)
        return items

    def _servers_from(self, docs: dict[tuple[str, str], Doc]) -> dict[str, Doc | None]:
        """Targets of a taskserv operation: the reference of each completed server."""
        by_name = {
            d["name"]: d for (kind, _), d in docs.items() if kind == ITEM and d["kind"] == "server"
        }
        return {name: _completed_ref(by_name.get(name)) for name in self.op.targets}

    @staticmethod
    def _server_results(items: dict[str, Doc]) -> dict[str, Doc | None]:
        return {name: _completed_ref(doc) for name, doc in items.items()}


def _completed_ref(doc: Doc | None) -> Doc | None:
    if doc is None or doc["status"] != ItemState.COMPLETED.value or not doc.get("result"):
        return None
    return dict(doc["result"])
