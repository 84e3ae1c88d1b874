"""Run one operation's items as asyncio tasks: limits, ordering, budgets, cancel.

The operation actor wraps an ``OperationRunner``; nothing here knows about Ray, so the
scheduling rules are tested with fakes of the provider and transport interfaces.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime import lifecycle, rollback
from runtime.coalesce import CreateCoalescer
from runtime.errors import error_class_name
from runtime.lifecycle import ItemHost
from runtime.planner import ItemPlan, OperationPlan
from runtime.policies import FailureBudget
from runtime.providers.base import Provider, ServerRef
from runtime.records import now
from runtime.states import ItemState, OpState
from runtime.transports.base import Transport
from schemas.models import OperationType, TaskservSpec

log = logging.getLogger(__name__)
Doc = dict[str, Any]
FORWARD, ROLLBACK = "forward", "rollback"
_DONE = {ItemState.COMPLETED.value, ItemState.ROLLED_BACK.value}
_FINAL = {ItemState.FAILED.value, ItemState.SKIPPED.value, ItemState.CANCELLED.value} | _DONE


class AdjustableLimiter:
    """A semaphore whose capacity the workflow can lower (waiting for in-flight work to
    drain) or raise while items run: that is how the workflow-wide limit is shared."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self.in_use = 0
        self.max_in_use = 0
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_use < self.capacity)
            self.in_use += 1
            self.max_in_use = max(self.max_in_use, self.in_use)

    async def release(self) -> None:
        async with self._cond:
            self.in_use -= 1
            self._cond.notify_all()

    async def set_capacity(self, capacity: int) -> None:
        async with self._cond:
            self.capacity = max(0, capacity)
            self._cond.notify_all()
            await self._cond.wait_for(lambda: self.in_use <= self.capacity)


@dataclass
class OpOutcome:
    status: OpState
    counts: dict[str, int]
    error: str | None = None
    max_in_flight: int = 0
    # Coalesced creates (runtime.coalesce), when the provider batches: calls made and saved.
    coalescing: dict[str, int] | None = None


@dataclass
class RunnerContext:
    """What an operation needs beyond its plan and items."""

    provider: Provider | None = None
    transports: Mapping[str, Transport] = field(default_factory=dict)
    servers: Mapping[str, ServerRef | None] = field(default_factory=dict)
    catalog: Mapping[str, TaskservSpec] = field(default_factory=dict)


