"""Rollback and redrive on a real local Ray with local servers.

Each test ends with the invariants of ``faults.py``: one server per key, the store
equal to what the provider holds, nothing left after a rollback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.faults import assert_local_invariants, local_creations, local_resources
from tests.integration.ray_fixtures import Orchestrator, write_taskserv
from tests.integration.test_runtime import servers, taskservs, workflow

pytestmark = pytest.mark.integration


def logged_taskserv(catalog: Path, name: str, log: Path, apply: str = "true", **kw: Any) -> None:
    """A taskserv whose apply and uninstall each append ``<step> <taskserv> <server>``."""
    write_taskserv(catalog, name, f'echo "apply {name} $SERVER_NAME" >> {log}\n{apply}', **kw)
    path = catalog / f"{name}.ncl"
    text = path.read_text().replace(
        'uninstall = m%"rm -f',
        f'uninstall = m%"echo uninstall {name} $SERVER_NAME >> {log}; rm -f',
    )
    path.write_text(text)


def lines(log: Path, step: str) -> list[str]:
    if not log.exists():
        return []
    return [ln.split(" ", 1)[1] for ln in log.read_text().splitlines() if ln.startswith(step)]


def as_logged(item_key: str) -> str:
    """``stack/rd-2/agent`` -> ``agent rd-2``, as the scripts log it."""
    _, server, taskserv = item_key.split("/")
    return f"{taskserv} {server}"


def item_docs(orch: Orchestrator, wid: str) -> dict[str, dict[str, Any]]:
    return {k: d for (kind, k), d in orch.load(wid).items() if kind == "item"}


def rollback(orch: Orchestrator, wid: str, operation: str | None = None) -> dict[str, Any]:
    orch.runner.call(orch.handle.rollback, wid, operation)
    return orch.wait(wid, timeout=120)


def preview(orch: Orchestrator, wid: str, operation: str | None = None) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = orch.runner.call(orch.handle.rollback_preview, wid, operation)
    return steps


def test_rollback_undoes_exactly_the_preview_in_reverse_order(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    log = tmp_path / "steps.log"
    logged_taskserv(catalog, "base", log)
    logged_taskserv(catalog, "app", log, requires=("base",))
    names = ["rb-1", "rb-2", "rb-3"]
    # rb-1 already has "base" (installed outside this workflow): it is adopted, and a
    # rollback must leave it alone.
    preinstalled = orchestrator.settings.local_dir / "rb-1/var/lib/provisioning/taskservs"
    preinstalled.mkdir(parents=True)
    (preinstalled / "base.installed").write_text("ok")
    spec = workflow(
        "rollback",
        [servers("fleet", names), taskservs("stack", ["app", "base"], ["fleet"])],
        parallel_limit=1,  # one at a time: the log order is the rollback order
    )
    doc = orchestrator.run(spec)
    wid = doc["id"]
    assert doc["status"] == "Completed"
    assert sorted(lines(log, "apply")) == [
        "app rb-1",
        "app rb-2",
        "app rb-3",
        "base rb-2",
        "base rb-3",
    ]
    assert item_docs(orchestrator, wid)["stack/rb-1/base"]["adopted"] is True

    steps = preview(orchestrator, wid)
    expected = [
        ("stack", "rb-1/app", "uninstall"),
        ("stack", "rb-2/app", "uninstall"),
        ("stack", "rb-2/base", "uninstall"),
        ("stack", "rb-3/app", "uninstall"),
        ("stack", "rb-3/base", "uninstall"),
        ("fleet", "rb-1", "delete_server"),
        ("fleet", "rb-2", "delete_server"),
        ("fleet", "rb-3", "delete_server"),
    ]
    assert [(s["op"], s["item"], s["action"]) for s in steps] == expected
    assert local_resources(orchestrator.settings.data_dir)  # a preview changes nothing

    doc = rollback(orchestrator, wid)
    assert doc["status"] == "RolledBack", doc
    assert {op["id"]: op["status"] for op in doc["operations"]} == {
        "fleet": "RolledBack",
        "stack": "RolledBack",
    }
    # Each server's chain backwards; the adopted rb-1/base never uninstalled.
    assert lines(log, "uninstall") == ["app rb-1", "app rb-2", "base rb-2", "app rb-3", "base rb-3"]
    stored = item_docs(orchestrator, wid)
    undone = {k.split("/", 1)[1] for k, d in stored.items() if d["status"] == "RolledBack"}
    # The adopted rb-1/base was never uninstalled, but its server was deleted: it went
    # with it, so it ends RolledBack too, and the counts agree with the operation.
    assert undone == {s["item"] for s in steps} | {"rb-1/base"}
    assert stored["stack/rb-1/base"]["adopted"] is True
    assert {op["id"]: op["counts"] for op in doc["operations"]} == {
        "fleet": {"RolledBack": 3},
        "stack": {"RolledBack": 6},
    }
    assert_local_invariants(
        orchestrator.settings.data_dir, orchestrator.load(wid), rolled_back=True
    )
    assert preview(orchestrator, wid) == []


def test_rollback_of_a_subtree_then_of_the_rest(orchestrator: Orchestrator, tmp_path: Path) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    log = tmp_path / "steps.log"
    logged_taskserv(catalog, "runtime", log)
    logged_taskserv(catalog, "cni", log)
    logged_taskserv(catalog, "mon", log)
    spec = workflow(
        "subtree",
        [
            servers("fleet", ["st-1", "st-2"]),
            taskservs("runtime", ["runtime"], ["fleet"]),
            taskservs("cni", ["cni"], ["runtime"]),
            taskservs("mon", ["mon"], ["fleet"]),
        ],
    )
    wid = orchestrator.run(spec)["id"]
    with pytest.raises(Exception, match="no operation 'nope'"):
        preview(orchestrator, wid, "nope")
    steps = preview(orchestrator, wid, "runtime")
    assert {(s["op"], s["action"]) for s in steps} == {
        ("cni", "uninstall"),
        ("runtime", "uninstall"),
    }
    assert [s["op"] for s in steps] == ["cni", "cni", "runtime", "runtime"]  # dependents first

    doc = rollback(orchestrator, wid, "runtime")
    assert doc["status"] == "RolledBack"
    ops = {op["id"]: op["status"] for op in doc["operations"]}
    assert ops == {
        "fleet": "Completed",
        "runtime": "RolledBack",
        "cni": "RolledBack",
        "mon": "Completed",
    }
    assert sorted(lines(log, "uninstall")) == [
        "cni st-1",
        "cni st-2",
        "runtime st-1",
        "runtime st-2",
    ]
    assert len(local_resources(orchestrator.settings.data_dir)) == 2  # servers kept
    assert_local_invariants(orchestrator.settings.data_dir, orchestrator.load(wid))

    # The rest can be rolled back afterwards; what is undone already is not redone.
    assert [(s["op"], s["action"]) for s in preview(orchestrator, wid)] == [
        ("mon", "uninstall"),
        ("mon", "uninstall"),
        ("fleet", "delete_server"),
        ("fleet", "delete_server"),
    ]
    assert rollback(orchestrator, wid)["status"] == "RolledBack"
    assert len(lines(log, "uninstall")) == 6
    assert_local_invariants(
        orchestrator.settings.data_dir, orchestrator.load(wid), rolled_back=True
    )


def test_rollback_on_failure_starts_by_itself(orchestrator: Orchestrator, tmp_path: Path) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    log = tmp_path / "steps.log"
    logged_taskserv(catalog, "good", log)
    logged_taskserv(catalog, "bad", log, apply='[ "$SERVER_NAME" != "rf-2" ] || exit 7')
    spec = workflow(
        "auto",
        [
            servers("fleet", ["rf-1", "rf-2", "rf-3"]),
            taskservs("good", ["good"], ["fleet"]),
            taskservs("bad", ["bad"], ["good"], retry={"attempts": 1}),
        ],
        rollback_on_failure=True,
    )
    doc = orchestrator.run(spec)
    assert doc["status"] == "RolledBack", doc
    assert "rf-2" in doc["error"]  # why it rolled back stays on the workflow
    # Never Failed on the way: a client polling for the end would stop there, and a
    # crash right after it would leave the rollback undone.
    assert orchestrator.workflow_states(doc["id"]) == [
        "Pending",
        "Running",
        "RollingBack",
        "RolledBack",
    ]
    stored = item_docs(orchestrator, doc["id"])
    # rf-2/bad ran its apply (and failed): it is uninstalled like the completed ones.
    assert {k: d["status"] for k, d in stored.items()} == {
        **{f"fleet/rf-{i}": "RolledBack" for i in (1, 2, 3)},
        **{f"good/rf-{i}/good": "RolledBack" for i in (1, 2, 3)},
        **{f"bad/rf-{i}/bad": "RolledBack" for i in (1, 2, 3)},
    }
    assert sorted(lines(log, "uninstall")) == sorted(
        [f"good rf-{i}" for i in (1, 2, 3)] + [f"bad rf-{i}" for i in (1, 2, 3)]
    )
    assert_local_invariants(
        orchestrator.settings.data_dir, orchestrator.load(doc["id"]), rolled_back=True
    )


def test_redrive_reruns_only_failed_and_skipped_items(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    log = tmp_path / "steps.log"
    broken = (
        'case "$SERVER_NAME" in rd-2|rd-4) echo "no space left on $SERVER_NAME" >&2; exit 28;; esac'
    )
    logged_taskserv(catalog, "agent", log, apply=broken)
    logged_taskserv(catalog, "app", log, requires=("agent",))
    names = [f"rd-{i}" for i in range(1, 6)]
    spec = workflow(
        "redrive",
        [
            servers("fleet", names),
            taskservs(
                "stack", ["app", "agent"], ["fleet"], retry={"attempts": 1}, tolerated_failures=0
            ),
            servers("more", ["rd-9"], dependencies=["stack"]),
        ],
    )
    doc = orchestrator.run(spec)
    wid = doc["id"]
    assert doc["status"] == "Failed"
    assert {op["id"]: op["status"] for op in doc["operations"]} == {
        "fleet": "Completed",
        "stack": "Failed",
        "more": "Skipped",
    }
    first_applies = lines(log, "apply")
    before = item_docs(orchestrator, wid)
    assert before["stack/rd-2/agent"]["status"] == "Failed"
    assert before["stack/rd-2/app"]["status"] == "Skipped"
    # The budget stops the operation at the first failure beyond it: what had not
    # completed by then (failed, skipped, cancelled) is what a redrive must run again.
    stack = {as_logged(k): d["status"] for k, d in before.items() if k.startswith("stack/")}
    ran = [k for k, st in stack.items() if st in ("Completed", "Failed")]
    assert sorted(first_applies) == sorted(ran)
    redo = sorted(k for k, st in stack.items() if st != "Completed")

    logged_taskserv(catalog, "agent", log)  # the operator fixes the script
    orchestrator.runner.call(orchestrator.handle.resume, wid)
    doc = orchestrator.wait(wid, timeout=120)
    assert doc["status"] == "Completed", doc
    again = lines(log, "apply")[len(first_applies) :]
    # Only the failed items and what was skipped after them ran again.
    assert sorted(again) == redo and {"agent rd-2", "app rd-2"} <= set(again)
    assert sorted(local_creations(orchestrator.settings.data_dir).values()) == [1] * 6
    after = item_docs(orchestrator, wid)
    for key, d in before.items():
        if d["status"] == "Completed":
            assert after[key]["finished_at"] == d["finished_at"], key  # kept, not redone
    assert {d["status"] for d in after.values()} == {"Completed"}
    assert_local_invariants(orchestrator.settings.data_dir, orchestrator.load(wid))
