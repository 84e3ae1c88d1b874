"""The workflow actor: drives one workflow's DAG of operation actors.

``run`` is idempotent: after a restart (``max_restarts=-1``) the orchestrator's
pending call is retried on the new instance, which reloads the state from the store
and carries on. An operation actor that dies is recreated and picks up its items.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.names import CHECKPOINT, NAMESPACE, operation_actor, workflow_actor
from actors.operation import OperationActor, plan_for
from runtime import rollback
from runtime.engine import FORWARD, ROLLBACK
from runtime.records import ITEM, OPERATION, WORKFLOW, item_key, now, status_document
from runtime.scheduler import DagScheduler, rollback_order, split_quota
from runtime.settings import Settings
from runtime.states import OP_TERMINAL, ItemState, OpState, WorkflowState

log = logging.getLogger(__name__)
Doc = dict[str, Any]
RECREATE_DELAY = 0.5
PREWARM = 4  # operation actors created ahead of need, at most


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class WorkflowActor:
    def __init__(self, workflow_id: str, settings: Settings) -> None:
        self.id, self.settings = workflow_id, settings
        self.checkpoint = ray.get_actor(CHECKPOINT, namespace=NAMESPACE)
        self._run: asyncio.Task[Doc] | None = None
        self._ops: dict[str, Any] = {}  # live operation actors
        self._quota: dict[str, int] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._cancelled = False
        self._doc: Doc = {}
        self._op_docs: dict[str, Doc] = {}
        self._lock = asyncio.Lock()

    # -- public --------------------------------------------------------------------

    async def run(self, mode: str = FORWARD, subset: list[str] | None = None) -> Doc:
        """Drive the workflow to a terminal state (forward or rollback); joins a run
        already under way."""
        if self._run is None or self._run.done():
            self._run = asyncio.create_task(self._execute(mode, subset))
        return await asyncio.shield(self._run)

    async def status(self) -> Doc:
        counts = dict(self._counts)
        for op_id, actor in list(self._ops.items()):
            try:
                counts[op_id] = await actor.progress.remote()
            except RayActorError:
                pass
        if not self._doc:
            docs = await self.checkpoint.load.remote(self.id)
            return _status_from_docs(docs)
        return status_document(self._doc, self._op_docs, counts)

    async def cancel(self) -> None:
        self._cancelled = True
        for actor in list(self._ops.values()):
            try:
                await actor.cancel.remote()
            except RayActorError:
                pass

    # -- driving -------------------------------------------------------------------

    async def _execute(self, mode: str, subset: list[str] | None) -> Doc:
        for op_id in list(self._ops):
            await self._retire(op_id)  # left by a run that stopped on an error
        docs = await self.checkpoint.load.remote(self.id)
        self._doc = dict(docs[(WORKFLOW, "")])
        self._op_docs = {k: dict(v) for (kind, k), v in docs.items() if kind == OPERATION}
        self.plan, self.catalog = plan_for(self._doc["spec"], self.settings)
        # What operation actors would otherwise each read from the store again.
        self._items_by_op: dict[str, dict[str, Doc]] = {}
        self._servers: dict[str, Doc | None] = {name: None for name in self.plan.servers}
        for (kind, _), d in docs.items():
            if kind == ITEM:
                self._items_by_op.setdefault(d["op_id"], {})[d["name"]] = d
                if d["kind"] == "server" and d["status"] == "Completed" and d.get("result"):
                    self._servers[d["name"]] = d["result"]
        if mode == ROLLBACK:
            return await self._rollback(subset)
        if self._doc["status"] == WorkflowState.ROLLING_BACK.value:
            # A rollback interrupted by a crash carries on over what it had chosen.
            return await self._rollback(self._doc.get("rollback_subset"))
        await self._set_workflow(WorkflowState.RUNNING)
        state = await self._forward()
        if state is WorkflowState.FAILED and self.plan.workflow.rollback_on_failure:
            # Straight from Running: a stored (or polled) Failed would be taken for the
            # end, and a crash right after it would leave the rollback undone.
            self._doc["error"] = self._failures()
            return await self._rollback(None)
        await self._set_workflow(state)
        return self._final()

    async def _forward(self) -> WorkflowState:
        states = {}
        for op_id, doc in self._op_docs.items():
            st = OpState(doc["status"])
            states[op_id] = st if st in OP_TERMINAL else OpState.PENDING
        sched = DagScheduler(self.plan, states)
        running: dict[str, asyncio.Task[Doc]] = {}
        while True:
            if self._cancelled:
                sched.stopped = True
            for op_id, state, reason in sched.blocked():
                await self._write_op(op_id, {"status": state.value, "error": reason})
            ready = [op for op in sched.ready() if op not in running]
            if ready:
                await self._start(ready, running)
            self._prewarm(sched, running)
            if not running:
                if sched.all_terminal() or not sched.ready():
                    break
                continue
            done, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
            for op_id in [o for o, t in running.items() if t in done]:
                result = dict(running.pop(op_id).result())
                self._servers.update(result.pop("servers", None) or {})
                self._op_docs.setdefault(op_id, {}).update(result)
                self._counts[op_id] = result.get("counts", {})
                sched.set(op_id, OpState(result["status"]))
                self._quota.pop(op_id, None)
                await self._retire(op_id)
            await self._rebalance(running)
        for op_id in list(self._ops):
            await self._retire(op_id)  # prewarmed for operations that never ran
        return sched.outcome(self._cancelled)

    def _prewarm(self, sched: DagScheduler, running: dict[str, asyncio.Task[Doc]]) -> None:
        """Create the actors of operations that will be ready once the running ones
        complete, so starting the next wave does not wait for new processes."""
        if sched.stopped or self._cancelled:
            return
        for op_id in sched.next_wave(running):
            if op_id not in self._ops and len(self._ops) < len(running) + PREWARM:
                self._ops[op_id] = self._operation_actor(op_id)

    async def _start(self, ready: list[str], running: dict[str, asyncio.Task[Doc]]) -> None:
        """Start what the workflow-wide limit allows, lowering running operations'
        shares first so the total in flight never exceeds ``parallel_limit``."""
        async with self._lock:
            wants = {op: self._want(op) for op in [*running, *ready]}
            quota = split_quota(self.plan.workflow.parallel_limit, wants)
            for op_id in running:
                if quota[op_id] < self._quota.get(op_id, 0):
                    await self._set_capacity(op_id, quota[op_id])
            for op_id in ready:
                if quota[op_id] < 1 and len(running) > 0:
                    continue
                self._quota[op_id] = max(1, quota[op_id])
                self._mark_running(op_id)
                running[op_id] = asyncio.create_task(self._run_op(op_id, FORWARD))

    async def _rebalance(self, running: dict[str, asyncio.Task[Doc]]) -> None:
        async with self._lock:
            if not running:
                return
            quota = split_quota(
                self.plan.workflow.parallel_limit, {op: self._want(op) for op in running}
            )
            for op_id, q in quota.items():
                if q != self._quota.get(op_id):
                    await self._set_capacity(op_id, q)

    def _want(self, op_id: str) -> int:
        op = self.plan.operations[op_id]
        units = len({i.server for i in op.items}) or 1
        return min(units, op.spec.parallel_limit or units)

    def _mark_running(self, op_id: str) -> None:
        op = self.plan.operations[op_id]
        doc = self._op_docs.setdefault(op_id, {"id": op_id})
        doc.update(
            {
                "status": OpState.RUNNING.value,
                "type": op.spec.type.value,
                "total": len(op.items),
                "started_at": now(),
            }
        )

    async def _set_capacity(self, op_id: str, capacity: int) -> None:
        self._quota[op_id] = capacity
        actor = self._ops.get(op_id)
        if actor is not None:
            try:
                await actor.set_capacity.remote(capacity)
            except RayActorError:
                pass  # a recreated actor starts with the current quota

    async def _run_op(self, op_id: str, mode: str) -> Doc:
        first = True
        while True:
            actor = self._ops.get(op_id) or self._operation_actor(op_id)
            self._ops[op_id] = actor
            items = servers = None
            if first and mode == FORWARD:
                items = self._items_by_op.pop(op_id, {})
                servers = {name: self._servers.get(name) for name in self._targets(op_id)}
            try:
                if self._cancelled:
                    await actor.cancel.remote()
                quota = self._quota.get(op_id, 1)
                return await actor.run.remote(quota, mode, items, servers)  # type: ignore[no-any-return]
            except RayActorError as exc:
                # The actor died: a new one reads what the old one stored and carries on.
                log.warning("operation actor %s died (%s); recreating it", op_id, exc)
                self._ops.pop(op_id, None)
                first = False
                await asyncio.sleep(RECREATE_DELAY)

    def _targets(self, op_id: str) -> tuple[str, ...]:
        return self.plan.operations[op_id].targets

    def _operation_actor(self, op_id: str) -> Any:
        op = self.plan.operations[op_id]
        catalog = {name: self.catalog[name] for name in op.taskserv_order}
        return OperationActor.options(  # type: ignore[attr-defined]
            name=operation_actor(self.id, op_id),
            namespace=NAMESPACE,
            get_if_exists=True,
            # Operations may run on any node; spreading uses every machine of a cluster.
            scheduling_strategy="SPREAD",
        ).remote(self.id, op, catalog, self.settings)

    async def _retire(self, op_id: str) -> None:
        actor = self._ops.pop(op_id, None)
        if actor is not None:
            ray.kill(actor)

    # -- rollback ------------------------------------------------------------------

    async def _rollback(self, operations: list[str] | None) -> Doc:
        """Undo what this workflow did, last wave first; each step is checkpointed by
        the item lifecycle, so a restarted rollback skips what is already undone."""
        subset = rollback.rollback_subset(self.plan, operations)
        self._doc["rollback_subset"] = subset
        await self._set_workflow(WorkflowState.ROLLING_BACK)
        docs = await self.checkpoint.load.remote(self.id)
        failed = False
        for wave in rollback_order(self.plan, subset):
            todo = []
            for op_id in wave:
                steps = rollback.op_steps(self.plan, docs, op_id)
                released = [s for s in steps if s["action"] == "release"]
                if released:
                    await self._release(released, docs)
                if len(steps) > len(released):
                    todo.append(op_id)
                elif steps or self._needs_undo(op_id):
                    await self._write_op(op_id, {"status": OpState.ROLLED_BACK.value})
            for op_id in todo:
                self._quota[op_id] = self.plan.workflow.parallel_limit // max(1, len(todo)) or 1
                self._op_docs.setdefault(op_id, {})["status"] = "RollingBack"
            results = await asyncio.gather(*(self._run_op(op, ROLLBACK) for op in todo))
            for op_id, result in zip(todo, results, strict=True):
                self._op_docs.setdefault(op_id, {}).update(result)
                self._counts[op_id] = result.get("counts", {})
                await self._retire(op_id)
                failed = failed or result["status"] != OpState.ROLLED_BACK.value
        await self._release_orphaned_adopted(subset)
        end = WorkflowState.ROLLBACK_FAILED if failed else WorkflowState.ROLLED_BACK
        await self._set_workflow(end)
        return self._final()

    async def _release_orphaned_adopted(self, subset: list[str] | None) -> None:
        docs = await self.checkpoint.load.remote(self.id)
        orphaned = rollback.orphaned_adopted(self.plan, docs, subset)
        if not orphaned:
            return
        await self._release(orphaned, docs)
        for op_id in sorted({step["op"] for step in orphaned}):
            counts = Counter(
                d["status"] for (kind, _), d in docs.items() if kind == ITEM and d["op_id"] == op_id
            )
            self._counts[op_id] = dict(counts)
            await self._write_op(op_id, {"counts": dict(counts)})

    def _needs_undo(self, op_id: str) -> bool:
        """An operation with nothing left to undo still ends RolledBack if it ran."""
        return self._op_docs.get(op_id, {}).get("status") in rollback.UNDOABLE_OPS

    async def _release(
        self, steps: list[rollback.UndoStep], docs: dict[tuple[str, str], Doc]
    ) -> None:
        """Taskservs whose server this rollback already deleted went with it."""
        records = []
        for step in steps:
            key = item_key(step["op"], step["item"])
            doc = {**docs[(ITEM, key)], "status": ItemState.ROLLED_BACK.value, "error": None}
            doc["finished_at"] = now()
            docs[(ITEM, key)] = doc
            records.append({"workflow_id": self.id, "kind": ITEM, "key": key, "doc": doc})
        await self.checkpoint.write.remote(records, [])

    # -- persistence ---------------------------------------------------------------

    async def _set_workflow(self, state: WorkflowState, error: str | None = None) -> None:
        self._doc["status"] = state.value
        self._doc["updated_at"] = now()
        if state in (WorkflowState.FAILED,):
            self._doc["error"] = self._failures() or error
        if state not in (WorkflowState.RUNNING, WorkflowState.ROLLING_BACK):
            self._doc["finished_at"] = now()
        record = {"workflow_id": self.id, "kind": WORKFLOW, "key": "", "doc": self._doc}
        event = {"workflow_id": self.id, "type": "workflow", "data": {"status": state.value}}
        await self.checkpoint.write.remote([record], [event])

    def _failures(self) -> str:
        failed = [
            f"{op}: {d.get('error')}"
            for op, d in self._op_docs.items()
            if d.get("status") == OpState.FAILED.value
        ]
        return "; ".join(failed)[:4000]

    async def _write_op(self, op_id: str, fields: Doc) -> None:
        doc = self._op_docs.setdefault(op_id, {"id": op_id})
        op = self.plan.operations[op_id]
        doc.update({"type": op.spec.type.value, "total": len(op.items), **fields})
        doc["finished_at"] = now()
        record = {"workflow_id": self.id, "kind": OPERATION, "key": op_id, "doc": doc}
        data = {"op": op_id, "status": doc["status"], "error": fields.get("error")}
        event = {"workflow_id": self.id, "type": "operation", "data": data}
        await self.checkpoint.write.remote([record], [event])

    def _final(self) -> Doc:
        return status_document(self._doc, self._op_docs, self._counts)


def _status_from_docs(docs: dict[tuple[str, str], Doc]) -> Doc:
    ops = {k: v for (kind, k), v in docs.items() if kind == OPERATION}
    return status_document(docs[(WORKFLOW, "")], ops)


def actor_name(workflow_id: str) -> str:
    return workflow_actor(workflow_id)
