"""The planner's rules (waves, targets, taskserv order, errors) and the DAG scheduler.

Workflows are built as plain dicts and validated by the real loader; the catalog is
the real one (containerd <- kubernetes <- cilium).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Mapping
from typing import Any

import pytest

from runtime.errors import PlanError
from runtime.planner import CALLS_PER_SERVER, Plan, build_plan, taskserv_order
from runtime.scheduler import DagScheduler, downstream, rollback_order, split_quota
from runtime.states import OP_TERMINAL, OpState, WorkflowState
from schemas.catalog import load_catalog
from schemas.loader import workflow_from_data
from schemas.models import TaskservSpec, WorkflowSpec

# ---- helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog() -> dict[str, TaskservSpec]:
    return load_catalog()


def srv(
    op_id: str,
    names: list[str] | None = None,
    *,
    provider: str = "local",
    deps: list[Any] | None = None,
) -> dict[str, Any]:
    names = names if names is not None else [f"{op_id}-1"]
    return {
        "id": op_id,
        "type": "server_batch",
        "provider": provider,
        "dependencies": deps or [],
        "server_configs": [{"name": n, "plan": "p", "zone": "z"} for n in names],
    }


def tsv(
    op_id: str,
    taskservs: list[str] | None = None,
    *,
    deps: list[Any] | None = None,
    servers: list[str] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "id": op_id,
        "type": "taskserv_batch",
        "dependencies": deps or [],
        "taskservs": taskservs or ["containerd"],
    }
    if servers is not None:
        op["servers"] = servers
    return op


def soft(on: str) -> dict[str, str]:
    return {"on": on, "kind": "soft"}


def wf(*ops: dict[str, Any], **fields: Any) -> WorkflowSpec:
    return workflow_from_data({"batch_workflow": {"name": "t", **fields, "operations": list(ops)}})


def plan_of(catalog: Mapping[str, TaskservSpec], *ops: dict[str, Any], **fields: Any) -> Plan:
    return build_plan(wf(*ops, **fields), catalog)


def plan_error(catalog: Mapping[str, TaskservSpec], *ops: dict[str, Any]) -> str:
    with pytest.raises(PlanError) as info:
        plan_of(catalog, *ops)
    return str(info.value)


def assert_waves_respect_dependencies(plan: Plan) -> None:
    """Every dependency sits in an earlier wave; each op's wave is 1 + its deepest dep."""
    wave_of = {op: i for i, wave in enumerate(plan.waves) for op in wave}
    assert sorted(wave_of) == sorted(plan.operations)
    assert sum(len(w) for w in plan.waves) == len(plan.operations)
    for op_id, op in plan.operations.items():
        deps = [d.on for d in op.spec.dependencies]
        for dep in deps:
            assert wave_of[dep] < wave_of[op_id], (dep, op_id)
        expected = 1 + max((wave_of[d] for d in deps), default=-1)
        assert wave_of[op_id] == expected, op_id
        assert op.wave == wave_of[op_id]
    assert all(plan.waves), "no empty wave"


# ---- waves -------------------------------------------------------------------------


def test_chain_gives_one_operation_per_wave(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        tsv("d", deps=["c"]),
        tsv("c", deps=["b"]),
        tsv("b", deps=["a"]),
        srv("a"),
    )
    assert plan.waves == (("a",), ("b",), ("c",), ("d",))
    assert_waves_respect_dependencies(plan)


def test_diamond(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("top"),
        tsv("left", deps=["top"]),
        tsv("right", deps=["top"]),
        tsv("bottom", deps=["left", "right"]),
    )
    assert [set(w) for w in plan.waves] == [{"top"}, {"left", "right"}, {"bottom"}]
    assert_waves_respect_dependencies(plan)


def test_unbalanced_diamond_waits_for_deepest_branch(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("a"),
        tsv("b", deps=["a"]),
        tsv("c", deps=["b"]),
        tsv("join", deps=["a", "c"]),
    )
    assert plan.operations["join"].wave == 3
    assert_waves_respect_dependencies(plan)


def test_wide_graph_puts_independent_operations_in_one_wave(
    catalog: dict[str, TaskservSpec],
) -> None:
    servers = [srv(f"s{i:02d}") for i in range(30)]
    plan = plan_of(catalog, *servers, tsv("all", deps=[s["id"] for s in servers]))
    assert len(plan.waves) == 2
    assert set(plan.waves[0]) == {s["id"] for s in servers}
    # declaration order inside a wave
    assert list(plan.waves[0]) == [s["id"] for s in servers]
    assert plan.waves[1] == ("all",)
    assert plan.operations["all"].targets == tuple(s["id"] + "-1" for s in servers)


