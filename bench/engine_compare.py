"""The same DAG shape, waves of no-op items with a full barrier between waves, in plain
asyncio (the floor), Dask's LocalCluster, Prefect 3 (local, ephemeral) and this engine
with durable checkpoints, measured in one run.

    .venv/bin/python -m bench engine [--waves 10] [--items 1000] [--prefect-items 100]

Prefect runs fewer items per wave (it manages ~30-200 tasks/s here, so 10,000 would
take minutes); items/s is the figure compared. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import time
from collections.abc import Callable

from bench.engine_bench import run_engine

Row = tuple[str, int, float]


def noop(_: int) -> None:
    return None


def run_asyncio(waves: int, items: int) -> float:
    async def item() -> None:
        await asyncio.sleep(0)

    async def main() -> float:
        start = time.perf_counter()
        for _ in range(waves):
            await asyncio.gather(*(item() for _ in range(items)))
        return time.perf_counter() - start

    return asyncio.run(main())


def run_dask(waves: int, items: int) -> float:
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.gather(client.map(noop, range(10), pure=False))  # warm the workers
        start = time.perf_counter()
        for _ in range(waves):
            client.gather(client.map(noop, range(items), pure=False))
        return time.perf_counter() - start


def run_prefect(waves: int, items: int) -> float:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral server needs more than the default 20 s to start on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect import flow, task

    @task
    def p_noop(i: int) -> None:
        return None

    @flow
    def dag(n_waves: int, n_items: int) -> None:
        for _ in range(n_waves):
            p_noop.map(range(n_items)).wait()

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dag(1, 2)  # start the ephemeral server outside the measurement
        start = time.perf_counter()
        dag(waves, items)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--waves", type=int, default=10)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--prefect-items", type=int, default=100)
    ap.add_argument("--backend", default="filesystem")
    ap.add_argument("--skip", default="", help="comma list of: dask,prefect")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows: list[Row] = []

    def measure(name: str, n: int, fn: Callable[[], float]) -> None:
        try:
            rows.append((name, n, fn()))
        except Exception as exc:  # one framework failing must not hide the others
            print(f"{name}: failed: {exc}")

    n = args.waves * args.items
    measure("plain asyncio (floor)", n, lambda: run_asyncio(args.waves, args.items))
    if "dask" not in skip:
        measure("Dask LocalCluster (2 procs)", n, lambda: run_dask(args.waves, args.items))
    if "prefect" not in skip:
        pn = args.waves * args.prefect_items
        measure("Prefect 3 (ephemeral)", pn, lambda: run_prefect(args.waves, args.prefect_items))
    from actors import runner

    runner.connect(None)
    for width in (1, 2):
        per_op = args.items // width
        total, _, engine = run_engine(args.waves, width, per_op, args.backend)
        rows.append((f"provisioning {width} op/wave, submit to end", n, total))
        rows.append((f"provisioning {width} op/wave, first op to last", n, engine))
    start_cpu = runner.actor_start_cpu()
    runner.shutdown()

    rates = {name: count / secs for name, count, secs in rows}
    print(
        f"\nengine comparison: {args.waves} waves x {args.items} no-op items, full barrier "
        "between waves (ours: instant local servers, durable checkpoints)"
    )
    print(f"{'engine':<40} {'items':>7} {'seconds':>9} {'items/s':>10}")
    for name, count, secs in rows:
        print(f"{name:<40} {count:>7} {secs:>9.2f} {count / secs:>10,.0f}")
    ours = max((r for k, r in rates.items() if k.endswith("submit to end")), default=None)
    for other in ("Dask LocalCluster (2 procs)", "Prefect 3 (ephemeral)"):
        if ours and other in rates:
            print(f"ours (submit to end, best) / {other}: {ours / rates[other]:.1f}x")
    # One new process per operation (DESIGN.md section 3): its start alone bounds the
    # rate, whatever the engine does per item.
    cores = os.cpu_count() or 1
    ceiling = n / (args.waves * start_cpu / cores)
    print(
        f"one operation actor costs {start_cpu:.2f} CPU-s to start; {args.waves} of them on "
        f"{cores} cores bound 1 op/wave to {ceiling:,.0f} items/s even at zero cost per item"
    )
    print(
        f"\nreproduce: .venv/bin/python -m bench engine --waves {args.waves} "
        f"--items {args.items} --prefect-items {args.prefect_items}"
    )


if __name__ == "__main__":
    main()
