"""The orchestrator actor: the registry of workflows.

It creates one workflow actor per live workflow, resumes every unfinished workflow
from the store when it starts, and answers list, status and stats from the store (or
from the live workflow actor while one runs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.checkpoint import CheckpointActor
from actors.names import CHECKPOINT, NAMESPACE, PROVIDER_POOL, workflow_actor
from actors.operation import plan_for
from actors.provider_pool import ProviderPoolActor
from actors.workflow import WorkflowActor
from runtime.engine import FORWARD, ROLLBACK
from runtime.errors import InputError
from runtime.records import OPERATION, WORKFLOW, new_workflow_id, now, status_document
from runtime.settings import Settings
from runtime.states import WORKFLOW_TERMINAL, WorkflowState
from runtime.throttle import limits_from_env

log = logging.getLogger(__name__)
Doc = dict[str, Any]
UNFINISHED = {WorkflowState.PENDING, WorkflowState.RUNNING, WorkflowState.ROLLING_BACK}


class NotFoundError(InputError):
    pass


class ConflictError(InputError):
    pass


def ensure_service_actors(settings: Settings) -> tuple[Any, Any]:
    """Get or create the checkpoint and provider-pool actors (detached: they outlive
    the caller, and a restarted caller finds them)."""
    checkpoint = CheckpointActor.options(  # type: ignore[attr-defined]
        name=CHECKPOINT, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote(str(settings.data_dir), settings.surrealdb_url)
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
        self._idempotency: dict[str, str] = {}

    async def start(self) -> list[str]:
        """Resume every unfinished workflow (unless this orchestrator serves one
        foreground run). Safe to call more than once."""
        if self._started:
            return []
        self._started = True
        resumed = []
        for doc in await self.checkpoint.workflows.remote():
            if doc.get("idempotency_key"):
                self._idempotency[doc["idempotency_key"]] = doc["id"]
            if self.resume_on_start and WorkflowState(doc["status"]) in UNFINISHED:
                self._launch(doc["id"], FORWARD)
                resumed.append(doc["id"])
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
        actor = WorkflowActor.options(  # type: ignore[attr-defined]
            name=workflow_actor(wid), namespace=NAMESPACE, get_if_exists=True
        ).remote(wid, self.settings)
        self._actors[wid] = actor
        self._tasks[wid] = asyncio.create_task(self._drive(wid, actor, mode, subset))

    async def _drive(self, wid: str, actor: Any, mode: str, subset: list[str] | None) -> Doc:
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
        docs = await self._load(wid)
        ops = {k: v for (kind, k), v in docs.items() if kind == OPERATION}
        return status_document(docs[(WORKFLOW, "")], ops)

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
        if status not in allowed:
            raise ConflictError(f"workflow {wid} is {status.value}; it cannot be rolled back")
        self._launch(wid, ROLLBACK, [operation] if operation else None)
        return await self.get(wid)

    async def stats(self) -> Doc:
        docs = await self.checkpoint.workflows.remote()
        by_status: dict[str, int] = {}
        for d in docs:
            by_status[d["status"]] = by_status.get(d["status"], 0) + 1
        return {
            "workflows": len(docs),
            "by_status": by_status,
            "live": len(self._actors),
            "checkpoint": await self.checkpoint.stats.remote(),
            "providers": await self.pool.stats.remote(),
        }

    def ping(self) -> bool:
        return True
