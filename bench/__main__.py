"""Run the benchmarks: ``python -m bench all | quick | NAME [args...]``.

Each benchmark runs as its own process (several start their own Ray instance) and
prints its own table with the command that reproduces it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, full-size arguments, quick arguments); quick must stay under 3 minutes
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "engine": (
        "engine_compare.py",
        [],
        ["--waves", "5", "--items", "400", "--prefect-items", "20"],
    ),
    "plan": ("plan_bench.py", [], ["--servers", "1000", "--repeat", "1"]),
    "store": ("store_bench.py", [], ["--records", "2000"]),
    "throttle": ("throttle_bench.py", [], ["--n", "100", "--burst", "20", "--rate", "20"]),
    "latency": ("latency_bench.py", [], ["--n", "100", "--limit", "50", "--delay", "1"]),
    "recovery": ("recovery_bench.py", [], ["--items", "200"]),
    "api": ("api_bench.py", [], ["--requests", "200"]),
    "memory": ("memory_bench.py", [], ["--workflows", "5"]),
    "coalesce": ("coalesce_bench.py", [], ["--n", "80", "--limits", "80,10"]),
}
QUICK = ["engine", "plan", "throttle", "latency"]


def run(name: str, args: list[str]) -> int:
    script = HERE / BENCHMARKS[name][0]
    if not script.exists():
        print(f"== {name}: {script.name} is not there yet; skipped")
        return 0
    print(f"== {name}: {' '.join([script.name, *args])}", flush=True)
    started = time.monotonic()
    module = f"bench.{script.stem}"
    rc = subprocess.call([sys.executable, "-m", module, *args], cwd=HERE.parent)
    print(f"== {name}: exit {rc} after {time.monotonic() - started:.0f} s\n", flush=True)
    return rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(BENCHMARKS))
        return 0
    what, rest = argv[0], argv[1:]
    if what == "all":
        return max(run(n, spec[1]) for n, spec in BENCHMARKS.items())
    if what == "quick":
        return max(run(n, BENCHMARKS[n][2]) for n in QUICK)
    if what not in BENCHMARKS:
        print(f"unknown benchmark {what!r}; one of: all, quick, {', '.join(BENCHMARKS)}")
        return 2
    return run(what, rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
