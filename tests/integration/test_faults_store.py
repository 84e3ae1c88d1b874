"""Storage faults: a full disk under the journal, a torn last journal line after a
kill, and a second orchestrator on a data dir that is in use.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.integration.faults import assert_local_invariants, local_creations
from tests.integration.ray_fixtures import Orchestrator, _kill_all_named
from tests.integration.test_faults_crash import (
    SERVERS,
    base_env,
    cli,
    kill_session,
    load_offline,
    resume,
    run_until_crash,
    session_gone,
    write_workflow,
)
from tests.integration.test_runtime import servers, workflow

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(orchestrator: Orchestrator) -> Iterator[Path]:
    """A 1 MiB tmpfs where the filesystem backend keeps its journal."""
    journal = orchestrator.settings.data_dir / "journal"
    journal.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(journal)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield journal
    finally:
        _kill_all_named()  # the checkpoint actor holds the journal open
        subprocess.run(["umount", "-l", str(journal)], check=True)


def test_full_disk_stops_the_run_with_the_cause_and_resume_finishes_it(
    orchestrator: Orchestrator, small_disk: Path
) -> None:
    orchestrator.restart(replace(orchestrator.settings, local_ready_delay=0.05))
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:  # leave a few pages: the run fills them
        fh.write(b"\0" * (1024 * 1024 - 48 * 1024))
    names = [f"d-{i:02d}" for i in range(40)]
    spec = workflow("disk", [servers("fleet", names)], parallel_limit=4)
    spec["batch_workflow"]["storage_backend"] = "filesystem"
    wid = orchestrator.submit(spec)

    doc = eventually(lambda: orchestrator.get(wid).get("halted") and orchestrator.get(wid), 90)
    assert "No space left on device" in doc["halted"], doc["halted"]
    assert "StoreError" in doc["halted"] and doc["status"] == "Running"

    filler.unlink()  # the operator frees space
    orchestrator.runner.call(orchestrator.handle.resume, wid)
    doc = orchestrator.wait(wid, timeout=120)
    assert doc["status"] == "Completed" and "halted" not in doc, doc
    assert doc["operations"][0]["counts"] == {"Completed": 40}
    assert_local_invariants(orchestrator.settings.data_dir, orchestrator.load(wid))
    assert sum(local_creations(orchestrator.settings.data_dir).values()) == 40


def test_torn_last_journal_line_after_a_kill_is_dropped_and_resume_completes(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    wf = tmp_path / "wf.ncl"
    write_workflow(wf, "filesystem")
    env = base_env(data)
    wid = run_until_crash(
        cli("batch", "run", str(wf), "--json"),
        {**env, "PROVISIONING_CRASH_AT": "after_intent:6:create"},
        tmp_path / "crash.err",
    )
    journal = data / "journal" / wid / "journal.jsonl"
    body = journal.read_bytes()
    # What a kill in the middle of an append leaves: the start of a group, cut mid-line,
    # never followed by its commit line.
    last_group = body[body.rstrip(b"\n").rfind(b'{"op":"commit"}', 0, len(body) - 20) :]
    torn = last_group.split(b"\n", 1)[1][:-40]
    assert torn and not torn.endswith(b"\n")
    journal.write_bytes(body + torn)

    doc = resume(wid, env)
    assert doc["status"] == "Completed", doc
    assert journal.read_bytes().endswith(b'{"op":"commit"}\n')  # the torn tail was cut
    assert_local_invariants(data, load_offline(data, "filesystem", wid))
    assert sum(local_creations(data).values()) == SERVERS


def test_second_orchestrator_on_the_same_data_dir_refuses_to_start(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    """The CLI exits 1 (a runtime error, as for any ProvisioningError; 2 is bad input)
    and names the data dir and the owner's pid."""
    wf = tmp_path / "wf.ncl"
    write_workflow(wf, "surrealdb")
    data = orchestrator.settings.data_dir
    proc = subprocess.Popen(
        cli("batch", "run", str(wf), "--data-dir", str(data)),
        env=base_env(data),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        kill_session(proc.pid)
        assert session_gone(proc.pid)
    assert proc.returncode == 1, err[-3000:]
    assert "is in use by another orchestrator" in err and str(data / "run") in err, err[-3000:]
    assert "Traceback" not in err, err[-4000:]
    assert not local_creations(data)  # it touched nothing
    # The first one is unaffected.
    doc = orchestrator.run(workflow("still-mine", [servers("fleet", ["o-1"])]))
    assert doc["status"] == "Completed"