def test_random_dags_respect_dependencies(catalog: dict[str, TaskservSpec]) -> None:
    rng = random.Random(7)
    for _ in range(20):
        ops = [srv("root")]
        for i in range(1, 25):
            earlier = [o["id"] for o in ops]
            deps = rng.sample(earlier, k=rng.randint(1, min(3, len(earlier))))
            deps = [soft(d) if rng.random() < 0.3 else d for d in deps]
            ops.append(tsv(f"op{i}", deps=["root", *deps] if "root" not in deps else deps))
        rng.shuffle(ops)
        assert_waves_respect_dependencies(plan_of(catalog, *ops))


def test_soft_dependency_orders_waves_like_a_hard_one(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("a"),
        srv("b", deps=[soft("a")]),
        srv("c", deps=["b"]),
    )
    assert plan.waves == (("a",), ("b",), ("c",))
    assert plan.operations["b"].soft_dependencies() == ("a",)
    assert plan.operations["b"].hard_dependencies() == ()
    assert plan.operations["c"].hard_dependencies() == ("b",)
    assert plan.dependents["a"] == ("b",)


def test_soft_dependency_chain(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("a"),
        srv("b", deps=[soft("a")]),
        srv("c", deps=[soft("b")]),
        srv("d", deps=[soft("c")]),
    )
    assert plan.waves == (("a",), ("b",), ("c",), ("d",))
    for op in ("b", "c", "d"):
        assert plan.operations[op].hard_dependencies() == ()


