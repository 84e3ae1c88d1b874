"""Turn a ``WorkflowSpec`` into a ``Plan``: waves, items, taskserv order, API calls.

No Ray, no I/O: the plan is computed the same way by ``batch plan`` on a laptop and
by the workflow actor. Every rule that can reject a workflow lives here, so a bad
workflow fails before anything is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import PlanError
from schemas.models import (
    DependencyKind,
    OperationSpec,
    OperationType,
    ServerConfigSpec,
    TaskservSpec,
    WorkflowSpec,
)

# Cloud API calls a server item needs at the least: the create and one status read.
# Polls while a server boots add more; local servers make no cloud call.
CALLS_PER_SERVER = {"upcloud": 2, "aws": 2, "local": 0}
MAX_ERRORS_SHOWN = 20


@dataclass(frozen=True)
class ItemPlan:
    op_id: str
    name: str
    kind: str  # "server" | "taskserv"
    provider: str
    server: str
    taskserv: str | None = None
    after: str | None = None  # the item on the same server that must complete first


@dataclass(frozen=True)
class ServerPlan:
    op_id: str
    provider: str
    config: ServerConfigSpec


@dataclass(frozen=True)
class OperationPlan:
    spec: OperationSpec
    wave: int
    items: tuple[ItemPlan, ...]
    taskserv_order: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.spec.id

    def hard_dependencies(self) -> tuple[str, ...]:
        return tuple(d.on for d in self.spec.dependencies if d.kind is DependencyKind.HARD)

    def soft_dependencies(self) -> tuple[str, ...]:
        return tuple(d.on for d in self.spec.dependencies if d.kind is DependencyKind.SOFT)


@dataclass(frozen=True)
class Plan:
    workflow: WorkflowSpec
    waves: tuple[tuple[str, ...], ...]
    operations: Mapping[str, OperationPlan]
    servers: Mapping[str, ServerPlan]
    api_calls_by_provider: Mapping[str, int]
    warnings: tuple[str, ...] = ()
    dependents: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def api_calls(self) -> int:
        return sum(self.api_calls_by_provider.values())

    @property
    def item_count(self) -> int:
        return sum(len(op.items) for op in self.operations.values())

    def items_by_provider(self, op_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.operations[op_id].items:
            counts[item.provider] = counts.get(item.provider, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        ops: dict[str, Any] = {}
        for op_id, op in self.operations.items():
            ops[op_id] = {
                "type": op.spec.type.value,
                "provider": op.spec.provider.value if op.spec.provider else None,
                "items": len(op.items),
                "items_by_provider": self.items_by_provider(op_id),
                "dependencies": [{"on": d.on, "kind": d.kind.value} for d in op.spec.dependencies],
                "wave": op.wave,
            }
            if op.spec.type is OperationType.TASKSERV_BATCH:
                ops[op_id]["taskserv_order"] = list(op.taskserv_order)
                ops[op_id]["servers"] = list(op.targets)
        return {
            "workflow": self.workflow.name,
            "waves": [list(w) for w in self.waves],
            "operations": ops,
            "api_calls": self.api_calls,
            "api_calls_by_provider": dict(self.api_calls_by_provider),
            "items": self.item_count,
            "warnings": list(self.warnings),
        }


def build_plan(workflow: WorkflowSpec, catalog: Mapping[str, TaskservSpec]) -> Plan:
    """Plan ``workflow`` or raise ``PlanError`` listing every problem found."""
    errors: list[str] = []
    ops: dict[str, OperationSpec] = {}
    for op in workflow.operations:
        if op.id in ops:
            errors.append(f"operation {op.id!r}: duplicate operation id")
        ops[op.id] = op
    for op in workflow.operations:
        for dep in op.dependencies:
            if dep.on not in ops:
                errors.append(f"operation {op.id!r}: unknown dependency {dep.on!r}")
    servers = _collect_servers(workflow, errors)
    _raise_if(errors, workflow)

    cycle = _find_cycle(ops)
    if cycle:
        raise PlanError(f"{workflow.name}: dependency cycle: {' -> '.join(cycle)}")
    waves = _waves(ops)
    wave_of = {op_id: i for i, wave in enumerate(waves) for op_id in wave}

    upstream = _UpstreamServers(ops)
    op_plans: dict[str, OperationPlan] = {}
    warnings: list[str] = []
    calls: dict[str, int] = {}
    for op in workflow.operations:
        if op.type is OperationType.SERVER_BATCH:
            assert op.provider is not None
            provider = op.provider.value
            items = tuple(
                ItemPlan(op.id, sc.name, "server", provider, sc.name) for sc in op.server_configs
            )
            if CALLS_PER_SERVER[provider]:
                calls[provider] = calls.get(provider, 0) + CALLS_PER_SERVER[provider] * len(items)
            op_plans[op.id] = OperationPlan(op, wave_of[op.id], items)
        else:
            op_plans[op.id] = _plan_taskservs(
                op, wave_of[op.id], servers, upstream, catalog, errors
            )
            if op.provider is not None:
                warnings.append(
                    f"operation {op.id!r}: 'provider' is not used by a taskserv_batch; "
                    "its items run on the servers they target"
                )
    _raise_if(errors, workflow)
    dependents: dict[str, list[str]] = {op_id: [] for op_id in ops}
    for op in workflow.operations:
        for dep in op.dependencies:
            dependents[dep.on].append(op.id)
    return Plan(
        workflow=workflow,
        waves=tuple(tuple(w) for w in waves),
        operations=op_plans,
        servers=servers,
        api_calls_by_provider=calls,
        warnings=tuple(warnings),
        dependents={k: tuple(v) for k, v in dependents.items()},
    )


def taskserv_order(names: tuple[str, ...], catalog: Mapping[str, TaskservSpec]) -> list[str]:
    """Order ``names`` so each comes after what it ``requires`` (stable otherwise)."""
    wanted = set(names)
    ordered: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise PlanError(f"taskserv requires form a cycle: {' -> '.join([*path, name])}")
        state[name] = 1
        for req in catalog[name].requires:
            if req in wanted:
                visit(req, [*path, name])
        state[name] = 2
        ordered.append(name)

    for name in names:
        visit(name, [])
    return ordered


def _plan_taskservs(
    op: OperationSpec,
    wave: int,
    servers: Mapping[str, ServerPlan],
    upstream: _UpstreamServers,
    catalog: Mapping[str, TaskservSpec],
    errors: list[str],
) -> OperationPlan:
    unknown = [t for t in op.taskservs if t not in catalog]
    if unknown:
        known = ", ".join(sorted(catalog)) or "(none)"
        errors.append(
            f"operation {op.id!r}: unknown taskserv {', '.join(map(repr, unknown))} "
            f"(catalog has: {known})"
        )
        return OperationPlan(op, wave, ())
    if len(set(op.taskservs)) != len(op.taskservs):
        errors.append(f"operation {op.id!r}: a taskserv is listed twice")
    reachable = upstream.of(op.id)
    if op.servers is None:
        # Walk the reachable operations' own servers, not every server of the workflow:
        # 8,000 taskserv operations x 2,000 servers made planning quadratic.
        targets = [
            sc.name
            for op_id in upstream.ordered(reachable)
            for sc in upstream.ops[op_id].server_configs
            if servers.get(sc.name, None) is not None and servers[sc.name].op_id == op_id
        ]
        if not targets:
            errors.append(
                f"operation {op.id!r}: no target servers: it depends on no server_batch "
                "operation and lists no 'servers'"
            )
    else:
        targets = list(op.servers)
        for name in targets:
            if name not in servers:
                errors.append(f"operation {op.id!r}: unknown server {name!r}")
            elif servers[name].op_id not in reachable:
                errors.append(
                    f"operation {op.id!r}: server {name!r} is made by "
                    f"{servers[name].op_id!r}, which this operation does not depend on"
                )
    try:
        order = taskserv_order(op.taskservs, catalog)
    except PlanError as exc:
        errors.append(f"operation {op.id!r}: {exc}")
        return OperationPlan(op, wave, ())
    items: list[ItemPlan] = []
    for server in targets:
        provider = servers[server].provider if server in servers else "?"
        previous: str | None = None
        for ts in order:
            name = f"{server}/{ts}"
            items.append(ItemPlan(op.id, name, "taskserv", provider, server, ts, previous))
            previous = name
    return OperationPlan(op, wave, tuple(items), tuple(order), tuple(targets))


def _collect_servers(workflow: WorkflowSpec, errors: list[str]) -> dict[str, ServerPlan]:
    servers: dict[str, ServerPlan] = {}
    for op in workflow.operations:
        if op.type is not OperationType.SERVER_BATCH:
            continue
        if not op.server_configs:
            errors.append(f"operation {op.id!r}: server_batch without servers")
        assert op.provider is not None
        for sc in op.server_configs:
            if sc.name in servers:
                errors.append(
                    f"operation {op.id!r}: server name {sc.name!r} is already used by "
                    f"operation {servers[sc.name].op_id!r}"
                )
                continue
            servers[sc.name] = ServerPlan(op.id, op.provider.value, sc)
    return servers


def _find_cycle(ops: Mapping[str, OperationSpec]) -> list[str] | None:
    """A dependency cycle as a path ``[a, b, c, a]``, or None. Iterative DFS."""
    color: dict[str, int] = {}
    for root in ops:
        if color.get(root):
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, idx = stack.pop()
            if idx == 0:
                color[node] = 1
                path.append(node)
            deps = ops[node].dependencies
            if idx < len(deps):
                stack.append((node, idx + 1))
                nxt = deps[idx].on
                if color.get(nxt) == 1:
                    start = path.index(nxt)
                    return [*path[start:], nxt]
                if not color.get(nxt):
                    stack.append((nxt, 0))
            else:
                color[node] = 2
                path.pop()
    return None


def _waves(ops: Mapping[str, OperationSpec]) -> list[list[str]]:
    """Topological levels: an operation's wave is one more than its deepest dependency."""
    level: dict[str, int] = {}
    pending = {op_id: len(op.dependencies) for op_id, op in ops.items()}
    dependents: dict[str, list[str]] = {op_id: [] for op_id in ops}
    for op_id, op in ops.items():
        for dep in op.dependencies:
            dependents[dep.on].append(op_id)
    ready = [op_id for op_id, n in pending.items() if n == 0]
    for op_id in ready:
        level[op_id] = 0
    while ready:
        nxt: list[str] = []
        for op_id in ready:
            for child in dependents[op_id]:
                level[child] = max(level.get(child, 0), level[op_id] + 1)
                pending[child] -= 1
                if pending[child] == 0:
                    nxt.append(child)
        ready = nxt
    waves: list[list[str]] = [[] for _ in range(max(level.values()) + 1)]
    for op_id in ops:  # declaration order inside a wave
        waves[level[op_id]].append(op_id)
    return waves


