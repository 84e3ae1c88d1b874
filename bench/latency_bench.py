"""Latency-bound makespan: N servers on the UpCloud emulator that take DELAY seconds
from maintenance to started, with ``parallel_limit = LIMIT``, against the ideal
``ceil(N / LIMIT) * DELAY``. The provider pool's rate limit is lifted so that only
latency binds.

    .venv/bin/python -m bench latency [--n 500] [--limit 50] [--delay 2]
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def workflow(n: int, limit: int) -> dict[str, Any]:
    configs = [{"name": f"lat-{i:04d}", "plan": "1xCPU-1GB", "zone": "de-fra1"} for i in range(n)]
    op = {"id": "fleet", "type": "server_batch", "provider": "upcloud", "server_configs": configs}
    return {
        "batch_workflow": {
            "name": "latency-bench",
            "storage_backend": "filesystem",
            "parallel_limit": limit,
            "operations": [op],
        }
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--delay", type=float, default=2.0)
    ap.add_argument("--poll", type=float, default=0.1)
    args = ap.parse_args()

    from actors import runner
    from runtime.sandbox.launcher import Sandbox, SandboxPorts
    from runtime.sandbox.moto_server import free_port
    from runtime.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    ports = SandboxPorts(upcloud=free_port(), ec2=free_port(), ssh=free_port())
    sandbox = Sandbox(data, ports, ready_delay=args.delay).start()
    try:
        env = {**sandbox.env(), "PROVISIONING_RATE_UPCLOUD": "rate=100000,burst=100000"}
        settings = replace(
            Settings.from_env({}).with_data_dir(data), provider_env=env, poll_interval=args.poll
        )
        runner.connect(None)
        orch = runner.start_orchestrator(settings, detached=False, resume=False)
        start = time.perf_counter()
        doc = runner.run_foreground(orch, workflow(args.n, args.limit), poll=0.2)
        total = time.perf_counter() - start
        op = runner.call(orch.get, doc["id"])["operations"][0]
        makespan = op["finished_at"] - op["started_at"]
        runner.shutdown()
    finally:
        sandbox.stop()
        shutil.rmtree(data, ignore_errors=True)

    ideal = math.ceil(args.n / args.limit) * args.delay
    print(
        f"\nlatency-bound makespan: {args.n} UpCloud servers (emulator), ready after "
        f"{args.delay:g} s, parallel_limit {args.limit}, status polls every {args.poll:g} s"
    )
    print(f"{'ideal ceil(N/limit)*delay':<28} {ideal:>9.2f} s")
    print(f"{'operation makespan':<28} {makespan:>9.2f} s   ({makespan / ideal:.3f} x ideal)")
    print(f"{'submit to end':<28} {total:>9.2f} s")
    print(f"{'status':<28} {doc['status']:>9}   counts {op['counts']}")
    print(
        f"\nreproduce: .venv/bin/python -m bench latency --n {args.n} --limit {args.limit} "
        f"--delay {args.delay:g}"
    )


if __name__ == "__main__":
    main()