def test_mixed_hard_and_soft_on_same_operation(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(catalog, srv("a"), srv("b"), srv("c", deps=["a", soft("b")]))
    op = plan.operations["c"]
    assert op.hard_dependencies() == ("a",)
    assert op.soft_dependencies() == ("b",)


# ---- structural errors ---------------------------------------------------------------


def test_duplicate_operation_id(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("dup", ["x"]), srv("dup", ["y"]))
    assert "'dup'" in msg
    assert "duplicate" in msg


def test_unknown_dependency_names_both_operations(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("a"), tsv("b", deps=["a", "nope"]))
    assert "'b'" in msg
    assert "'nope'" in msg
    assert "unknown dependency" in msg


def test_all_problems_are_listed_together(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("a"), srv("a", ["other"]), tsv("b", deps=["ghost"]))
    assert "duplicate" in msg
    assert "'ghost'" in msg


def _cycle_path(message: str) -> list[str]:
    m = re.search(r"cycle: ([a-z0-9_-]+(?: -> [a-z0-9_-]+)+)", message)
    assert m, message
    return m.group(1).split(" -> ")


def test_cycle_message_shows_the_path(catalog: dict[str, TaskservSpec]) -> None:
    ops = [srv("root"), tsv("a", deps=["root", "b"]), tsv("b", deps=["c"]), tsv("c", deps=["a"])]
    msg = plan_error(catalog, *ops)
    path = _cycle_path(msg)
    assert path[0] == path[-1]
    assert set(path) == {"a", "b", "c"}
    deps = {o["id"]: {d if isinstance(d, str) else d["on"] for d in o["dependencies"]} for o in ops}
    for src, dst in itertools.pairwise(path):
        assert dst in deps[src], f"{src} -> {dst} is not a dependency edge: {msg}"
    assert "a -> b -> c -> a" in msg


def test_cycle_through_soft_dependency(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("a", deps=[soft("b")]), srv("b", deps=["a"]))
    assert set(_cycle_path(msg)) == {"a", "b"}


def test_self_cycle(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("root"), tsv("me", deps=["root", "me"]))
    assert "me -> me" in msg


def test_cycle_found_behind_acyclic_prefix(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(
        catalog,
        srv("a"),
        tsv("b", deps=["a"]),
        tsv("x", deps=["b", "z"]),
        tsv("y", deps=["x"]),
        tsv("z", deps=["y"]),
    )
    path = _cycle_path(msg)
    assert set(path) == {"x", "y", "z"}
    assert path[0] == path[-1]


# ---- taskservs ---------------------------------------------------------------------


def test_unknown_taskserv_lists_the_catalog(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("s"), tsv("t", ["containerd", "nginx"], deps=["s"]))
    assert "'t'" in msg
    assert "'nginx'" in msg
    for name in catalog:
        assert name in msg


@pytest.mark.parametrize(
    "listed", list(itertools.permutations(["kubernetes", "cilium", "containerd"]))
)
def test_taskserv_order_follows_requires(
    catalog: dict[str, TaskservSpec], listed: tuple[str, ...]
) -> None:
    plan = plan_of(catalog, srv("s", ["n1", "n2"]), tsv("t", list(listed), deps=["s"]))
    op = plan.operations["t"]
    assert op.taskserv_order == ("containerd", "kubernetes", "cilium")
    # items on each server follow that order, each after the previous one
    for server in ("n1", "n2"):
        items = [i for i in op.items if i.server == server]
        assert [i.taskserv for i in items] == ["containerd", "kubernetes", "cilium"]
        assert items[0].after is None
        for prev, item in itertools.pairwise(items):
            assert item.after == prev.name


def test_taskserv_order_respects_any_catalog_requires() -> None:
    # A synthetic catalog so the rule, not the built-in files, is under test.
    def spec(name: str, requires: tuple[str, ...] = ()) -> TaskservSpec:
        return TaskservSpec(
            name=name, requires=requires, check="c", apply="a", verify="v", uninstall="u"
        )

    cat = {
        "base": spec("base"),
        "mid": spec("mid", ("base",)),
        "top": spec("top", ("mid", "extra")),
        "extra": spec("extra"),
    }
    for listed in itertools.permutations(cat):
        order = taskserv_order(listed, cat)
        assert sorted(order) == sorted(listed)
        for name in order:
            for req in cat[name].requires:
                assert order.index(req) < order.index(name), (listed, order)


def test_taskserv_requires_cycle_is_a_plan_error() -> None:
    def spec(name: str, requires: tuple[str, ...]) -> TaskservSpec:
        return TaskservSpec(
            name=name, requires=requires, check="c", apply="a", verify="v", uninstall="u"
        )

    cat = {"x": spec("x", ("y",)), "y": spec("y", ("x",))}
    with pytest.raises(PlanError, match="cycle"):
        taskserv_order(("x", "y"), cat)


def test_taskserv_listed_twice(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("s"), tsv("t", ["containerd", "containerd"], deps=["s"]))
    assert "'t'" in msg
    assert "twice" in msg


# ---- taskserv targets ----------------------------------------------------------------


def test_targets_default_to_direct_server_dependencies(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("s1", ["a1", "a2"]),
        srv("s2", ["b1"]),
        srv("unrelated", ["z1"]),
        tsv("t", deps=["s1", "s2"]),
    )
    assert set(plan.operations["t"].targets) == {"a1", "a2", "b1"}
    assert {i.server for i in plan.operations["t"].items} == {"a1", "a2", "b1"}


def test_targets_resolved_transitively_through_a_chain(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("s1", ["a1", "a2"]),
        srv("s2", ["b1"], deps=["s1"]),
        srv("other", ["z1"]),
        tsv("t1", ["containerd"], deps=["s2"]),
        tsv("t2", ["kubernetes"], deps=["t1"]),  # via a taskserv op in between
        tsv("t3", ["cilium"], deps=[soft("t2")]),
    )
    for op in ("t1", "t2", "t3"):
        assert set(plan.operations[op].targets) == {"a1", "a2", "b1"}, op
        assert "z1" not in {i.server for i in plan.operations[op].items}


def test_target_items_carry_the_server_provider(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("up", ["u1"], provider="upcloud"),
        srv("aw", ["w1", "w2"], provider="aws"),
        tsv("t", ["containerd", "kubernetes"], deps=["up", "aw"]),
    )
    assert plan.items_by_provider("t") == {"upcloud": 2, "aws": 4}
    for item in plan.operations["t"].items:
        assert item.provider == plan.servers[item.server].provider


def test_explicit_servers_select_a_subset(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("s1", ["a1", "a2", "a3"]),
        tsv("mid", deps=["s1"]),
        tsv("t", ["containerd"], deps=["mid"], servers=["a3", "a1"]),
    )
    assert plan.operations["t"].targets == ("a3", "a1")
    assert [i.server for i in plan.operations["t"].items] == ["a3", "a1"]


def test_explicit_unknown_server(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("s1", ["a1"]), tsv("t", deps=["s1"], servers=["a1", "ghost"]))
    assert "'t'" in msg
    assert "unknown server 'ghost'" in msg


def test_explicit_server_not_upstream(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(
        catalog,
        srv("s1", ["a1"]),
        srv("s2", ["b1"]),
        tsv("t", deps=["s1"], servers=["b1"]),
    )
    assert "'t'" in msg
    assert "'b1'" in msg
    assert "'s2'" in msg


def test_explicit_server_made_downstream_is_not_upstream(
    catalog: dict[str, TaskservSpec],
) -> None:
    msg = plan_error(
        catalog,
        srv("s1", ["a1"]),
        tsv("t", deps=["s1"], servers=["b1"]),
        srv("s2", ["b1"], deps=["t"]),
    )
    assert "'b1'" in msg


def test_duplicate_server_names_across_operations(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("s1", ["web", "db"]), srv("s2", ["api", "web"]))
    assert "'web'" in msg
    assert "'s1'" in msg
    assert "'s2'" in msg


def test_taskserv_op_without_targets(catalog: dict[str, TaskservSpec]) -> None:
    msg = plan_error(catalog, srv("s1"), tsv("lonely"))
    assert "'lonely'" in msg
    assert "no target servers" in msg


def test_taskserv_op_depending_only_on_taskserv_ops_without_servers(
    catalog: dict[str, TaskservSpec],
) -> None:
    msg = plan_error(catalog, srv("s1"), tsv("a"), tsv("b", deps=["a"]))
    assert "'a'" in msg
    assert "'b'" in msg


# ---- counts and JSON -----------------------------------------------------------------


def test_api_calls_counted_per_cloud_server(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("up", ["u1", "u2", "u3"], provider="upcloud"),
        srv("aw", ["w1", "w2"], provider="aws"),
        srv("lo", ["l1", "l2", "l3", "l4"], provider="local"),
        tsv("t", ["containerd", "kubernetes", "cilium"], deps=["up", "aw", "lo"]),
    )
    assert CALLS_PER_SERVER["upcloud"] > 0
    assert CALLS_PER_SERVER["aws"] > 0
    assert plan.api_calls_by_provider.get("upcloud") == 3 * CALLS_PER_SERVER["upcloud"]
    assert plan.api_calls_by_provider.get("aws") == 2 * CALLS_PER_SERVER["aws"]
    assert plan.api_calls_by_provider.get("local", 0) == 0
    assert plan.api_calls == 3 * CALLS_PER_SERVER["upcloud"] + 2 * CALLS_PER_SERVER["aws"]
    # taskserv items add no cloud calls: more taskservs, same count
    fewer = plan_of(
        catalog,
        srv("up", ["u1", "u2", "u3"], provider="upcloud"),
        srv("aw", ["w1", "w2"], provider="aws"),
        srv("lo", ["l1", "l2", "l3", "l4"], provider="local"),
        tsv("t", ["containerd"], deps=["up", "aw", "lo"]),
    )
    assert fewer.api_calls == plan.api_calls
    assert plan.item_count == 9 + 9 * 3
    assert fewer.item_count == 9 + 9


def test_to_json(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("up", ["u1", "u2"], provider="upcloud"),
        tsv("t", ["cilium", "containerd", "kubernetes"], deps=[soft("up")]),
    )
    doc = plan.to_json()
    assert doc["waves"] == [list(w) for w in plan.waves] == [["up"], ["t"]]
    assert doc["api_calls"] == plan.api_calls == 2 * CALLS_PER_SERVER["upcloud"]
    assert set(doc["operations"]) == {"up", "t"}
    up, t = doc["operations"]["up"], doc["operations"]["t"]
    assert up["type"] == "server_batch"
    assert up["provider"] == "upcloud"
    assert up["items"] == 2
    assert up["dependencies"] == []
    assert t["type"] == "taskserv_batch"
    assert t["provider"] is None
    assert t["items"] == 6
    assert t["dependencies"] == [{"on": "up", "kind": "soft"}]
    assert t["taskserv_order"] == ["containerd", "kubernetes", "cilium"]
    assert t["servers"] == ["u1", "u2"]
    json.dumps(doc)  # JSON-able as is


def test_taskserv_provider_field_warns(catalog: dict[str, TaskservSpec]) -> None:
    op = tsv("t", deps=["s"])
    op["provider"] = "aws"
    plan = plan_of(catalog, srv("s"), op)
    assert any("'t'" in w and "provider" in w for w in plan.warnings)
    assert plan_of(catalog, srv("s"), tsv("t", deps=["s"])).warnings == ()


def test_deep_chain_does_not_hit_recursion_limit(catalog: dict[str, TaskservSpec]) -> None:
    n = 3000
    ops = [srv("s0")] + [tsv(f"t{i}", deps=[f"t{i - 1}" if i > 1 else "s0"]) for i in range(1, n)]
    plan = plan_of(catalog, *ops)
    assert len(plan.waves) == n
    assert plan.operations[f"t{n - 1}"].targets == ("s0-1",)


# ---- DagScheduler --------------------------------------------------------------------


def _sched(plan: Plan, **states: OpState) -> DagScheduler:
    return DagScheduler(plan, states)


@pytest.fixture
def graph(catalog: dict[str, TaskservSpec]) -> Plan:
    # a -> b -> c (hard), a ~> s (soft) -> s2 (hard on s), x independent
    return plan_of(
        catalog,
        srv("a"),
        srv("b", deps=["a"]),
        srv("c", deps=["b"]),
        srv("s", deps=[soft("a")]),
        srv("s2", deps=["s"]),
        srv("x"),
    )


def test_initial_ready_is_wave_zero(graph: Plan) -> None:
    sched = _sched(graph)
    assert sched.ready() == ["a", "x"]
    assert not sched.all_terminal()


def test_hard_dependency_completed_makes_dependent_ready(graph: Plan) -> None:
    sched = _sched(graph)
    sched.set("a", OpState.RUNNING)
    assert "b" not in sched.ready()
    assert "s" not in sched.ready()
    sched.set("a", OpState.COMPLETED)
    assert set(sched.ready()) == {"b", "s", "x"}


@pytest.mark.parametrize("bad", [OpState.FAILED, OpState.SKIPPED, OpState.CANCELLED])
def test_hard_dependency_failed_skips_dependents_transitively(graph: Plan, bad: OpState) -> None:
    sched = _sched(graph)
    sched.set("a", bad)
    blocked = {op: state for op, state, _ in sched.blocked()}
    assert blocked == {"b": OpState.SKIPPED, "c": OpState.SKIPPED}
    assert sched.states["b"] is OpState.SKIPPED
    assert sched.states["c"] is OpState.SKIPPED
    reasons = {op: why for op, _, why in _sched(graph, a=bad).blocked()}
    assert "'a'" in reasons["b"]
    assert "'b'" in reasons["c"]
    # the soft dependent is not skipped: it becomes ready
    assert sched.states["s"] is OpState.PENDING
    assert "s" in sched.ready()
    assert "b" not in sched.ready()


def test_soft_dependency_waits_for_terminal_state(graph: Plan) -> None:
    sched = _sched(graph)
    sched.set("a", OpState.RUNNING)
    assert sched.blocked() == []
    assert "s" not in sched.ready()
    for state in OP_TERMINAL:
        s = _sched(graph, a=state)
        s.blocked()
        assert "s" in s.ready(), state


def test_soft_then_hard_chain(graph: Plan) -> None:
    sched = _sched(graph, a=OpState.FAILED)
    sched.blocked()
    sched.set("s", OpState.FAILED)
    blocked = {op for op, _, _ in sched.blocked()}
    assert blocked == {"s2"}
    assert sched.states["s2"] is OpState.SKIPPED


def test_on_failure_continue_keeps_independent_branches(graph: Plan) -> None:
    sched = _sched(graph)
    sched.set("a", OpState.FAILED)
    sched.blocked()
    assert "x" in sched.ready()
    assert sched.states["x"] is OpState.PENDING


def test_on_failure_stop_cancels_pending(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(
        catalog,
        srv("a"),
        srv("b", deps=["a"]),
        srv("x"),
        srv("y", deps=[soft("a")]),
        on_failure="stop",
    )
    sched = DagScheduler(plan, {"x": OpState.RUNNING})
    sched.set("a", OpState.FAILED)
    assert sched.ready() == []
    blocked = {op: state for op, state, _ in sched.blocked()}
    assert blocked == {"b": OpState.CANCELLED, "y": OpState.CANCELLED}
    assert sched.states["x"] is OpState.RUNNING  # in flight: left alone
    sched.set("x", OpState.COMPLETED)
    assert sched.all_terminal()
    assert sched.outcome(cancelled=False) is WorkflowState.FAILED


def test_on_failure_continue_does_not_stop(catalog: dict[str, TaskservSpec]) -> None:
    plan = plan_of(catalog, srv("a"), srv("x"), srv("y", deps=["x"]))
    sched = DagScheduler(plan, {})
    sched.set("a", OpState.FAILED)
    sched.set("x", OpState.COMPLETED)
    assert not sched.stopped
    assert sched.ready() == ["y"]


def test_states_are_restored_from_mapping(graph: Plan) -> None:
    sched = DagScheduler(graph, {"a": OpState.COMPLETED, "b": OpState.COMPLETED})
    assert sched.states["c"] is OpState.PENDING
    assert "c" in sched.ready()
    assert "a" not in sched.ready()


def test_outcome(graph: Plan) -> None:
    done = {op: OpState.COMPLETED for op in graph.operations}
    assert DagScheduler(graph, done).outcome(cancelled=False) is WorkflowState.COMPLETED
    assert DagScheduler(graph, done).outcome(cancelled=True) is WorkflowState.CANCELLED
    for bad in (OpState.FAILED, OpState.SKIPPED, OpState.CANCELLED):
        states = {**done, "c": bad}
        assert DagScheduler(graph, states).outcome(cancelled=False) is WorkflowState.FAILED


def test_full_run_reaches_all_terminal(graph: Plan) -> None:
    sched = _sched(graph)
    order: list[str] = []
    while not sched.all_terminal():
        sched.blocked()
        ready = sched.ready()
        if not ready:
            break
        for op in ready:
            order.append(op)
            sched.set(op, OpState.FAILED if op == "b" else OpState.COMPLETED)
    sched.blocked()
    assert sched.all_terminal()
    assert sched.states["c"] is OpState.SKIPPED
    assert sched.states["s2"] is OpState.COMPLETED
    assert order.index("a") < order.index("b")
    assert order.index("a") < order.index("s") < order.index("s2")
    assert "c" not in order
    assert sched.outcome(cancelled=False) is WorkflowState.FAILED


# ---- split_quota -------------------------------------------------------------------


def _check_quota(limit: int, wants: dict[str, int]) -> dict[str, int]:
    quota = split_quota(limit, wants)
    assert set(quota) == set(wants)
    assert sum(quota.values()) <= limit
    assert sum(quota.values()) == min(limit, sum(max(0, w) for w in wants.values()))
    for op, q in quota.items():
        assert 0 <= q <= max(0, wants[op]), (op, q, wants)
    # fair: anyone short of its want has at least as much as anyone else, minus one
    short = [op for op in wants if quota[op] < wants[op]]
    for op in short:
        for other in wants:
            assert quota[other] <= quota[op] + 1, (limit, wants, quota)
    return quota


def test_split_quota_examples() -> None:
    assert _check_quota(10, {"a": 1, "b": 100, "c": 100}) in (
        {"a": 1, "b": 5, "c": 4},
        {"a": 1, "b": 4, "c": 5},
    )
    assert _check_quota(10, {"a": 2, "b": 3}) == {"a": 2, "b": 3}
    assert _check_quota(9, {"a": 9, "b": 9, "c": 9}) == {"a": 3, "b": 3, "c": 3}
    assert _check_quota(0, {"a": 5}) == {"a": 0}
    assert _check_quota(5, {"a": 0, "b": 10}) == {"a": 0, "b": 5}
    assert _check_quota(5, {}) == {}
    assert sorted(_check_quota(2, {"a": 5, "b": 5, "c": 5}).values()) == [0, 1, 1]


def test_split_quota_random() -> None:
    rng = random.Random(11)
    for _ in range(500):
        wants = {f"op{i}": rng.randint(0, 30) for i in range(rng.randint(1, 8))}
        _check_quota(rng.randint(0, 80), wants)


# ---- rollback_order and downstream ---------------------------------------------------


def test_rollback_order_is_reverse_waves(graph: Plan) -> None:
    order = rollback_order(graph)
    assert order == [list(w) for w in reversed(graph.waves)]
    position = {op: i for i, wave in enumerate(order) for op in wave}
    for op_id, op in graph.operations.items():
        for dep in op.spec.dependencies:
            assert position[dep.on] > position[op_id]


def test_rollback_order_subset_drops_empty_waves(graph: Plan) -> None:
    order = rollback_order(graph, {"a", "c"})
    assert order == [["c"], ["a"]]
    assert rollback_order(graph, []) == []


def test_downstream(graph: Plan) -> None:
    assert downstream(graph, "a") == {"a", "b", "c", "s", "s2"}
    assert downstream(graph, "b") == {"b", "c"}
    assert downstream(graph, "s") == {"s", "s2"}
    assert downstream(graph, "x") == {"x"}
    assert downstream(graph, "c") == {"c"}
