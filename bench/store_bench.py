"""Records per second into each store backend, one ``write`` per batch.

Every ``write`` is a durable group commit (fsync), so batch size is the lever: this
shows what the checkpoint actor gains by batching. Absolute numbers depend on the disk
and on noisy neighbours; compare the rows of one run.

    .venv/bin/python bench/store_bench.py [--records 5000] [--batches 1,100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from runtime.store import Backend, open_store
from runtime.store.base import Event, Record

BACKENDS: tuple[Backend, ...] = ("surrealdb", "filesystem")


def run(backend: Backend, records: int, batch: int) -> float:
    """Write ``records`` item documents (and one event each) in batches; return records/s."""
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        store = open_store(backend, Path(tmp))
        try:
            start = time.perf_counter()
            for first in range(0, records, batch):
                seqs = range(first + 1, min(first + batch, records) + 1)
                store.write(
                    [
                        Record("wf-bench", "item", f"op/{s}", {"state": "done", "attempt": 1})
                        for s in seqs
                    ],
                    [Event(s, "wf-bench", "item.done", {"key": f"op/{s}"}) for s in seqs],
                )
            elapsed = time.perf_counter() - start
            if len(store.load("wf-bench")) != records:
                raise SystemExit(f"{backend}: records went missing; the numbers are void")
        finally:
            store.close()
    return records / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--batches", default="1,100", help="comma-separated batch sizes")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    print(f"{args.records} records (+1 event each), one durable write per batch\n")
    print(f"{'backend':<12} {'batch':>6} {'records/s':>11}")
    for backend in BACKENDS:
        for batch in batches:
            rate = run(backend, args.records, batch)
            print(f"{backend:<12} {batch:>6} {rate:>11,.0f}", flush=True)
    print(
        "\nreproduce: .venv/bin/python bench/store_bench.py "
        f"--records {args.records} --batches {args.batches}"
    )


if __name__ == "__main__":
    main()
