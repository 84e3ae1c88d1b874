"""Engine throughput: a 10,000-item local workflow with durable checkpoints, beside the
same DAG shape of no-op items in plain asyncio (the floor), measured in one run.

    .venv/bin/python bench/engine_bench.py [--waves 10] [--width 2] [--servers 500]

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def spec(waves: int, width: int, servers: int, backend: str) -> dict[str, Any]:
    ops = []
    for w in range(waves):
        for j in range(width):
            configs = [
                {"name": f"w{w}o{j}-{i}", "plan": "local", "zone": "local"} for i in range(servers)
            ]
            deps = [f"w{w - 1}o{k}" for k in range(width)] if w else []
            ops.append(
                {
                    "id": f"w{w}o{j}",
                    "type": "server_batch",
                    "provider": "local",
                    "dependencies": deps,
                    "server_configs": configs,
                }
            )
    return {
        "batch_workflow": {
            "name": "engine-bench",
            "storage_backend": backend,
            "parallel_limit": 2000,
            "operations": ops,
        }
    }


async def asyncio_floor(waves: int, width: int, servers: int) -> float:
    async def item() -> None:
        await asyncio.sleep(0)

    start = time.perf_counter()
    for _ in range(waves):  # a full barrier between waves, like the workflow's
        await asyncio.gather(*(item() for _ in range(width * servers)))
    return time.perf_counter() - start


def run_engine(waves: int, width: int, servers: int, backend: str) -> tuple[float, str, float]:
    """Seconds from submit to the terminal state, the status, and seconds from the first
    operation's start to the last one's end (what the engine itself took, without
    starting the workflow's actor: the other engines are measured warm)."""
    from actors import runner
    from runtime.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    settings = Settings.from_env({}).with_data_dir(data)
    orch = runner.start_orchestrator(settings, detached=False, resume=False)
    try:
        start = time.perf_counter()
        doc = runner.run_foreground(orch, spec(waves, width, servers, backend), poll=0.05)
        elapsed = time.perf_counter() - start
        ops = runner.call(orch.get, doc["id"])["operations"]
        engine = max(o["finished_at"] for o in ops) - min(o["started_at"] for o in ops)
    finally:
        import ray

        from actors.names import CHECKPOINT, NAMESPACE, ORCHESTRATOR, PROVIDER_POOL

        for name in (ORCHESTRATOR, CHECKPOINT, PROVIDER_POOL):
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))
            except ValueError:
                pass
        time.sleep(1)
        shutil.rmtree(data, ignore_errors=True)
    return elapsed, doc["status"], engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--waves", type=int, default=10)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--servers", type=int, default=500)
    ap.add_argument("--backends", default="filesystem,surrealdb")
    args = ap.parse_args()
    n = args.waves * args.width * args.servers

    from actors import runner

    runner.connect(None)
    rows = [
        (
            "plain asyncio (floor)",
            asyncio.run(asyncio_floor(args.waves, args.width, args.servers)),
            "-",
        )
    ]
    for backend in args.backends.split(","):
        elapsed, status, engine = run_engine(args.waves, args.width, args.servers, backend)
        rows.append((f"provisioning, {backend}, submit to end", elapsed, status))
        rows.append((f"provisioning, {backend}, first op to last", engine, status))
    runner.shutdown()

    floor = rows[0][1]
    print(
        f"\nengine throughput: {n} items, {args.waves} waves x {args.width} operations x "
        f"{args.servers} local servers, instant provider"
    )
    print(f"{'engine':<38} {'seconds':>9} {'items/s':>10} {'x floor':>9}  status")
    for name, secs, status in rows:
        print(f"{name:<38} {secs:>9.2f} {n / secs:>10,.0f} {secs / floor:>9.1f}  {status}")
    print(
        f"\nreproduce: .venv/bin/python bench/engine_bench.py --waves {args.waves} "
        f"--width {args.width} --servers {args.servers}"
    )


if __name__ == "__main__":
    main()
