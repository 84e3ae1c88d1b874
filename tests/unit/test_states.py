"""Every (from, to) pair of each level against an allowed list written out here.

The lists below are deliberately independent of ``runtime.states``: an edit to a table
must be matched by an edit here, so it cannot slip through unnoticed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import pytest

from runtime.errors import IllegalTransitionError
from runtime.states import (
    ITEM_TERMINAL,
    ITEM_TRANSITIONS,
    OP_TERMINAL,
    OP_TRANSITIONS,
    WORKFLOW_TERMINAL,
    WORKFLOW_TRANSITIONS,
    ItemState,
    OpState,
    WorkflowState,
    is_terminal,
    transition,
)

WORKFLOW_ALLOWED = {
    ("Pending", "Running"),
    ("Pending", "Cancelled"),
    ("Running", "Completed"),
    ("Running", "Failed"),
    ("Running", "Cancelled"),
    ("Running", "RollingBack"),
    ("Completed", "RollingBack"),
    ("Failed", "RollingBack"),
    ("Cancelled", "RollingBack"),
    ("Failed", "Running"),
    ("Cancelled", "Running"),
    ("RollingBack", "RolledBack"),
    ("RollingBack", "RollbackFailed"),
    ("RollbackFailed", "RollingBack"),
}
OP_ALLOWED = {
    ("Pending", "Running"),
    ("Pending", "Skipped"),
    ("Pending", "Cancelled"),
    ("Running", "Completed"),
    ("Running", "Failed"),
    ("Running", "Cancelled"),
    ("Failed", "Pending"),
    ("Skipped", "Pending"),
    ("Cancelled", "Pending"),
    ("Completed", "RolledBack"),
    ("Failed", "RolledBack"),
    ("Cancelled", "RolledBack"),
}
ITEM_ALLOWED = {
    ("Pending", "Running"),
    ("Pending", "Skipped"),
    ("Pending", "Cancelled"),
    ("Running", "Completed"),
    ("Running", "Failed"),
    ("Running", "Cancelled"),
    ("Running", "Pending"),
    ("Failed", "Pending"),
    ("Skipped", "Pending"),
    ("Cancelled", "Pending"),
    ("Completed", "RolledBack"),
    ("Failed", "RolledBack"),
}
WORKFLOW_TERMINAL_NAMES = {"Completed", "Failed", "Cancelled", "RolledBack", "RollbackFailed"}
OP_TERMINAL_NAMES = {"Completed", "Failed", "Skipped", "Cancelled", "RolledBack"}

LEVELS: list[tuple[type[StrEnum], set[tuple[str, str]], str]] = [
    (WorkflowState, WORKFLOW_ALLOWED, "workflow"),
    (OpState, OP_ALLOWED, "operation"),
    (ItemState, ITEM_ALLOWED, "item"),
]


def _all_pairs() -> list[tuple[type[StrEnum], StrEnum, StrEnum, bool, str]]:
    cases = []
    for enum, allowed, level in LEVELS:
        for a, b in itertools.product(list(enum), repeat=2):
            legal = a == b or (a.value, b.value) in allowed
            cases.append((enum, a, b, legal, level))
    return cases


@pytest.mark.parametrize(
    ("enum", "current", "target", "legal", "level"),
    _all_pairs(),
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_every_pair(
    enum: type[StrEnum], current: StrEnum, target: StrEnum, legal: bool, level: str
) -> None:
    if legal:
        result = transition(current, target)  # type: ignore[type-var]
        assert result is target
        assert type(result) is enum
    else:
        with pytest.raises(IllegalTransitionError) as info:
            transition(current, target)  # type: ignore[type-var]
        err = info.value
        assert (err.level, err.current, err.target) == (level, current.value, target.value)
        assert f"{current.value} -> {target.value}" in str(err)


def test_vocabulary() -> None:
    assert [s.value for s in WorkflowState] == [
        "Pending",
        "Running",
        "Completed",
        "Failed",
        "Cancelled",
        "RollingBack",
        "RolledBack",
        "RollbackFailed",
    ]
    op_values = ["Pending", "Running", "Completed", "Failed", "Skipped", "Cancelled", "RolledBack"]
    assert [s.value for s in OpState] == op_values
    assert [s.value for s in ItemState] == op_values
    assert not issubclass(ItemState, OpState)  # a separate type, not an alias
    assert WorkflowState("RollingBack") is WorkflowState.ROLLING_BACK
    assert isinstance(OpState.ROLLED_BACK, str)  # str enums: stored and sent as plain text
    assert str(OpState.ROLLED_BACK) == "RolledBack"


@pytest.mark.parametrize(
    ("table", "allowed", "enum"),
    [
        (WORKFLOW_TRANSITIONS, WORKFLOW_ALLOWED, WorkflowState),
        (OP_TRANSITIONS, OP_ALLOWED, OpState),
        (ITEM_TRANSITIONS, ITEM_ALLOWED, ItemState),
    ],
)
def test_tables_cover_every_state_and_match(
    table: dict[StrEnum, frozenset[StrEnum]], allowed: set[tuple[str, str]], enum: type[StrEnum]
) -> None:
    assert set(table) == set(enum)
    pairs = {(a.value, b.value) for a, targets in table.items() for b in targets}
    assert pairs == allowed
    for a, targets in table.items():
        assert type(a) is enum
        assert all(type(b) is enum for b in targets)
        assert a not in targets  # self-moves are handled by transition(), not listed


@pytest.mark.parametrize(
    ("terminal", "names", "enum"),
    [
        (WORKFLOW_TERMINAL, WORKFLOW_TERMINAL_NAMES, WorkflowState),
        (OP_TERMINAL, OP_TERMINAL_NAMES, OpState),
        (ITEM_TERMINAL, OP_TERMINAL_NAMES, ItemState),
    ],
)
def test_terminal_sets(terminal: frozenset[StrEnum], names: set[str], enum: type[StrEnum]) -> None:
    assert {s.value for s in terminal} == names
    assert all(type(s) is enum for s in terminal)
    for state in enum:
        assert is_terminal(state) is (state.value in names)  # type: ignore[arg-type]


def test_non_terminal_states_can_always_move_on() -> None:
    levels: list[tuple[Mapping[Any, frozenset[Any]], frozenset[Any]]] = [
        (WORKFLOW_TRANSITIONS, WORKFLOW_TERMINAL),
        (OP_TRANSITIONS, OP_TERMINAL),
        (ITEM_TRANSITIONS, ITEM_TERMINAL),
    ]
    for table, terminal in levels:
        for state, targets in table.items():
            if state not in terminal:
                assert targets, f"{state!r} is not terminal but has no way out"


def test_every_state_is_reachable_from_pending() -> None:
    for enum, allowed, _ in LEVELS:
        seen, todo = {"Pending"}, ["Pending"]
        while todo:
            here = todo.pop()
            for a, b in allowed:
                if a == here and b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert seen == {s.value for s in enum}


def test_mixing_levels_is_a_type_error() -> None:
    # The enums share values and compare equal as strings; the level must still be strict.
    assert OpState.PENDING == ItemState.PENDING  # type: ignore[comparison-overlap]
    with pytest.raises(TypeError):
        transition(OpState.PENDING, ItemState.RUNNING)  # type: ignore[type-var]
    with pytest.raises(TypeError):
        transition(WorkflowState.PENDING, OpState.PENDING)  # type: ignore[type-var]


def test_plain_strings_are_rejected() -> None:
    with pytest.raises(TypeError):
        transition("Pending", "Running")  # type: ignore[type-var]
    with pytest.raises(TypeError):
        is_terminal("Completed")  # type: ignore[arg-type]


def test_item_redrive_cycle() -> None:
    s = ItemState.PENDING
    for nxt in ["Running", "Pending", "Running", "Failed", "Pending", "Running", "Completed"]:
        s = transition(s, ItemState(nxt))
    assert s is ItemState.COMPLETED
    assert transition(s, ItemState.COMPLETED) is ItemState.COMPLETED  # resume re-applies


def test_illegal_transition_error_is_a_provisioning_error() -> None:
    from runtime.errors import ProvisioningError

    with pytest.raises(ProvisioningError, match="illegal workflow transition"):
        transition(WorkflowState.ROLLED_BACK, WorkflowState.RUNNING)
