"""The runtime on a real local Ray: scheduling semantics, limits, actor loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eventually
from tests.integration.ray_fixtures import Orchestrator, write_taskserv

pytestmark = pytest.mark.integration


def servers(op_id: str, names: list[str], **extra: Any) -> dict[str, Any]:
    configs = [{"name": n, "plan": "local", "zone": "local"} for n in names]
    return {
        "id": op_id,
        "type": "server_batch",
        "provider": "local",
        "server_configs": configs,
        **extra,
    }


def taskservs(op_id: str, names: list[str], deps: list[Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": op_id,
        "type": "taskserv_batch",
        "taskservs": names,
        "dependencies": deps,
        **extra,
    }


def workflow(name: str, ops: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"batch_workflow": {"name": name, "operations": ops, **extra}}


def op_status(doc: dict[str, Any]) -> dict[str, str]:
    return {op["id"]: op["status"] for op in doc["operations"]}


def items(orch: Orchestrator, wid: str) -> dict[str, dict[str, Any]]:
    return {key: d for (kind, key), d in orch.load(wid).items() if kind == "item"}


def creations(orch: Orchestrator) -> list[str]:
    log = orch.settings.local_dir / ".creations.log"
    return log.read_text().split("\n")[:-1] if log.exists() else []


def test_diamond_of_hard_dependencies_completes(orchestrator: Orchestrator) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    order_log = catalog.parent / "order.log"
    write_taskserv(catalog, "left", f'echo "left $SERVER_NAME" >> {order_log}')
    write_taskserv(catalog, "right", f'echo "right $SERVER_NAME" >> {order_log}')
    write_taskserv(catalog, "top", f'echo "top $SERVER_NAME" >> {order_log}')
    spec = workflow(
        "diamond",
        [
            servers("base", ["d-1", "d-2"]),
            taskservs("left", ["left"], ["base"]),
            taskservs("right", ["right"], ["base"]),
            taskservs("top", ["top"], ["left", "right"]),
        ],
    )
    doc = orchestrator.run(spec)
    assert doc["status"] == "Completed", doc
    assert set(op_status(doc).values()) == {"Completed"}
    lines = order_log.read_text().splitlines()
    assert len(lines) == 6
    # "top" runs only after both branches finished on every server.
    first_top = min(i for i, ln in enumerate(lines) if ln.startswith("top"))
    assert all(not ln.startswith("top") for ln in lines[:4]) and first_top == 4
    assert len(creations(orchestrator)) == 2


def test_soft_dependency_runs_after_failure_and_hard_dependent_is_skipped(
    orchestrator: Orchestrator,
) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    write_taskserv(catalog, "broken", 'echo "disk full on $SERVER_NAME" >&2; exit 1')
    write_taskserv(catalog, "cleanup", "true")
    write_taskserv(catalog, "next", "true")
    spec = workflow(
        "soft",
        [
            servers("base", ["s-1"]),
            taskservs("broken", ["broken"], ["base"], retry={"attempts": 1}),
            taskservs("hard_after", ["next"], ["broken"]),
            taskservs("soft_after", ["cleanup"], [{"on": "broken", "kind": "soft"}, "base"]),
        ],
    )
    doc = orchestrator.run(spec)
    assert doc["status"] == "Failed"
    assert op_status(doc) == {
        "base": "Completed",
        "broken": "Failed",
        "hard_after": "Skipped",
        "soft_after": "Completed",
    }
    broken = next(op for op in doc["operations"] if op["id"] == "broken")
    assert "s-1/broken" in broken["error"] and "disk full on s-1" in broken["error"]
    assert "broken" in doc["error"]


@pytest.mark.parametrize("tolerated, expected", [(1, "Completed"), (0, "Failed")])
def test_failure_on_one_server_within_and_beyond_tolerance(
    orchestrator: Orchestrator, tolerated: int, expected: str
) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    write_taskserv(catalog, "picky", '[ "$SERVER_NAME" != "t-2" ] || exit 3')
    write_taskserv(catalog, "after", "true", requires=("picky",))
    spec = workflow(
        "tolerance",
        [
            servers("base", ["t-1", "t-2", "t-3"]),
            taskservs(
                "install",
                ["after", "picky"],
                ["base"],
                tolerated_failures=tolerated,
                retry={"attempts": 1},
            ),
        ],
    )
    doc = orchestrator.run(spec)
    install = next(op for op in doc["operations"] if op["id"] == "install")
    assert install["status"] == expected
    stored = items(orchestrator, doc["id"])
    assert stored["install/t-2/picky"]["status"] == "Failed"
    assert "exited 3" in stored["install/t-2/picky"]["error"]["message"]
    # The rest of t-2's chain is skipped in both cases.
    assert stored["install/t-2/after"]["status"] == "Skipped"
    others = {stored[f"install/{s}/after"]["status"] for s in ("t-1", "t-3")}
    if tolerated:
        assert others == {"Completed"}  # within budget, the other servers went on
        assert doc["status"] == "Completed"
    else:
        assert doc["status"] == "Failed"
        assert "install" in doc["error"] and "t-2/picky" in doc["error"]


def test_parallel_limit_is_never_exceeded_across_operations(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    spans = tmp_path / "spans.log"
    body = (
        f'echo "start $(date +%s.%N)" >> {spans}; sleep 0.3; echo "end $(date +%s.%N)" >> {spans}'
    )
    write_taskserv(catalog, "slow_a", body)
    write_taskserv(catalog, "slow_b", body)
    names_a = [f"a-{i}" for i in range(8)]
    names_b = [f"b-{i}" for i in range(8)]
    spec = workflow(
        "limits",
        [
            servers("servers_a", names_a),
            servers("servers_b", names_b),
            # Two independent branches run at the same time and share the workflow's limit.
            taskservs("install_a", ["slow_a"], ["servers_a"]),
            taskservs("install_b", ["slow_b"], ["servers_b"]),
        ],
        parallel_limit=3,
    )
    doc = orchestrator.run(spec)
    assert doc["status"] == "Completed"
    events = []
    for line in spans.read_text().splitlines():
        kind, ts = line.split()
        events.append((float(ts), 1 if kind == "start" else -1))
    in_flight = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        in_flight += delta
        peak = max(peak, in_flight)
    assert len(events) == 32
    assert peak <= 3
    assert peak >= 2  # the limit is shared, not serialised


def test_operation_actor_killed_mid_run_is_recreated(orchestrator: Orchestrator) -> None:
    import ray

    from actors.names import NAMESPACE, operation_actor

    names = [f"k-{i:02d}" for i in range(30)]
    spec = workflow("killed", [servers("fleet", names)], parallel_limit=5)
    # Local servers take 0.3 s to be ready here, so the kill lands mid-operation.
    from dataclasses import replace

    from actors import runner

    orchestrator.settings = replace(orchestrator.settings, local_ready_delay=0.3)
    ray.kill(orchestrator.handle)
    eventually(lambda: _gone("orchestrator"))
    orchestrator.handle = runner.start_orchestrator(
        orchestrator.settings, detached=False, resume=False
    )
    wid = orchestrator.submit(spec)
    actor_name = operation_actor(wid, "fleet")

    def some_done() -> bool:
        done = orchestrator.get(wid)["operations"][0]["counts"].get("Completed", 0)
        return 5 <= done < 25

    eventually(some_done, timeout=60, interval=0.05)
    ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE))
    doc = orchestrator.wait(wid, timeout=120)
    assert doc["status"] == "Completed"
    assert doc["operations"][0]["counts"] == {"Completed": 30}
    made = creations(orchestrator)
    assert len(made) == 30 and len(set(made)) == 30  # no server created twice


def _gone(name: str) -> bool:
    import ray

    from actors.names import NAMESPACE

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def test_cancel_stops_starting_items(orchestrator: Orchestrator) -> None:
    catalog = orchestrator.settings.taskserv_path[0]
    write_taskserv(catalog, "sleepy", "sleep 0.5")
    names = [f"c-{i}" for i in range(12)]
    spec = workflow(
        "cancel",
        [servers("base", names), taskservs("slow", ["sleepy"], ["base"])],
        parallel_limit=2,
    )
    wid = orchestrator.submit(spec)
    eventually(lambda: orchestrator.get(wid)["operations"][1]["status"] == "Running", timeout=60)
    orchestrator.runner.call(orchestrator.handle.cancel, wid)
    doc = orchestrator.wait(wid, timeout=60)
    assert doc["status"] == "Cancelled"
    slow = doc["operations"][1]
    assert slow["status"] == "Cancelled"
    assert slow["counts"].get("Cancelled", 0) >= 6
