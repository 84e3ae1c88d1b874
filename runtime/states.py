"""The state vocabulary of workflows, operations and items, and their transition tables.

One table per level; ``transition`` is the only way code moves a state, so a move the
table does not list fails loudly (``IllegalTransitionError``) instead of silently
corrupting a checkpoint. A self-transition is always allowed: on resume, actors
re-apply the last recorded state, and that must be a no-op rather than an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

from runtime.errors import IllegalTransitionError

__all__ = [
    "ITEM_TERMINAL",
    "ITEM_TRANSITIONS",
    "OP_TERMINAL",
    "OP_TRANSITIONS",
    "WORKFLOW_TERMINAL",
    "WORKFLOW_TRANSITIONS",
    "ItemState",
    "OpState",
    "WorkflowState",
    "is_terminal",
    "transition",
]


class WorkflowState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"
    ROLLBACK_FAILED = "RollbackFailed"


class OpState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    CANCELLED = "Cancelled"
    ROLLED_BACK = "RolledBack"


# Same values as OpState, but a separate type: mypy then catches an item state stored
# where an operation state belongs, and ``transition`` picks the item table.
class ItemState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    CANCELLED = "Cancelled"
    ROLLED_BACK = "RolledBack"


_W = WorkflowState
WORKFLOW_TRANSITIONS: dict[WorkflowState, frozenset[WorkflowState]] = {
    _W.PENDING: frozenset({_W.RUNNING, _W.CANCELLED}),
    # Running -> RollingBack: a failure under rollback_on_failure. The workflow never
    # shows Failed on the way, so no client takes the failure for the end.
    _W.RUNNING: frozenset({_W.COMPLETED, _W.FAILED, _W.CANCELLED, _W.ROLLING_BACK}),
    _W.COMPLETED: frozenset({_W.ROLLING_BACK}),
    # Failed and Cancelled may be resumed (redrive) or rolled back.
    _W.FAILED: frozenset({_W.ROLLING_BACK, _W.RUNNING}),
    _W.CANCELLED: frozenset({_W.ROLLING_BACK, _W.RUNNING}),
    _W.ROLLING_BACK: frozenset({_W.ROLLED_BACK, _W.ROLLBACK_FAILED}),
    _W.ROLLED_BACK: frozenset(),
    _W.ROLLBACK_FAILED: frozenset({_W.ROLLING_BACK}),  # the operator retries the rollback
}

_O = OpState
OP_TRANSITIONS: dict[OpState, frozenset[OpState]] = {
    _O.PENDING: frozenset({_O.RUNNING, _O.SKIPPED, _O.CANCELLED}),
    _O.RUNNING: frozenset({_O.COMPLETED, _O.FAILED, _O.CANCELLED}),
    _O.COMPLETED: frozenset({_O.ROLLED_BACK}),
    # -> Pending is a redrive; -> RolledBack once rollback has undone what it did.
    _O.FAILED: frozenset({_O.PENDING, _O.ROLLED_BACK}),
    _O.SKIPPED: frozenset({_O.PENDING}),
    _O.CANCELLED: frozenset({_O.PENDING, _O.ROLLED_BACK}),
    _O.ROLLED_BACK: frozenset(),
}

_I = ItemState
ITEM_TRANSITIONS: dict[ItemState, frozenset[ItemState]] = {
    _I.PENDING: frozenset({_I.RUNNING, _I.SKIPPED, _I.CANCELLED}),
    # Running -> Pending: a crashed attempt is re-queued for retry.
    _I.RUNNING: frozenset({_I.COMPLETED, _I.FAILED, _I.CANCELLED, _I.PENDING}),
    _I.COMPLETED: frozenset({_I.ROLLED_BACK}),
    # A failed create may have left a resource behind, which rollback deletes.
    _I.FAILED: frozenset({_I.PENDING, _I.ROLLED_BACK}),
    _I.SKIPPED: frozenset({_I.PENDING}),
    _I.CANCELLED: frozenset({_I.PENDING}),
    _I.ROLLED_BACK: frozenset(),
}

# Nothing more happens in these states unless someone asks for a rollback or a redrive.
WORKFLOW_TERMINAL: frozenset[WorkflowState] = frozenset(
    {_W.COMPLETED, _W.FAILED, _W.CANCELLED, _W.ROLLED_BACK, _W.ROLLBACK_FAILED}
)
OP_TERMINAL: frozenset[OpState] = frozenset(
    {_O.COMPLETED, _O.FAILED, _O.SKIPPED, _O.CANCELLED, _O.ROLLED_BACK}
)
ITEM_TERMINAL: frozenset[ItemState] = frozenset(
    {_I.COMPLETED, _I.FAILED, _I.SKIPPED, _I.CANCELLED, _I.ROLLED_BACK}
)

# Looked up by the exact enum type: the three enums share string values, and a StrEnum
# member compares equal to any member of another StrEnum with the same value.
_LEVELS: dict[type[StrEnum], tuple[str, Mapping[Any, frozenset[Any]], frozenset[Any]]] = {
    WorkflowState: ("workflow", WORKFLOW_TRANSITIONS, WORKFLOW_TERMINAL),
    OpState: ("operation", OP_TRANSITIONS, OP_TERMINAL),
    ItemState: ("item", ITEM_TRANSITIONS, ITEM_TERMINAL),
}

S = TypeVar("S", WorkflowState, OpState, ItemState)


def _level(state: StrEnum) -> tuple[str, Mapping[Any, frozenset[Any]], frozenset[Any]]:
    try:
        return _LEVELS[type(state)]
    except KeyError:
        raise TypeError(f"not a workflow, operation or item state: {state!r}") from None


def transition(current: S, target: S) -> S:
    """Return ``target`` if the table allows ``current -> target``; raise otherwise."""
    if type(current) is not type(target):
        raise TypeError(
            f"cannot move a {type(current).__name__} to a {type(target).__name__}: "
            f"{current!r} -> {target!r}"
        )
    level, table, _ = _level(current)
    if current is target or target in table[current]:
        return target
    raise IllegalTransitionError(level, current.value, target.value)


def is_terminal(state: WorkflowState | OpState | ItemState) -> bool:
    return state in _level(state)[2]
