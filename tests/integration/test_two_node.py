"""A real two-node Ray cluster on this machine (`ray start --head`, then a second
`ray start --address` with resources of its own): operation actors spread over both
nodes, the second node's raylet is killed mid-run, and the workflow still completes
with no item lost or done twice."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray as ray_package

from runtime.sandbox.moto_server import free_port
from tests.conftest import eventually

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))
RAYLET = str(Path(ray_package.__file__).parent / "core/src/ray/raylet/raylet")
OPS, PER_OP = 4, 25


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _pids(needle: str) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and needle in _cmdline(int(p.name))
    ]


def _cluster_pids(temp: str, port: int) -> list[int]:
    """Every process of the test's cluster: they name its temp dir or its GCS port
    (Ray binds the machine's address, whatever --node-ip-address says)."""
    own = re.compile(rf"(--address=|--gcs-address=|--gcs_server_port=)[\d.]*:?{port}\b")
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            cmd = _cmdline(int(p.name))
            if temp in cmd or own.search(cmd):
                found.append(int(p.name))
    return found


@pytest.fixture
def cluster() -> Iterator[dict[str, str]]:
    temp = tempfile.mkdtemp(prefix="r2n-", dir="/tmp")  # short: Ray's socket paths
    port, client_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    # Ray's token authentication: every process of this cluster shares one token.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **token}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={temp}",
                f"--ray-client-server-port={client_port}",
                "--include-dashboard=false",
                *common,
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [RAY, "start", f"--address={address}", '--resources={"second_node": 4}', *common],
            check=True,
            env=env,
            capture_output=True,
            timeout=120,
        )
        raylets = [p for p in _cluster_pids(temp, port) if _cmdline(p).startswith(RAYLET)]
        second = [p for p in raylets if "second_node" in _cmdline(p)]
        assert len(raylets) == 2 and len(second) == 1, [_cmdline(p)[:200] for p in raylets]
        yield {"address": address, "second_raylet": str(second[0]), **token}
    finally:
        # Stop exactly this cluster's processes, by pid (never `ray stop`: it would stop
        # every Ray instance on the machine, the test session's included).
        for pid in _cluster_pids(temp, port):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def write_workflow(path: Path) -> None:
    ops = []
    for i in range(OPS):
        servers = ", ".join(
            f'{{ name = "n{i}-{j:02d}", plan = "local", zone = "local" }}' for j in range(PER_OP)
        )
        ops.append(
            f'{{ id = "fleet{i}", type = "server_batch", provider = "local", '
            f"parallel_limit = 3, server_configs = [{servers}] }}"
        )
    path.write_text(
        '{ batch_workflow = { name = "two-node", storage_backend = "filesystem", '
        f"parallel_limit = 12, operations = [{', '.join(ops)}] }} }}"
    )


def test_losing_the_second_node_mid_run_loses_nothing(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    wf = tmp_path / "wf.ncl"
    write_workflow(wf)
    env = {
        **os.environ,
        "PROVISIONING_LOCAL_READY_DELAY": "0.4",
        "RAY_ADDRESS": "",
        "RAY_AUTH_MODE": cluster["RAY_AUTH_MODE"],
        "RAY_AUTH_TOKEN": cluster["RAY_AUTH_TOKEN"],
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "api.cli",
            "batch",
            "run",
            str(wf),
            "--json",
            "--address",
            cluster["address"],
            "--data-dir",
            str(data),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = int(cluster["second_raylet"])
    creations = data / "local" / ".creations.log"

    def made() -> int:
        return len(creations.read_text().splitlines()) if creations.exists() else 0

    def op_actor_on_second_node() -> bool:
        return any("OperationActor" in _cmdline(p) and _ppid(p) == second for p in _pids("ray::"))

    try:
        eventually(op_actor_on_second_node, timeout=120, interval=0.1)
        eventually(lambda: made() >= 10, timeout=120, interval=0.05)
        assert made() < OPS * PER_OP, "finished before the node was lost: make it slower"
        os.kill(second, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out.lstrip().startswith("{"), out[:2000]
    doc = json.loads(out)
    assert doc["status"] == "Completed"
    assert all(op["counts"] == {"Completed": PER_OP} for op in doc["operations"])
    keys = [line.split()[0] for line in creations.read_text().splitlines()]
    assert len(keys) == OPS * PER_OP and len(set(keys)) == OPS * PER_OP
    assert time.monotonic() - killed_at < 300
