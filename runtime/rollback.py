"""What a rollback undoes: one selection rule, used by the engine, the workflow actor
and the preview (``rollback ID --dry-run``), so the preview lists exactly what runs.

An item is undone when it is not ``adopted`` (found installed before this workflow
touched it), not already RolledBack, and either Completed or carrying an intent: an
intent without a result is a create or apply that may have left something behind (a
lost reply, a crash mid-call), or an undo that failed or was interrupted.

Servers are deleted; taskservs are uninstalled while their server is still there. A
taskserv whose server this rollback already deleted went with it: it is marked
RolledBack without running anything (``release``).

Order: operations last wave first (``scheduler.rollback_order``); inside an operation,
each server's taskserv chain backwards, as the engine runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

from runtime.planner import ItemPlan, Plan
from runtime.records import ITEM, item_key
from runtime.scheduler import downstream, rollback_order
from runtime.states import ItemState, OpState

__all__ = [
    "UndoAction",
    "UndoStep",
    "needs_undo",
    "op_steps",
    "orphaned_adopted",
    "preview",
    "rollback_subset",
    "undo_action",
]

Doc = dict[str, Any]
Docs = Mapping[tuple[str, str], Doc]
UndoAction = Literal["delete_server", "uninstall", "release"]
# Operation states a rollback moves to RolledBack once their items are undone (an
# operation with items to undo is moved whatever its state).
UNDOABLE_OPS = frozenset(
    {OpState.COMPLETED.value, OpState.FAILED.value, OpState.CANCELLED.value, "Running"}
)


class UndoStep(TypedDict):
    op: str
    item: str
    action: UndoAction
    server: str


def needs_undo(doc: Mapping[str, Any]) -> bool:
    """The item rule; the engine's ROLLBACK selection is this function."""
    if doc.get("adopted"):
        return False
    status = doc.get("status")
    if status == ItemState.ROLLED_BACK.value:
        return False
    return status == ItemState.COMPLETED.value or doc.get("intent") is not None


def server_doc(plan: Plan, docs: Docs, server: str) -> Doc | None:
    """The stored item of the server named ``server``, wherever it was made."""
    made_by = plan.servers.get(server)
    if made_by is None:
        return None
    return docs.get((ITEM, item_key(made_by.op_id, server)))


def undo_action(plan: Plan, docs: Docs, item: ItemPlan) -> UndoAction | None:
    """What rolling back ``item`` does now, or None if there is nothing to undo."""
    doc = docs.get((ITEM, item_key(item.op_id, item.name)))
    if doc is None or not needs_undo(doc):
        return None
    if item.kind == "server":
        return "delete_server"
    server = server_doc(plan, docs, item.server) or {}
    if server.get("status") == ItemState.COMPLETED.value and server.get("result"):
        return "uninstall"
    if server.get("status") == ItemState.ROLLED_BACK.value:
        return "release"
    # The server never came up (or its deletion failed): nothing can run on it.
    return None


def op_steps(plan: Plan, docs: Docs, op_id: str) -> list[UndoStep]:
    """The undo steps of one operation, in the order the engine runs them."""
    chains: dict[str, list[UndoStep]] = {}
    for item in plan.operations[op_id].items:
        action = undo_action(plan, docs, item)
        if action is not None:
            step = UndoStep(op=op_id, item=item.name, action=action, server=item.server)
            chains.setdefault(item.server, []).append(step)
    return [step for chain in chains.values() for step in reversed(chain)]


def orphaned_adopted(plan: Plan, docs: Docs, subset: Iterable[str] | None) -> list[UndoStep]:
    """Adopted taskservs (installed before this workflow, never uninstalled by it) whose
    server this rollback deleted: they went with it, so they end RolledBack too. Run
    after the server deletions, so a deletion that failed leaves them Completed."""
    wanted = set(plan.operations) if subset is None else set(subset)
    steps = []
    for op_id in sorted(wanted):
        for item in plan.operations[op_id].items:
            doc = docs.get((ITEM, item_key(op_id, item.name)))
            if item.kind != "taskserv" or doc is None or not doc.get("adopted"):
                continue
            server = server_doc(plan, docs, item.server) or {}
            if (
                doc.get("status") == ItemState.COMPLETED.value
                and server.get("status") == ItemState.ROLLED_BACK.value
            ):
                steps.append(
                    UndoStep(op=op_id, item=item.name, action="release", server=item.server)
                )
    return steps


def rollback_subset(plan: Plan, operations: Iterable[str] | None) -> list[str] | None:
    """The operations a rollback of ``operations`` covers: each and everything that
    depends on it. None means the whole workflow."""
    if not operations:
        return None
    wanted: set[str] = set()
    for op_id in operations:
        if op_id not in plan.operations:
            known = ", ".join(sorted(plan.operations))
            raise KeyError(f"no operation {op_id!r} in this workflow (it has: {known})")
        wanted |= downstream(plan, op_id)
    return sorted(wanted)


def preview(plan: Plan, docs: Docs, operation: str | None = None) -> list[UndoStep]:
    """Exactly what a rollback (of ``operation`` and its dependents, or of everything)
    would do now, in order: ``{op, item, action, server}`` per provider-side step.

    Taskservs on a server that this rollback deletes are uninstalled first, so they
    appear as ``uninstall``; ``release`` steps (nothing left to run) are left out.
    """
    subset = rollback_subset(plan, [operation] if operation else None)
    steps: list[UndoStep] = []
    for wave in rollback_order(plan, subset):
        for op_id in wave:
            steps.extend(s for s in op_steps(plan, docs, op_id) if s["action"] != "release")
    return steps
