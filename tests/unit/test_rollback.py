"""Rollback selection without Ray: the preview lists exactly what the engine undoes.

A forward run with fakes leaves a mix of states (created, failed create, adopted and
failed taskservs, skipped items); the preview is computed from those documents and
compared with the calls the engine's ROLLBACK then makes, step for step.
"""

from __future__ import annotations

from typing import Any

import pytest

from runtime import crashpoints, rollback
from runtime.engine import ROLLBACK, OperationRunner, RunnerContext
from runtime.errors import PermanentError
from runtime.planner import Plan
from runtime.providers.base import ServerRef
from runtime.records import ITEM, OPERATION, item_key
from runtime.states import OpState
from tests.unit.test_engine import (
    CATALOG,
    FakeHost,
    FakeProvider,
    FakeTransport,
    items_for,
    taskserv_plan,
)

Doc = dict[str, Any]
SERVERS = ["s1", "s2", "s3"]


class RecordingProvider(FakeProvider):
    def __init__(self, host: FakeHost, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self.deleted: list[str] = []

    async def delete_server(self, ref: ServerRef) -> None:
        self.deleted.append(ref.name)
        await super().delete_server(ref)


async def forward(plan: Plan) -> tuple[dict[str, Doc], dict[str, Doc], RecordingProvider]:
    """s3's create fails for good (after its intent); on s1 taskserv ``a`` was already
    installed (adopted); on s2 ``b``'s apply fails, so ``c`` is skipped."""
    host = FakeHost()
    provider = RecordingProvider(host, errors={"s3": [PermanentError("no capacity")]})
    srv = items_for(plan, "srv")
    runner = OperationRunner(
        plan.operations["srv"], srv, host, RunnerContext(provider=provider), capacity=10
    )
    assert (await runner.run()).status is OpState.FAILED
    refs = {n: ServerRef.from_dict(d["result"]) if d["result"] else None for n, d in srv.items()}
    transport = FakeTransport(host, installed={("s1", "a")}, fail_apply={("s2", "b")})
    ts = items_for(plan, "ts", by_key=True)
    ctx = RunnerContext(transports={"local": transport}, servers=refs, catalog=CATALOG)
    runner = OperationRunner(plan.operations["ts"], ts, host, ctx, capacity=10)
    await runner.run()
    assert transport.violations == []
    return srv, ts, provider


def as_docs(srv: dict[str, Doc], ts: dict[str, Doc], op_status: str = "Failed") -> dict:
    docs: dict[tuple[str, str], Doc] = {}
    for op_id, items in (("srv", srv), ("ts", ts)):
        docs[(OPERATION, op_id)] = {"id": op_id, "status": op_status}
        for name, doc in items.items():
            docs[(ITEM, item_key(op_id, name))] = doc
    return docs


async def test_preview_lists_exactly_what_the_engine_undoes() -> None:
    plan = taskserv_plan(SERVERS, ["c", "b", "a"])  # run as a, b, c (requires)
    srv, ts, provider = await forward(plan)
    assert ts["s1/a"]["adopted"] is True and ts["s2/b"]["status"] == "Failed"
    assert ts["s2/c"]["status"] == "Skipped" and ts["s3/a"]["status"] == "Skipped"

    steps = rollback.preview(plan, as_docs(srv, ts))
    # Its server is still there: the adopted s1/a has not gone anywhere yet.
    assert rollback.orphaned_adopted(plan, as_docs(srv, ts), None) == []
    assert [(s["op"], s["item"], s["action"]) for s in steps] == [
        # last wave first; each server's chain backwards; adopted s1/a left alone;
        # s2/b's apply ran (and failed), so it is uninstalled too
        ("ts", "s1/c", "uninstall"),
        ("ts", "s1/b", "uninstall"),
        ("ts", "s2/b", "uninstall"),
        ("ts", "s2/a", "uninstall"),
        ("srv", "s1", "delete_server"),
        ("srv", "s2", "delete_server"),
        ("srv", "s3", "delete_server"),  # its create had an intent: look, delete if found
    ]

    host = FakeHost()
    transport = FakeTransport(host)
    refs = {n: ServerRef.from_dict(d["result"]) if d["result"] else None for n, d in srv.items()}
    ctx = RunnerContext(transports={"local": transport}, servers=refs, catalog=CATALOG)
    undo_ts = OperationRunner(plan.operations["ts"], ts, host, ctx, capacity=1, mode=ROLLBACK)
    assert (await undo_ts.run()).status is OpState.ROLLED_BACK
    ctx = RunnerContext(provider=provider)
    undo_srv = OperationRunner(plan.operations["srv"], srv, host, ctx, capacity=1, mode=ROLLBACK)
    assert (await undo_srv.run()).status is OpState.ROLLED_BACK

    ran = [f"{server}/{name}" for server, name, step in transport.calls if step == "uninstall"]
    assert ran == [s["item"] for s in steps if s["action"] == "uninstall"]
    assert provider.deleted == ["s1", "s2"]  # s3 was looked up and not found
    assert provider.servers == {}
    touched = {n for n, d in {**srv, **ts}.items() if d["status"] == "RolledBack"}
    assert touched == {s["item"] for s in steps}
    # Nothing left to undo: a second preview is empty.
    assert rollback.preview(plan, as_docs(srv, ts)) == []
    # s1 was deleted, and the adopted s1/a (never uninstalled) with it.
    released = rollback.orphaned_adopted(plan, as_docs(srv, ts), None)
    assert [(s["op"], s["item"], s["action"]) for s in released] == [("ts", "s1/a", "release")]
    assert rollback.orphaned_adopted(plan, as_docs(srv, ts), ["srv"]) == []  # not in subset


async def test_forward_failure_without_side_effect_does_not_fail_the_rollback() -> None:
    plan = taskserv_plan(["s1"], ["a"])
    host = FakeHost()
    ts = items_for(plan, "ts")
    ts["s1/a"].update(status="Failed", error={"class": "TransportError", "message": "ssh"})
    transport = FakeTransport(host)
    ctx = RunnerContext(transports={"local": transport}, servers={"s1": None}, catalog=CATALOG)
    runner = OperationRunner(plan.operations["ts"], ts, host, ctx, capacity=1, mode=ROLLBACK)
    outcome = await runner.run()
    assert outcome.status is OpState.ROLLED_BACK and outcome.error is None
    assert transport.calls == []


async def test_failed_uninstall_fails_the_rollback_and_is_retried_next_time() -> None:
    plan = taskserv_plan(["s1"], ["a"])
    ts = items_for(plan, "ts")
    ts["s1/a"].update(status="Completed", intent={"action": "apply", "attempt": 1, "at": 0})

    class Broken(FakeTransport):
        fail = True

        async def run(
            self, server: ServerRef, script: str, env: dict[str, str], timeout: Any = None
        ) -> Any:
            result = await super().run(server, script, env, timeout)
            if script.startswith("uninstall") and self.fail:
                return type(result)(4, "", "busy")
            return result

    host = FakeHost()
    transport = Broken(host)
    servers = {"s1": ServerRef("local", "id-s1", "s1", "k-s1")}
    ctx = RunnerContext(transports={"local": transport}, servers=servers, catalog=CATALOG)
    first = OperationRunner(plan.operations["ts"], ts, host, ctx, capacity=1, mode=ROLLBACK)
    outcome = await first.run()
    assert outcome.status is OpState.FAILED and "failed to roll back" in (outcome.error or "")
    assert ts["s1/a"]["status"] == "Failed" and ts["s1/a"]["intent"]["action"] == "uninstall"
    transport.fail = False
    again = OperationRunner(plan.operations["ts"], ts, host, ctx, capacity=1, mode=ROLLBACK)
    assert (await again.run()).status is OpState.ROLLED_BACK
    assert ts["s1/a"]["status"] == "RolledBack"


def test_taskservs_on_a_deleted_server_are_released_not_run() -> None:
    plan = taskserv_plan(["s1"], ["a"])
    docs = as_docs(items_for(plan, "srv"), items_for(plan, "ts"))
    docs[(ITEM, "srv/s1")].update(status="RolledBack", intent={"action": "delete"})
    docs[(ITEM, "ts/s1/a")].update(status="Failed", intent={"action": "uninstall"})
    assert rollback.op_steps(plan, docs, "ts") == [
        {"op": "ts", "item": "s1/a", "action": "release", "server": "s1"}
    ]
    assert rollback.preview(plan, docs) == []  # nothing runs on any provider


def test_subset_covers_the_operation_and_its_dependents() -> None:
    plan = taskserv_plan(["s1"], ["a"])
    assert rollback.rollback_subset(plan, ["srv"]) == ["srv", "ts"]
    assert rollback.rollback_subset(plan, ["ts"]) == ["ts"]
    assert rollback.rollback_subset(plan, None) is None
    with pytest.raises(KeyError, match="no operation 'nope'"):
        rollback.rollback_subset(plan, ["nope"])
    docs = as_docs(items_for(plan, "srv"), items_for(plan, "ts"), op_status="Completed")
    for key in docs:
        if key[0] == ITEM:
            docs[key].update(status="Completed", result={"id": "x", "name": "s1", "key": "k"})
    only_ts = rollback.preview(plan, docs, "ts")
    assert [s["item"] for s in only_ts] == ["s1/a"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, None),
        ("after_call", ("after_call", 1, None)),
        ("during_commit:7", ("during_commit", 7, None)),
        ("after_call:2:delete", ("after_call", 2, "delete")),
    ],
)
def test_crash_point_spec(spec: str | None, expected: Any) -> None:
    assert crashpoints.parse(spec) == expected


@pytest.mark.parametrize(
    "spec", ["nowhere:1", "after_call:x", "after_call:0", "after_call:1:explode"]
)
def test_bad_crash_point_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        crashpoints.parse(spec)


def test_unarmed_crash_point_does_nothing() -> None:
    crashpoints.configure("after_call:2")
    try:
        crashpoints.crash_point("after_intent")  # another point: never counts
        crashpoints.crash_point("after_call")  # first hit of two
    finally:
        crashpoints.configure(None)
    crashpoints.crash_point("after_call")
