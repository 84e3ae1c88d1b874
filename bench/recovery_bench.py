"""Crash recovery: a workflow of N local servers (default 1,000) run with
``provisioning batch run``, killed with SIGKILL (the whole session: driver, Ray and
every actor) once half the servers exist, then ``batch run --resume``. Reports the
time from the restart to completion and the servers made twice (must be 0).

    python -m bench.recovery_bench [--items 1000] [--backends surrealdb,filesystem]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from runtime.errors import StoreLockedError
from runtime.providers.local import CREATIONS_LOG
from runtime.store import open_store


def workflow(path: Path, items: int, backend: str, parallel: int) -> None:
    configs = ", ".join(
        f'{{ name = "r-{i:04d}", plan = "local", zone = "local" }}' for i in range(items)
    )
    path.write_text(
        f"""{{ batch_workflow = {{
  name = "recovery", storage_backend = "{backend}", parallel_limit = {parallel},
  operations = [
    {{ id = "fleet", type = "server_batch", provider = "local", server_configs = [{configs}] }},
  ] }} }}
"""
    )


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of the session the run started (ours, by session id)."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def creations(data: Path) -> Counter[str]:
    log = data / "local" / CREATIONS_LOG
    text = log.read_text() if log.exists() else ""
    return Counter(line.split()[0] for line in text.splitlines())


def load_offline(data: Path, backend: str, wid: str) -> dict[tuple[str, str], Any]:
    """The workflow's stored documents, read once the dead run's lock is free."""
    deadline = time.monotonic() + 15
    while True:
        try:
            store = open_store(backend, data)  # type: ignore[arg-type]
            break
        except StoreLockedError:
            # The kernel drops a dead owner's flock once its last file is closed.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        return store.load(wid)
    finally:
        store.close()


def stored_completed(data: Path, backend: str, wid: str) -> int:
    docs = load_offline(data, backend, wid)
    return sum(1 for (k, _), d in docs.items() if k == "item" and d["status"] == "Completed")


def one(items: int, backend: str, parallel: int, delay: float, root: Path) -> dict[str, Any]:
    data = root / backend / "data"
    wf = root / backend / "wf.ncl"
    wf.parent.mkdir(parents=True)
    workflow(wf, items, backend, parallel)
    env = {
        **os.environ,
        "RAY_ADDRESS": "",
        "PROVISIONING_DATA_DIR": str(data),
        "PROVISIONING_LOCAL_READY_DELAY": str(delay),
    }
    cli = [sys.executable, "-m", "api.cli", "batch", "run"]
    err_path = root / backend / "first.err"
    with open(err_path, "w") as err:
        first = subprocess.Popen(
            [*cli, str(wf), "--json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        while sum(creations(data).values()) < items // 2:
            if first.poll() is not None:
                raise RuntimeError(f"the run ended before the kill: {err_path.read_text()[-2000:]}")
            time.sleep(0.01)
    finally:
        kill_session(first.pid)
        first.wait()
    made_at_kill = sum(creations(data).values())
    match = re.search(r"workflow (wf-[0-9a-f]+)", err_path.read_text())
    if not match:
        raise RuntimeError(err_path.read_text()[-2000:])
    wid = match.group(1)
    stored_at_kill = stored_completed(data, backend, wid)

    started = time.monotonic()
    second = subprocess.Popen(
        [*cli, "--resume", wid, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err_text = second.communicate(timeout=1800)
    finally:
        elapsed = time.monotonic() - started
        kill_session(second.pid)
    if second.returncode != 0:
        raise RuntimeError(err_text[-3000:])
    doc = json.loads(out)
    made = creations(data)
    dirs = sum(1 for p in (data / "local").iterdir() if not p.name.startswith("."))
    return {
        "backend": backend,
        "items": items,
        "created_at_kill": made_at_kill,
        "stored_done_at_kill": stored_at_kill,
        "restart_to_done_s": round(elapsed, 1),
        "status": doc["status"],
        "servers": dirs,
        "duplicates": sum(n - 1 for n in made.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--backends", default="surrealdb,filesystem")
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--ready-delay", type=float, default=0.1)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recovery-bench-") as tmp:
        for backend in args.backends.split(","):
            rows.append(one(args.items, backend, args.parallel, args.ready_delay, Path(tmp)))
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(widths[c]) for c in cols))
    print(
        "\nrestart_to_done_s: from `batch run --resume` starting (a new Ray instance "
        "included) to its exit with the workflow Completed."
    )
    print(
        f"reproduce: python -m bench.recovery_bench --items {args.items} "
        f"--backends {args.backends} --parallel {args.parallel} "
        f"--ready-delay {args.ready_delay}"
    )
    bad = [
        r
        for r in rows
        if r["duplicates"] or r["status"] != "Completed" or r["servers"] != r["items"]
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
