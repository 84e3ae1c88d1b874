"""Memory with many workflows at once: total RSS of this Ray instance and the number
of live actors while W workflows run concurrently (local servers that take a second
to be ready, then a taskserv on each).

    .venv/bin/python -m bench memory [--workflows 20] [--servers 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil


def workflow(i: int, servers: int) -> dict[str, Any]:
    configs = [{"name": f"m{i}-{j}", "plan": "local", "zone": "local"} for j in range(servers)]
    return {
        "batch_workflow": {
            "name": f"memory-{i}",
            "storage_backend": "filesystem",
            "operations": [
                {
                    "id": "servers",
                    "type": "server_batch",
                    "provider": "local",
                    "server_configs": configs,
                },
                {
                    "id": "runtime",
                    "type": "taskserv_batch",
                    "dependencies": ["servers"],
                    "taskservs": ["containerd"],
                },
            ],
        }
    }


def sample(stop: threading.Event, peaks: dict[str, float]) -> None:
    me = psutil.Process(os.getpid())
    while not stop.is_set():
        procs = [me, *me.children(recursive=True)]
        rss = actors = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                name = " ".join(p.cmdline()[:1])
            except psutil.Error:
                continue
            actors += name.startswith(("ray::WorkflowActor", "ray::OperationActor"))
        peaks["rss"] = max(peaks.get("rss", 0), rss)
        peaks["actors"] = max(peaks.get("actors", 0), actors)
        peaks["procs"] = max(peaks.get("procs", 0), len(procs))
        time.sleep(0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workflows", type=int, default=20)
    ap.add_argument("--servers", type=int, default=10)
    args = ap.parse_args()
    os.environ["PROVISIONING_MAX_LIVE_WORKFLOWS"] = str(args.workflows)
    os.environ["PROVISIONING_LOCAL_READY_DELAY"] = "1.0"

    from actors import runner
    from runtime.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    settings = replace(Settings.from_env(), data_dir=data)
    runner.connect(None)
    idle: dict[str, float] = {}
    stop = threading.Event()
    sample_once = threading.Thread(target=sample, args=(stop, idle))
    sample_once.start()
    time.sleep(0.6)
    stop.set()
    sample_once.join()

    orch = runner.start_orchestrator(settings, detached=False, resume=False)
    peaks: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop, peaks), daemon=True)
    sampler.start()
    start = time.perf_counter()
    ids = [runner.call(orch.submit, workflow(i, args.servers))["id"] for i in range(args.workflows)]
    statuses = [runner.call(orch.wait, wid, 600)["status"] for wid in ids]
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    runner.shutdown()
    shutil.rmtree(data, ignore_errors=True)

    mib = 1024 * 1024
    print(
        f"\nmemory: {args.workflows} workflows at once, each {args.servers} local servers "
        "(1 s to be ready) then containerd on each"
    )
    print(f"{'Ray instance idle (RSS)':<36} {idle['rss'] / mib:>9,.0f} MiB")
    print(f"{'peak total RSS while running':<36} {peaks['rss'] / mib:>9,.0f} MiB")
    print(f"{'peak live workflow+operation actors':<36} {peaks['actors']:>9.0f}")
    print(f"{'peak processes':<36} {peaks['procs']:>9.0f}")
    print(
        f"{'all completed':<36} {all(s == 'Completed' for s in statuses)!s:>9} in {elapsed:.1f} s"
    )
    print(
        f"\nreproduce: .venv/bin/python -m bench memory --workflows {args.workflows} "
        f"--servers {args.servers}"
    )


if __name__ == "__main__":
    main()
