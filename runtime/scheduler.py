"""The workflow's DAG rules without Ray: what may start, what is skipped, how the
workflow-wide ``parallel_limit`` is shared, and what the workflow ends as."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from runtime.planner import Plan
from runtime.states import OP_TERMINAL, OpState, WorkflowState

_BAD_FOR_HARD = {OpState.FAILED, OpState.SKIPPED, OpState.CANCELLED}


class DagScheduler:
    def __init__(self, plan: Plan, states: Mapping[str, OpState]) -> None:
        self.plan = plan
        self.states: dict[str, OpState] = {
            op_id: states.get(op_id, OpState.PENDING) for op_id in plan.operations
        }
        self.stopped = False  # on_failure = "stop" after a failure, or a cancel

    def set(self, op_id: str, state: OpState) -> None:
        self.states[op_id] = state
        if state is OpState.FAILED and self.plan.workflow.on_failure == "stop":
            self.stopped = True

    def blocked(self) -> list[tuple[str, OpState, str]]:
        """Pending operations that can never run, with the state they end in and why."""
        out: list[tuple[str, OpState, str]] = []
        changed = True
        while changed:
            changed = False
            for op_id, state in self.states.items():
                if state is not OpState.PENDING:
                    continue
                verdict = self._blocked_by(op_id)
                if verdict:
                    self.states[op_id] = verdict[0]
                    out.append((op_id, *verdict))
                    changed = True
        return out

    def _blocked_by(self, op_id: str) -> tuple[OpState, str] | None:
        if self.stopped:
            return OpState.CANCELLED, "not started: the workflow stopped after a failure"
        for dep in self.plan.operations[op_id].hard_dependencies():
            if self.states[dep] in _BAD_FOR_HARD:
                return OpState.SKIPPED, f"skipped: hard dependency {dep!r} is {self.states[dep]}"
        return None

    def ready(self) -> list[str]:
        """Pending operations whose dependencies allow them to start, in wave order."""
        if self.stopped:
            return []
        out = []
        for wave in self.plan.waves:
            for op_id in wave:
                if self.states[op_id] is OpState.PENDING and self._deps_met(op_id):
                    out.append(op_id)
        return out

    def next_wave(self, running: Iterable[str]) -> list[str]:
        """Pending operations that will be ready if the ``running`` ones complete."""
        if self.stopped:
            return []
        assume = set(running)
        out = []
        for wave in self.plan.waves:
            for op_id in wave:
                if self.states[op_id] is not OpState.PENDING or op_id in assume:
                    continue
                op = self.plan.operations[op_id]
                deps = [*op.hard_dependencies(), *op.soft_dependencies()]
                if deps and all(d in assume or self.states[d] in OP_TERMINAL for d in deps):
                    out.append(op_id)
        return out

    def _deps_met(self, op_id: str) -> bool:
        op = self.plan.operations[op_id]
        hard_ok = all(self.states[d] is OpState.COMPLETED for d in op.hard_dependencies())
        soft_ok = all(self.states[d] in OP_TERMINAL for d in op.soft_dependencies())
        return hard_ok and soft_ok

    def all_terminal(self) -> bool:
        return all(s in OP_TERMINAL for s in self.states.values())

    def outcome(self, cancelled: bool) -> WorkflowState:
        if cancelled:
            return WorkflowState.CANCELLED
        if all(s is OpState.COMPLETED for s in self.states.values()):
            return WorkflowState.COMPLETED
        return WorkflowState.FAILED


def rollback_order(plan: Plan, subset: Iterable[str] | None = None) -> list[list[str]]:
    """Waves of operations to undo, last wave first; limited to ``subset`` if given."""
    wanted = set(plan.operations if subset is None else subset)
    return [
        [op for op in wave if op in wanted] for wave in reversed(plan.waves) if wanted & set(wave)
    ]


def downstream(plan: Plan, op_id: str) -> set[str]:
    """``op_id`` and every operation that depends on it, directly or not."""
    seen = {op_id}
    stack = [op_id]
    while stack:
        for child in plan.dependents.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def split_quota(limit: int, wants: Mapping[str, int]) -> dict[str, int]:
    """Share ``limit`` slots among operations wanting ``wants[op]`` each (water-filling):
    nobody gets more than it wants, the rest is split as evenly as it goes."""
    quota = dict.fromkeys(wants, 0)
    left = limit
    hungry = [op for op, w in wants.items() if w > 0]
    while left > 0 and hungry:
        share = max(1, left // len(hungry))
        for op in list(hungry):
            give = min(share, wants[op] - quota[op], left)
            quota[op] += give
            left -= give
            if quota[op] >= wants[op]:
                hungry.remove(op)
            if left == 0:
                break
    return quota
