"""The documents the runtime keeps in the store, and the status document built from them.

Kinds and keys (see ``runtime.store.base``): ``("workflow", "")``,
``("operation", op_id)``, ``("item", "<op_id>/<item name>")``. Documents are plain
JSON-able dicts so they cross Ray and the store unchanged.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from runtime.states import ItemState, OpState, WorkflowState

Doc = dict[str, Any]
WORKFLOW, OPERATION, ITEM = "workflow", "operation", "item"


def new_workflow_id() -> str:
    """Time-ordered, so listing by id lists by submission time."""
    return f"wf-{int(time.time() * 1000):011x}{secrets.token_hex(4)}"


def idempotency_key(workflow_id: str, op_id: str, item: str) -> str:
    """The key a provider resource carries; the same for every attempt of one item."""
    digest = hashlib.sha256(f"{workflow_id}\0{op_id}\0{item}".encode()).hexdigest()
    return f"prov-{digest[:40]}"


def item_key(op_id: str, item: str) -> str:
    return f"{op_id}/{item}"


def now() -> float:
    return time.time()


def new_item_doc(op_id: str, name: str, kind: str, key: str) -> Doc:
    return {
        "op_id": op_id,
        "name": name,
        "kind": kind,
        "key": key,
        "status": ItemState.PENDING.value,
        "attempt": 0,
        "intent": None,
        "result": None,
        "error": None,
        "adopted": False,
        "started_at": None,
        "finished_at": None,
    }


def item_counts(items: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    return dict(Counter(str(i["status"]) for i in items))


def status_document(
    workflow: Mapping[str, Any],
    operations: Mapping[str, Mapping[str, Any]],
    live_counts: Mapping[str, Mapping[str, int]] | None = None,
) -> Doc:
    """What ``status`` shows: the workflow and each operation with item counts by state."""
    ops = []
    for op_id in workflow.get("op_order", list(operations)):
        op = operations.get(op_id, {})
        counts = dict((live_counts or {}).get(op_id) or op.get("counts") or {})
        ops.append(
            {
                "id": op_id,
                "type": op.get("type"),
                "status": op.get("status", OpState.PENDING.value),
                "total": op.get("total", 0),
                "counts": counts,
                "error": op.get("error"),
                "started_at": op.get("started_at"),
                "finished_at": op.get("finished_at"),
            }
        )
    return {
        "id": workflow["id"],
        "name": workflow.get("name"),
        "status": workflow.get("status", WorkflowState.PENDING.value),
        "storage_backend": workflow.get("storage_backend"),
        "created_at": workflow.get("created_at"),
        "updated_at": workflow.get("updated_at"),
        "finished_at": workflow.get("finished_at"),
        "error": workflow.get("error"),
        "operations": ops,
    }
