"""`provisioning batch run` as a user runs it: a process killed with SIGKILL mid-run,
then `--resume`d to completion, with every local server made exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import eventually

pytestmark = pytest.mark.integration

SERVERS = 40


def write_workflow(path: Path, backend: str) -> None:
    configs = ", ".join(
        f'{{ name = "r-{i:02d}", plan = "local", zone = "local" }}' for i in range(SERVERS)
    )
    path.write_text(
        f"""{{ batch_workflow = {{
  name = "resumable", storage_backend = "{backend}", parallel_limit = 4,
  operations = [
    {{ id = "fleet", type = "server_batch", provider = "local", server_configs = [{configs}] }},
    {{ id = "runtime", type = "taskserv_batch", dependencies = ["fleet"],
       taskservs = ["containerd"] }},
  ] }} }}
"""
    )


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "api.cli", *args]


@pytest.mark.parametrize("backend", ["surrealdb", "filesystem"])
def test_sigkill_then_resume_completes_without_duplicates(tmp_path: Path, backend: str) -> None:
    data = tmp_path / "data"
    wf = tmp_path / "wf.ncl"
    write_workflow(wf, backend)
    env = {
        **os.environ,
        "PROVISIONING_LOCAL_READY_DELAY": "0.25",
        "RAY_ADDRESS": "",
        "PROVISIONING_DATA_DIR": str(data),
    }
    stderr = tmp_path / "first.err"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            cli("batch", "run", str(wf), "--json"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    creations = data / "local" / ".creations.log"

    def made() -> int:
        return len(creations.read_text().splitlines()) if creations.exists() else 0

    try:
        eventually(lambda: made() >= 8, timeout=120, interval=0.05)
        assert made() < SERVERS, "the run finished before the kill: make it slower"
    finally:
        # The driver and the Ray processes it started share its process group.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    match = re.search(r"workflow (wf-[0-9a-f]+)", stderr.read_text())
    assert match, stderr.read_text()
    wid = match.group(1)

    resumed = subprocess.run(
        cli("batch", "run", "--resume", wid, "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    doc = json.loads(resumed.stdout)
    assert doc["id"] == wid and doc["status"] == "Completed"
    assert {op["id"]: op["counts"] for op in doc["operations"]} == {
        "fleet": {"Completed": SERVERS},
        "runtime": {"Completed": SERVERS},
    }
    lines = creations.read_text().splitlines()
    keys = [line.split()[0] for line in lines]
    assert len(keys) == SERVERS and len(set(keys)) == SERVERS  # no server made twice
    dirs = [p for p in (data / "local").iterdir() if p.name.startswith("r-")]
    assert len(dirs) == SERVERS
    assert all((d / "var/lib/provisioning/taskservs/containerd.installed").exists() for d in dirs)
