"""An in-memory ``WorkflowBackend`` for the app's unit tests (a fake at the interface)."""

from __future__ import annotations

import asyncio
from typing import Any

from api.backend import TERMINAL, ConflictError, NotFoundError
from runtime.records import new_workflow_id

Doc = dict[str, Any]


class FakeBackend:
    def __init__(self) -> None:
        self.workflows: dict[str, Doc] = {}
        self.specs: dict[str, Doc] = {}
        self.log: list[Doc] = []  # every event, all workflows: {seq, workflow_id, type, data}
        self.keys: dict[str, str] = {}
        self.calls: list[str] = []

    # -- test helpers ------------------------------------------------------------------

    def emit(self, wid: str, type_: str, **data: Any) -> int:
        seq = len(self.log) + 1
        self.log.append({"seq": seq, "workflow_id": wid, "type": type_, "data": data})
        if type_ == "workflow":
            self.workflows[wid]["status"] = data["status"]
        return seq

    def finish(self, wid: str, items: int = 3, status: str = "Completed") -> None:
        self.emit(wid, "workflow", status="Running")
        for i in range(items):
            self.emit(wid, "item", op="servers", item=f"s{i}", status="Completed")
        self.emit(wid, "workflow", status=status)

    # -- WorkflowBackend ---------------------------------------------------------------

    async def submit(self, spec: Doc, idempotency_key: str | None) -> Doc:
        self.calls.append("submit")
        if idempotency_key in self.keys:
            wid = self.keys[idempotency_key]
            return {**self._short(wid), "existing": True}
        wid = new_workflow_id()
        self.specs[wid] = spec
        self.workflows[wid] = {"id": wid, "name": spec["name"], "status": "Pending"}
        if idempotency_key:
            self.keys[idempotency_key] = wid
        return self._short(wid)

    def _short(self, wid: str) -> Doc:
        w = self.workflows[wid]
        return {"id": wid, "name": w["name"], "status": w["status"]}

    async def get(self, workflow_id: str) -> Doc:
        self.calls.append("get")
        if workflow_id not in self.workflows:
            raise NotFoundError(f"no workflow with id {workflow_id!r}")
        w = self.workflows[workflow_id]
        done = sum(1 for e in self.log if e["workflow_id"] == workflow_id and e["type"] == "item")
        ops = [{"id": "servers", "status": w["status"], "total": 3, "counts": {"Completed": done}}]
        return {**w, "operations": ops}

    async def list(self, status: str | None) -> list[Doc]:
        return [dict(w) for w in self.workflows.values() if status in (None, w["status"])]

    async def stats(self) -> Doc:
        return {"workflows": len(self.workflows), "by_status": {}}

    async def cancel(self, workflow_id: str) -> Doc:
        await self.get(workflow_id)
        return self._short(workflow_id)

    async def resume(self, workflow_id: str) -> Doc:
        return self._short(workflow_id) if await self.get(workflow_id) else {}

    async def rollback(self, workflow_id: str, operation: str | None) -> Doc:
        self.calls.append("rollback")
        doc = await self.get(workflow_id)
        if doc["status"] not in TERMINAL:
            raise ConflictError(f"workflow {workflow_id} is {doc['status']}; cancel it first")
        return self._short(workflow_id)

    async def rollback_preview(self, workflow_id: str, operation: str | None) -> list[Doc]:
        self.calls.append("rollback_preview")
        await self.get(workflow_id)
        return [
            {
                "op": operation or "servers",
                "item": "s-1",
                "action": "delete_server",
                "server": "s-1",
            }
        ]

    async def events(self, workflow_id: str, after_seq: int, limit: int, wait: float) -> list[Doc]:
        found = [
            {"seq": e["seq"], "type": e["type"], "data": e["data"]}
            for e in self.log
            if e["workflow_id"] == workflow_id and e["seq"] > after_seq
        ][:limit]
        if not found and wait:
            await asyncio.sleep(min(wait, 0.02))
        return found
