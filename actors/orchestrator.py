"""The orchestrator actor: the registry of workflows.

It creates one workflow actor per live workflow, resumes every unfinished workflow
from the store when it starts, and answers list, status and stats from the store (or
from the live workflow actor while one runs).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors import metrics
from actors.admission import Admission
from actors.checkpoint import CheckpointActor
from actors.names import CHECKPOINT, NAMESPACE, PROVIDER_POOL, workflow_actor
from actors.operation import plan_for
from actors.provider_pool import ProviderPoolActor
from actors.summaries import operation_stats
from actors.workflow import WorkflowActor
from runtime import rollback
from runtime.engine import FORWARD, ROLLBACK
from runtime.errors import InputError, error_class_name
from runtime.records import OPERATION, WORKFLOW, new_workflow_id, now, status_document
from runtime.settings import Settings
from runtime.states import WORKFLOW_TERMINAL, WorkflowState
from runtime.throttle import limits_from_env

log = logging.getLogger(__name__)
Doc = dict[str, Any]
UNFINISHED = {WorkflowState.PENDING, WorkflowState.RUNNING, WorkflowState.ROLLING_BACK}
METRICS_EVERY = 10.0  # seconds between metric sweeps (low frequency by design)


class NotFoundError(InputError):
    pass


class ConflictError(InputError):
    pass


def ensure_service_actors(settings: Settings) -> tuple[Any, Any]:
    """Get or create the checkpoint and provider-pool actors (detached: they outlive
    the caller, and a restarted caller finds them). The checkpoint actor is pinned to
    this node: the data dir is a local directory of the machine that started us."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    checkpoint = CheckpointActor.options(  # type: ignore[attr-defined]
        name=CHECKPOINT,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=here,
    ).remote(str(settings.data_dir), settings.surrealdb_url, settings.crash_at)
    pool = ProviderPoolActor.options(  # type: ignore[attr-defined]
        name=PROVIDER_POOL, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote(limits_from_env(settings.provider_env))
    return checkpoint, pool


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class OrchestratorActor:
    def __init__(self, settings: Settings, resume_on_start: bool = True) -> None:
        self.settings = settings
        self.resume_on_start = resume_on_start
        self.checkpoint, self.pool = ensure_service_actors(settings)
        self._tasks: dict[str, asyncio.Task[Doc]] = {}
        self._actors: dict[str, Any] = {}
        self._started = False
        self._resumed: list[str] = []
        self._idempotency: dict[str, str] = {}
        self._admission = Admission(int(os.environ.get("PROVISIONING_MAX_LIVE_WORKFLOWS", "8")))
        self._summaries: dict[str, Doc] = {}  # status documents of terminal workflows
        self._halted: dict[str, str] = {}  # workflows whose run stopped on an error
        self._metrics_task: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        """Resume every unfinished workflow (unless this orchestrator serves one
        foreground run). Safe to call more than once: later calls return the same ids."""
        if self._started:
            return list(self._resumed)
        self._started = True
        self._metrics_task = asyncio.create_task(self._metrics_loop())
        resumed = []
        for doc in await self.checkpoint.workflows.remote():
            if doc.get("idempotency_key"):
                self._idempotency[doc["idempotency_key"]] = doc["id"]
            if self.resume_on_start and WorkflowState(doc["status"]) in UNFINISHED:
                self._launch(doc["id"], FORWARD)
                resumed.append(doc["id"])
        self._resumed = resumed
        return resumed

    async def submit(self, spec: Doc, idempotency_key: str | None = None) -> Doc:
        await self.start()
        if idempotency_key and idempotency_key in self._idempotency:
            wid = self._idempotency[idempotency_key]
            doc = (await self.checkpoint.load.remote(wid))[(WORKFLOW, "")]
            return {"id": wid, "name": doc["name"], "status": doc["status"], "existing": True}
        plan, _ = plan_for(spec, self.settings)  # raises InputError for a bad workflow
        wid = new_workflow_id()
        wf = plan.workflow
        doc = {
            "id": wid,
            "name": wf.name,
            "status": WorkflowState.PENDING.value,
            "spec": wf.model_dump(mode="json"),
            "storage_backend": wf.storage_backend,
            "op_order": [op.id for op in wf.operations],
            "items_total": plan.item_count,
            "created_at": now(),
            "updated_at": now(),
            "idempotency_key": idempotency_key,
        }
        record = {"workflow_id": wid, "kind": WORKFLOW, "key": "", "doc": doc}
        event = {"workflow_id": wid, "type": "workflow", "data": {"status": doc["status"]}}
        await self.checkpoint.write.remote([record], [event])
        if idempotency_key:
            self._idempotency[idempotency_key] = wid
        self._launch(wid, FORWARD)
        return {"id": wid, "name": wf.name, "status": doc["status"]}

    def _launch(self, wid: str, mode: str, subset: list[str] | None = None) -> None:
        self._summaries.pop(wid, None)
        self._halted.pop(wid, None)
        self._tasks[wid] = asyncio.create_task(self._drive(wid, mode, subset))

    async def _drive(self, wid: str, mode: str, subset: list[str] | None) -> Doc:
        if not await self._admission.acquire(wid):
            return await self.get(wid)  # cancelled while it waited for a slot
        try:
            return await self._drive_admitted(wid, mode, subset)
        except Exception as exc:
            # E.g. the store cannot be written (disk full): nothing can be recorded, so
            # the run stops where it is; `resume` carries on once the cause is fixed.
            cause = getattr(exc, "cause", None) or exc
            self._halted[wid] = f"{error_class_name(cause)}: {cause}"[:2000]
            log.error("workflow %s stopped: %s", wid, self._halted[wid])
            return await self.get(wid)
        finally:
            self._actors.pop(wid, None)
            self._admission.release()

    async def _drive_admitted(self, wid: str, mode: str, subset: list[str] | None) -> Doc:
        actor = WorkflowActor.options(  # type: ignore[attr-defined]
            name=workflow_actor(wid), namespace=NAMESPACE, get_if_exists=True
        ).remote(wid, self.settings)
        self._actors[wid] = actor
        while True:
            try:
                result: Doc = await actor.run.remote(mode, subset)
                break
            except RayActorError as exc:
                # Killed without restart (ray.kill): make a new one; it resumes from the store.
                log.warning("workflow actor %s died (%s); recreating it", wid, exc)
                await asyncio.sleep(0.5)
                actor = WorkflowActor.options(  # type: ignore[attr-defined]
                    name=workflow_actor(wid), namespace=NAMESPACE, get_if_exists=True
                ).remote(wid, self.settings)
                self._actors[wid] = actor
        self._actors.pop(wid, None)
        ray.kill(actor)
        return result

    async def _load(self, wid: str) -> dict[tuple[str, str], Doc]:
        docs: dict[tuple[str, str], Doc] = await self.checkpoint.load.remote(wid)
        if (WORKFLOW, "") not in docs:
            raise NotFoundError(f"no workflow with id {wid!r}")
        return docs

    async def get(self, wid: str) -> Doc:
        await self.start()
        actor = self._actors.get(wid)
        if actor is not None:
            try:
                return await actor.status.remote()  # type: ignore[no-any-return]
            except RayActorError:
                pass
        elif wid in self._summaries:
            return self._summaries[wid]  # terminal: unchanged until _launch drops it
        docs = await self._load(wid)
        ops = {k: v for (kind, k), v in docs.items() if kind == OPERATION}
        doc = status_document(docs[(WORKFLOW, "")], ops)
        if wid in self._halted:
            doc["halted"] = self._halted[wid]  # why it stopped short of a final state
        elif WorkflowState(doc["status"]) in WORKFLOW_TERMINAL and wid not in self._tasks_live():
            self._summaries[wid] = doc
        return doc

    def _tasks_live(self) -> set[str]:
        return {w for w, t in self._tasks.items() if not t.done()}

    async def wait(self, wid: str, timeout: float | None = None) -> Doc:
        task = self._tasks.get(wid)
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        return await self.get(wid)

    async def list(self, status: str | None = None) -> list[Doc]:
        await self.start()
        docs = await self.checkpoint.workflows.remote()
        out = [
            {
                k: d.get(k)
                for k in (
                    "id",
                    "name",
                    "status",
                    "created_at",
                    "updated_at",
                    "finished_at",
                    "items_total",
                    "storage_backend",
                )
            }
            for d in docs
            if status is None or d.get("status") == status
        ]
        return sorted(out, key=lambda d: d["id"])

    async def cancel(self, wid: str) -> Doc:
        docs = await self._load(wid)
        status = WorkflowState(docs[(WORKFLOW, "")]["status"])
        if status in WORKFLOW_TERMINAL:
            raise ConflictError(f"workflow {wid} is {status.value}; nothing to cancel")
        actor = self._actors.get(wid)
        if actor is not None:
            await actor.cancel.remote()
        elif self._admission.withdraw(wid) or wid not in self._tasks or self._tasks[wid].done():
            # Not started (waiting for a slot, or not being driven): nothing is in flight.
            wf = {**docs[(WORKFLOW, "")], "status": WorkflowState.CANCELLED.value}
            wf["updated_at"] = wf["finished_at"] = now()
            record = {"workflow_id": wid, "kind": WORKFLOW, "key": "", "doc": wf}
            event = {"workflow_id": wid, "type": "workflow", "data": {"status": wf["status"]}}
            await self.checkpoint.write.remote([record], [event])
        return await self.get(wid)

    async def resume(self, wid: str) -> Doc:
        """Continue an interrupted workflow, or redrive the failed and skipped items of
        a Failed or Cancelled one."""
        await self.start()
        docs = await self._load(wid)
        status = WorkflowState(docs[(WORKFLOW, "")]["status"])
        if wid in self._tasks and not self._tasks[wid].done():
            return await self.get(wid)
        if status not in UNFINISHED | {WorkflowState.FAILED, WorkflowState.CANCELLED}:
            raise ConflictError(f"workflow {wid} is {status.value}; it cannot be resumed")
        if status in (WorkflowState.FAILED, WorkflowState.CANCELLED):
            await self._reset_for_redrive(wid, docs)
        self._launch(wid, FORWARD)
        return await self.get(wid)

    async def _reset_for_redrive(self, wid: str, docs: dict[tuple[str, str], Doc]) -> None:
        redo = {"Failed", "Skipped", "Cancelled"}
        records = []
        for (kind, key), doc in docs.items():
            if kind in ("item", OPERATION) and doc.get("status") in redo:
                doc = {**doc, "status": "Pending", "error": None}
                records.append({"workflow_id": wid, "kind": kind, "key": key, "doc": doc})
        wf = {**docs[(WORKFLOW, "")], "status": WorkflowState.RUNNING.value, "error": None}
        records.append({"workflow_id": wid, "kind": WORKFLOW, "key": "", "doc": wf})
        event = {"workflow_id": wid, "type": "workflow", "data": {"status": "Running"}}
        await self.checkpoint.write.remote(records, [event])

    async def rollback(self, wid: str, operation: str | None = None) -> Doc:
        await self.start()
        docs = await self._load(wid)
        status = WorkflowState(docs[(WORKFLOW, "")]["status"])
        if wid in self._tasks and not self._tasks[wid].done():
            raise ConflictError(f"workflow {wid} is {status.value}; cancel it before rolling back")
        allowed = {
            WorkflowState.COMPLETED,
            WorkflowState.FAILED,
            WorkflowState.CANCELLED,
            WorkflowState.ROLLBACK_FAILED,
            WorkflowState.ROLLING_BACK,
        }
        if docs[(WORKFLOW, "")].get("rollback_subset"):
            allowed.add(WorkflowState.ROLLED_BACK)  # only part of it was rolled back
        if status not in allowed:
            raise ConflictError(f"workflow {wid} is {status.value}; it cannot be rolled back")
        if operation:
            self._undo_plan(docs, operation)  # NotFoundError for an unknown operation
        self._launch(wid, ROLLBACK, [operation] if operation else None)
        return await self.get(wid)

    async def rollback_preview(self, wid: str, operation: str | None = None) -> list[Doc]:
        """What ``rollback(wid, operation)`` would undo now, in order, without doing it:
        ``[{op, item, action: delete_server | uninstall, server}]``."""
        return self._undo_plan(await self._load(wid), operation)

    def _undo_plan(self, docs: dict[tuple[str, str], Doc], operation: str | None) -> list[Doc]:
        plan, _ = plan_for(docs[(WORKFLOW, "")]["spec"], self.settings)
        try:
            return [dict(step) for step in rollback.preview(plan, docs, operation)]
        except KeyError as exc:
            raise NotFoundError(str(exc.args[0])) from None

    async def stats(self) -> Doc:
        await self.start()
        docs = await self.checkpoint.workflows.remote()
        by_status: dict[str, int] = {}
        for d in docs:
            by_status[d["status"]] = by_status.get(d["status"], 0) + 1
        finished = sum(n for s, n in by_status.items() if WorkflowState(s) in WORKFLOW_TERMINAL)
        return {
            "workflows": len(docs),
            "by_status": by_status,
            "live": len(self._actors),
            "queued": len(self._admission.queued),
            "max_live": self._admission.limit,
            "success_rate": round(by_status.get("Completed", 0) / finished, 4)
            if finished
            else None,
            **operation_stats(await self._status_documents([d["id"] for d in docs])),
            "checkpoint": await self.checkpoint.stats.remote(),
            "providers": await self.pool.stats.remote(),
        }

    async def _status_documents(self, wids: list[str]) -> list[Doc]:
        """Status documents of ``wids``; a terminal workflow's is computed once."""
        out: list[Doc] = []
        todo = [w for w in wids if w not in self._summaries]
        for i in range(0, len(todo), 8):
            chunk = todo[i : i + 8]
            got = await asyncio.gather(*(self.get(w) for w in chunk), return_exceptions=True)
            for wid, doc in zip(chunk, got, strict=True):
                if isinstance(doc, dict):
                    done = WorkflowState(doc["status"]) in WORKFLOW_TERMINAL
                    if done and wid not in self._actors:
                        self._summaries[wid] = doc
                    out.append(doc)
        out.extend(self._summaries[w] for w in wids if w in self._summaries)
        return out

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY)
            try:
                docs = await self.checkpoint.workflows.remote()
                by_status: dict[str, int] = {}
                for d in docs:
                    by_status[d["status"]] = by_status.get(d["status"], 0) + 1
                metrics.workflows_by_status(by_status)
                live = await self._status_documents(list(self._actors))
                metrics.items_by_state(operation_stats(live)["items_by_state"])
            except Exception:  # the loop must never die
                log.exception("metrics sweep failed")

    def ping(self) -> bool:
        return True
