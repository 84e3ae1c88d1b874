"""kill -9 of the whole orchestrator at each boundary of the durability protocol, then
``provisioning batch run --resume``: nothing lost, nothing made twice.

``PROVISIONING_CRASH_AT=<point>:<n>[:<action>]`` makes the process that reaches the
point for the n-th time SIGKILL its process group: the ``batch run`` driver and the
local Ray instance it started (see runtime/crashpoints.py). The test then reads the
store as it was left (offline, the lock is free once everything is dead), checks that
the provider holds nothing without a stored intent, and resumes with the variable
unset.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.recovery_bench import kill_session, load_offline, session_pids  # shared
from tests.integration.faults import (
    assert_local_invariants,
    assert_no_resource_without_intent,
    local_creations,
    local_resources,
    server_items,
)

pytestmark = pytest.mark.integration

SERVERS = 12
Doc = dict[str, Any]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "api.cli", *args]


def write_workflow(path: Path, backend: str, *, extra: str = "", ops: str = "") -> None:
    configs = ", ".join(
        f'{{ name = "c-{i:02d}", plan = "local", zone = "local" }}' for i in range(SERVERS)
    )
    path.write_text(
        f"""{{ batch_workflow = {{
  name = "crashy", storage_backend = "{backend}", parallel_limit = 3, {extra}
  operations = [
    {{ id = "fleet", type = "server_batch", provider = "local", server_configs = [{configs}] }},
    {{ id = "runtime", type = "taskserv_batch", dependencies = ["fleet"],
       taskservs = ["containerd"] }},
    {ops}
  ] }} }}
"""
    )


def base_env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROVISIONING_CRASH_AT"}
    env.update(
        {
            "RAY_ADDRESS": "",
            "PROVISIONING_DATA_DIR": str(data),
            "PROVISIONING_LOCAL_READY_DELAY": "0.1",
            **extra,
        }
    )
    return env


def session_gone(sid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not session_pids(sid):
            return True
        time.sleep(0.1)
    return False


RAY_START_TIMEOUT = "timed out during startup"  # raylet registration, 30 s in Ray


def run_until_crash(args: list[str], env: dict[str, str], log: Path, tries: int = 3) -> str:
    """Run the CLI until its crash point kills it; return the workflow id it printed.

    On this shared machine Ray itself sometimes fails to start within its fixed 30 s,
    before any workflow exists: that attempt is run again."""
    for _ in range(tries):
        with open(log, "w") as err:
            # stdout too: a run that ends without its crash prints why (its document).
            proc = subprocess.Popen(
                args, env=env, stdout=err, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            code = proc.wait(timeout=240)
            if code == 1 and RAY_START_TIMEOUT in log.read_text():
                continue
            assert code == -signal.SIGKILL, f"exit {code}, not killed: {log.read_text()[-3000:]}"
            # Everything went down with it: driver, Ray and every actor.
            assert session_gone(proc.pid), f"still alive: {session_pids(proc.pid)}"
            break
        finally:
            kill_session(proc.pid)
            proc.wait()
    match = re.search(r"workflow (wf-[0-9a-f]+)", log.read_text())
    assert match, log.read_text()[-3000:]
    return match.group(1)


def resume(wid: str, env: dict[str, str], tries: int = 3) -> Doc:
    for _ in range(tries):
        proc = subprocess.Popen(
            cli("batch", "run", "--resume", wid, "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            kill_session(proc.pid)  # Ray's agents outlive a driver that exits (NOTES.md)
            assert session_gone(proc.pid), f"still alive: {session_pids(proc.pid)}"
        if proc.returncode == 1 and RAY_START_TIMEOUT in err:
            continue
        assert proc.returncode in (0, 1), err[-3000:]
        doc: Doc = json.loads(out)
        return doc
    raise AssertionError("Ray did not start")


@pytest.mark.parametrize(
    "point, backend",
    [
        ("before_intent:5:create", "filesystem"),
        ("after_intent:5:create", "surrealdb"),
        ("after_call:5:create", "filesystem"),
        ("after_call:4:apply", "surrealdb"),
        ("during_commit:8", "filesystem"),
        ("during_commit:8", "surrealdb"),
    ],
)
def test_crash_at_a_durability_boundary_then_resume(
    tmp_path: Path, point: str, backend: str
) -> None:
    data = tmp_path / "data"
    wf = tmp_path / "wf.ncl"
    write_workflow(wf, backend)
    env = base_env(data)
    wid = run_until_crash(
        cli("batch", "run", str(wf), "--json"),
        {**env, "PROVISIONING_CRASH_AT": point},
        tmp_path / "crash.err",
    )

    docs = load_offline(data, backend, wid)
    live = local_resources(data)
    assert_no_resource_without_intent(docs, live)
    servers = server_items(docs)
    if point.startswith("after_call") and point.endswith("create"):
        # The crash made a server the store has no result for: resume must adopt it.
        assert any(d["status"] != "Completed" for d in servers.values() if d["key"] in live)
    if point.startswith("after_intent"):
        # An intent is durable for a server that was never made: resume must make it.
        assert any(d.get("intent") and d["key"] not in live for d in servers.values())

    doc = resume(wid, env)
    assert doc["id"] == wid and doc["status"] == "Completed", doc
    assert {op["id"]: op["counts"] for op in doc["operations"]} == {
        "fleet": {"Completed": SERVERS},
        "runtime": {"Completed": SERVERS},
    }
    final = load_offline(data, backend, wid)
    assert_local_invariants(data, final)
    assert sum(local_creations(data).values()) == SERVERS


def test_crash_during_rollback_on_failure_then_resume_finishes_the_rollback(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "broken.ncl").write_text(
        """{ name = "broken", requires = [], check = "false",
  apply = m%"[ "$SERVER_NAME" != "c-07" ] || exit 5"%, verify = "true", uninstall = "true" }"""
    )
    wf = tmp_path / "wf.ncl"
    broken = (
        '{ id = "broken", type = "taskserv_batch", dependencies = ["runtime"], '
        'taskservs = ["broken"], retry = { attempts = 1 } },'
    )
    write_workflow(wf, "filesystem", extra="rollback_on_failure = true,", ops=broken)
    env = base_env(data, PROVISIONING_TASKSERV_PATH=str(catalog))
    wid = run_until_crash(
        cli("batch", "run", str(wf), "--json"),
        # The third server deletion of the automatic rollback.
        {**env, "PROVISIONING_CRASH_AT": "after_call:3:delete"},
        tmp_path / "crash.err",
    )
    docs = load_offline(data, backend="filesystem", wid=wid)
    assert docs[("workflow", "")]["status"] == "RollingBack"
    live = local_resources(data)
    assert 0 < len(live) < SERVERS  # stopped half way through the deletions
    assert_no_resource_without_intent(docs, live)

    doc = resume(wid, env)
    assert doc["status"] == "RolledBack", doc
    final = load_offline(data, "filesystem", wid)
    assert_local_invariants(data, final, rolled_back=True)
    statuses = {k: d["status"] for (kind, k), d in final.items() if kind == "item"}
    assert {s for k, s in statuses.items() if k.startswith(("fleet/", "runtime/"))} == {
        "RolledBack"
    }
    assert sum(local_creations(data).values()) == SERVERS