class OperationRunner:
    def __init__(
        self,
        plan: OperationPlan,
        items: dict[str, Doc],
        host: ItemHost,
        ctx: RunnerContext,
        *,
        capacity: int,
        mode: str = FORWARD,
    ) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.items = items
        self.host = host
        self.ctx = ctx
        self.mode = mode
        self.limiter = AdjustableLimiter(capacity)
        self.budget = FailureBudget.from_operation(plan.spec, len(plan.items))
        self._cancelled = False
        self._budget_hit = False
        self._first_error: str | None = None
        self._failed = sum(1 for d in items.values() if d["status"] == ItemState.FAILED.value)
        # Rollback fails on its own failures only: an item that failed forward and left
        # nothing to undo stays Failed without failing the rollback.
        self._undo_failed = 0
        self._by_name = {i.name: i for i in plan.items}
        self._configs = {c.name: c for c in plan.spec.server_configs}
        # Identical configs reaching their create together share one provider call, if
        # the provider can batch; otherwise there is none and each item calls alone.
        self.coalescer: CreateCoalescer | None = None
        provider = ctx.provider
        if (
            mode == FORWARD
            and plan.spec.type is OperationType.SERVER_BATCH
            and provider is not None
            and provider.max_batch > 1
        ):
            self.coalescer = CreateCoalescer(provider, host)

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def stopping(self) -> bool:
        return self._cancelled or self._budget_hit

    async def run(self) -> OpOutcome:
        tasks: set[asyncio.Task[None]] = set()
        units = self._units()
        dispatched = 0
        for unit in units:
            if self.stopping:
                break
            await self.limiter.acquire()
            if self.stopping:
                await self.limiter.release()
                break
            task = asyncio.create_task(self._run_unit(unit))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            dispatched += 1
        if tasks:
            await asyncio.gather(*list(tasks))
        leftover = [name for unit in units[dispatched:] for name in unit]
        await self._finish_untouched(leftover)
        return self._outcome()

    # -- units of work ---------------------------------------------------------------

    def _units(self) -> list[list[str]]:
        """Groups of items run in order by one task: a server's taskserv chain, or one
        server. Rollback runs each chain backwards."""
        chains: dict[str, list[str]] = {}
        for item in self.plan.items:
            if self._wanted(item):
                chains.setdefault(item.server, []).append(item.name)
        units = list(chains.values())
        if self.mode == ROLLBACK:
            units = [list(reversed(u)) for u in units]
        return units

    def _wanted(self, item: ItemPlan) -> bool:
        doc = self.items[item.name]
        if self.mode == FORWARD:
            return doc["status"] not in _FINAL
        return rollback.needs_undo(doc)  # the rule the rollback preview lists

    async def _run_unit(self, unit: list[str]) -> None:
        try:
            server = self._plan_item(unit[0]).server
            kind = self._plan_item(unit[0]).kind
            if kind == "taskserv" and self.ctx.servers.get(server) is None:
                if self.mode == ROLLBACK:
                    return  # the server is gone, and what was installed on it with it
                await self._mark_all(
                    unit, ItemState.SKIPPED, f"skipped: target server {server!r} did not complete"
                )
                return
            for i, name in enumerate(unit):
                if self.stopping:
                    await self._finish_untouched(unit[i:])
                    return
                ok = await self._run_item(self.items[name])
                if not ok and self.mode == FORWARD:
                    await self._mark_all(
                        unit[i + 1 :], ItemState.SKIPPED, f"skipped: {name} failed on this server"
                    )
                    return
        finally:
            await self.limiter.release()

    async def _run_item(self, item: Doc) -> bool:
        plan_item = self._plan_item(item["name"])
        try:
            await self._dispatch(item, plan_item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = f"{error_class_name(exc)}: {exc}"
            self._first_error = self._first_error or f"{item['name']}: {message}"
            item["status"] = ItemState.FAILED.value
            item["error"] = {"class": error_class_name(exc), "message": str(exc)[:2000]}
            item["finished_at"] = now()
            await self.host.persist(item)
            if self.mode == FORWARD:
                self._failed += 1
                self._budget_hit = self.budget.exceeded(self._failed)
            else:
                self._undo_failed += 1
            return False
        return True

    async def _dispatch(self, item: Doc, plan_item: ItemPlan) -> None:
        spec, retry, timeout = self.spec, self.spec.retry, self.spec.timeout
        if spec.type is OperationType.SERVER_BATCH:
            assert self.ctx.provider is not None
            if self.mode == FORWARD:
                await lifecycle.create_server_item(
                    item,
                    self._configs[plan_item.server],
                    self.ctx.provider,
                    self.host,
                    retry,
                    timeout,
                    self.coalescer,
                )
            else:
                await lifecycle.delete_server_item(
                    item,
                    self.ctx.provider,
                    self.host,
                    retry,
                    timeout,
                    self._configs.get(plan_item.server),
                )
            return
        server = self.ctx.servers[plan_item.server]
        assert server is not None
        assert plan_item.taskserv is not None
        taskserv = self.ctx.catalog[plan_item.taskserv]
        transport = self.ctx.transports[server.provider]
        if self.mode == FORWARD:
            await lifecycle.install_taskserv_item(
                item, taskserv, server, transport, self.host, retry, timeout
            )
        else:
            await lifecycle.uninstall_taskserv_item(
                item, taskserv, server, transport, self.host, retry, timeout
            )

    def _plan_item(self, name: str) -> ItemPlan:
        return self._by_name[name]

    # -- bookkeeping -----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Items by state, computed on demand (progress reports are periodic)."""
        return dict(Counter(str(d["status"]) for d in self.items.values()))

    async def _mark_all(self, names: list[str], state: ItemState, reason: str) -> None:
        docs = [self.items[n] for n in names if self.items[n]["status"] not in _FINAL]
        for doc in docs:
            doc["status"] = state.value
            doc["error"] = {"class": state.value, "message": reason}
            doc["finished_at"] = now()
        await asyncio.gather(*(self.host.persist(d) for d in docs))

    async def _finish_untouched(self, names: list[str]) -> None:
        if self.mode == ROLLBACK or not names:
            return
        if self._cancelled:
            await self._mark_all(names, ItemState.CANCELLED, "cancelled before it started")
        elif self._budget_hit:
            budget = f"{self.budget.tolerated} tolerated failure(s)"
            await self._mark_all(names, ItemState.SKIPPED, f"skipped: more failures than {budget}")

    def _outcome(self) -> OpOutcome:
        counts = self.counts()
        failed = counts.get(ItemState.FAILED.value, 0)
        if self.mode == ROLLBACK:
            failed = self._undo_failed
            status = OpState.FAILED if failed else OpState.ROLLED_BACK
        elif self._cancelled:
            status = OpState.CANCELLED
        elif self.budget.exceeded(failed):
            status = OpState.FAILED
        else:
            status = OpState.COMPLETED
        error = None
        if status is OpState.FAILED:
            verb = "failed" if self.mode == FORWARD else "failed to roll back"
            error = f"{failed} of {len(self.plan.items)} items {verb}"
            if self.mode == FORWARD:
                error += f" ({self.budget.tolerated} tolerated)"
            if self._first_error:
                error += f"; first: {self._first_error}"
        coalescing = None
        if self.coalescer is not None:
            coalescing = self.coalescer.stats.to_dict()
            log.info("operation %s: coalesced creates %s", self.spec.id, coalescing)
        return OpOutcome(status, counts, error, self.limiter.max_in_use, coalescing)
