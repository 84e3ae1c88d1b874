"""One ``provisioning up --sandbox`` per session, on free ports and a temporary data dir,
stopped with ``provisioning down`` at the end (and, should that fail, by the process
group and pids that ``up`` recorded: never ``ray stop``, which would stop every Ray
instance on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"Completed", "Failed", "Cancelled", "RolledBack", "RollbackFailed"}
P = "/v1/workflows/batch"


def local_workflow(name: str, prefix: str, servers: int) -> dict[str, Any]:
    """A JSON workflow of ``servers`` local servers named ``<prefix>-<i>``."""
    configs = [{"name": f"{prefix}-{i}", "plan": "local", "zone": "local"} for i in range(servers)]
    op = {"id": "servers", "type": "server_batch", "provider": "local", "server_configs": configs}
    return {"name": name, "operations": [op]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    data_dir: Path
    api_url: str
    upcloud_url: str
    env: dict[str, str]
    token: str

    def cli(
        self, *args: str | Path, timeout: float = 180, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api.cli", *map(str, args)],
            cwd=REPO,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def http(self, token: str | None = "default") -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.api_url, headers=headers, timeout=60)

    def wait(self, wid: str, timeout: float = 180, until: set[str] = TERMINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.http() as c:
            while True:
                doc = c.get(f"{P}/{wid}").json()
                if doc["status"] in until:
                    return doc  # type: ignore[no-any-return]
                assert time.monotonic() < deadline, f"{wid} still {doc['status']}"
                time.sleep(0.3)

    def emulator(self, method: str, path: str, body: Any = None) -> Any:
        from runtime.sandbox.upcloud_emulator import DEFAULT_PASSWORD, DEFAULT_USERNAME

        auth = (DEFAULT_USERNAME, DEFAULT_PASSWORD)
        resp = httpx.request(method, self.upcloud_url + path, json=body, auth=auth, timeout=30)
        resp.raise_for_status()
        return resp.json()


def _kill_recorded(data_dir: Path) -> None:
    """The fallback when ``down`` failed: the head's process group, the recorded pids,
    the sandbox's pids, each only while it still looks like ours."""
    run = data_dir / "run"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        head = json.loads((run / "up.json").read_text())["head"]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(head["pgid"]), signal.SIGKILL)
    with contextlib.suppress(OSError):
        for line in (run / "pids").read_text().split():
            pid = int(line)
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"ray" in cmd or b"gcs_server" in cmd or b"raylet" in cmd:
                    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError, ValueError):
        for entry in json.loads((data_dir / "sandbox" / "pids.json").read_text()).values():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry['pid']}/cmdline").read_bytes()
                if str(entry["port"]).encode() in cmd:
                    os.kill(int(entry["pid"]), signal.SIGKILL)


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    # Not pytest's tmp_path: its base dir is shared with other pytest runs on the
    # machine, which prune old ones, and the service must outlive them.
    base = Path(tempfile.mkdtemp(prefix="prov-e2e-"))
    data_dir = base / "data"
    api_port, upcloud, ec2, ssh = free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISIONING_", "RAY_"))}
    env.update(
        PROVISIONING_DATA_DIR=str(data_dir),
        PROVISIONING_API_URL=f"http://127.0.0.1:{api_port}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    args = [
        "up", "--sandbox", "--port", str(api_port), "--dashboard-port", str(free_port()),
        "--upcloud-port", str(upcloud), "--ec2-port", str(ec2), "--ssh-port", str(ssh),
    ]  # fmt: skip
    started = time.monotonic()
    up = subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        print(f"\n`provisioning up --sandbox` took {time.monotonic() - started:.1f} s")
        token = (data_dir / "token").read_text().strip()
        yield Service(
            data_dir, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{upcloud}", env, token
        )
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "api.cli", "down", "--data-dir", str(data_dir)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if down.returncode != 0:
            print(f"down failed:\n{down.stdout}\n{down.stderr}")
        _kill_recorded(data_dir)
        shutil.rmtree(base, ignore_errors=True)