class _UpstreamServers:
    """Which server_batch operations each operation depends on, transitively."""

    def __init__(self, ops: Mapping[str, OperationSpec]) -> None:
        self._ops = ops
        self.ops = ops
        self._memo: dict[str, frozenset[str]] = {}
        self._position = {op_id: i for i, op_id in enumerate(ops)}

    def ordered(self, op_ids: frozenset[str]) -> list[str]:
        """``op_ids`` in declaration order, so targets keep the order servers were written."""
        return sorted(op_ids, key=self._position.__getitem__)

    def of(self, op_id: str) -> frozenset[str]:
        if op_id in self._memo:
            return self._memo[op_id]
        # Iterative post-order so a 10,000-deep chain does not hit the recursion limit.
        stack = [(op_id, False)]
        while stack:
            node, expanded = stack.pop()
            if node in self._memo:
                continue
            deps = [d.on for d in self._ops[node].dependencies]
            if not expanded:
                stack.append((node, True))
                stack.extend((d, False) for d in deps if d not in self._memo)
                continue
            acc: set[str] = set()
            for d in deps:
                acc |= self._memo[d]
                if self._ops[d].type is OperationType.SERVER_BATCH:
                    acc.add(d)
            self._memo[node] = frozenset(acc)
        return self._memo[op_id]


def _raise_if(errors: list[str], workflow: WorkflowSpec) -> None:
    if not errors:
        return
    shown = errors[:MAX_ERRORS_SHOWN]
    more = len(errors) - len(shown)
    text = "\n".join(f"  {e}" for e in shown)
    if more:
        text += f"\n  ... and {more} more"
    raise PlanError(f"{workflow.name}: the workflow cannot be planned:\n{text}")
