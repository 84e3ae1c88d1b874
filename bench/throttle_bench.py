"""Provider pacing: N UpCloud creates against the emulator's token bucket, with the
provider pool set to the same bucket, compared with the bucket's own bound.

    .venv/bin/python bench/throttle_bench.py [--n 500] [--burst 50] [--rate 5] [--pool-rate R]

The shape defaults to EC2's bucket for mutating calls (burst 50, refill 5/s). A bucket
that starts full admits N calls no sooner than ``(N - burst) / rate`` seconds from the
first to the last; the makespan is measured by the emulator itself (its first and last
accepted create), so neither Ray start-up nor the boot wait after the last create
counts. The bench starts its own sandbox (free ports, a temporary data dir) and its
own Ray instance, and stops both. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any


def spec(n: int) -> dict[str, Any]:
    zones = ("de-fra1", "fi-hel1", "nl-ams1", "uk-lon1")
    configs = [
        {"name": f"tb-{i:04d}", "plan": "1xCPU-1GB", "zone": zones[i % len(zones)]}
        for i in range(n)
    ]
    return {
        "batch_workflow": {
            "name": "throttle-bench",
            "parallel_limit": n,
            "operations": [
                {
                    "id": "uc",
                    "type": "server_batch",
                    "provider": "upcloud",
                    "server_configs": configs,
                    # A 429 is retried after its Retry-After; the item must not run out.
                    "retry": {"attempts": 50, "initial_backoff": 0.1, "max_backoff": 2.0},
                }
            ],
        }
    }


def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url + path, data, headers, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def run(
    n: int, burst: int, rate: float, pool_rate: float, ready_delay: float, keep: bool
) -> dict[str, Any]:
    from actors import runner
    from runtime.providers.upcloud import KEY_LABEL
    from runtime.sandbox.launcher import Sandbox, SandboxPorts
    from runtime.sandbox.moto_server import free_port
    from runtime.settings import Settings

    data = Path(tempfile.mkdtemp(prefix="throttle-bench-"))
    ports = SandboxPorts(upcloud=free_port(), ec2=free_port(), ssh=free_port())
    box = Sandbox(data, ports, ready_delay=ready_delay)
    try:
        box.start()
        url = box.upcloud_url
        admin(url, "PUT", "/_admin/faults", {"rate_limit": {"rate": rate, "burst": burst}})
        limit = f"rate={pool_rate},burst={burst},concurrency={max(burst, 100)}"
        env = {**box.env(), "PROVISIONING_RATE_UPCLOUD": limit}
        settings = Settings.from_env({}).with_data_dir(data / "data")
        from dataclasses import replace

        settings = replace(settings, provider_env=env)
        runner.connect(None)
        try:
            orch = runner.start_orchestrator(settings, detached=False, resume=False)
            started = time.monotonic()
            doc = runner.run_foreground(orch, spec(n), poll=0.2)
            wall = time.monotonic() - started
            pool = _pool_stats()
            items = _item_counts(doc["id"])
        finally:
            _kill_actors()
            runner.shutdown()
        stats = admin(url, "GET", "/_admin/stats")
        servers = admin(url, "GET", "/_admin/servers")["servers"]
        per_key = Counter(s["labels"].get(KEY_LABEL) for s in servers)
    finally:
        box.stop()
        if not keep:
            shutil.rmtree(data, ignore_errors=True)
    first, last = stats["first_create_at"], stats["last_create_at"]
    return {
        "status": doc["status"],
        "wall": wall,
        "makespan": None if first is None else last - first,
        "stats": stats,
        "pool": pool,
        "items": items,
        "servers": len(servers),
        "dup_keys": sum(1 for c in per_key.values() if c > 1),
        "data": data,
    }


def _pool_stats() -> dict[str, Any]:
    import ray

    from actors.names import NAMESPACE, PROVIDER_POOL

    pool = ray.get_actor(PROVIDER_POOL, namespace=NAMESPACE)
    stats: Any = ray.get(pool.stats.remote())
    return dict(stats)


def _item_counts(wid: str) -> Counter[str]:
    import ray

    from actors.names import CHECKPOINT, NAMESPACE

    cp = ray.get_actor(CHECKPOINT, namespace=NAMESPACE)
    docs: Any = ray.get(cp.load.remote(wid))
    return Counter(d["status"] for (kind, _), d in docs.items() if kind == "item")


def _kill_actors() -> None:
    import ray

    from actors.names import NAMESPACE

    for info in ray.util.list_named_actors(all_namespaces=True):
        if info["namespace"] == NAMESPACE:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(info["name"], namespace=NAMESPACE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="servers to create")
    ap.add_argument("--burst", type=int, default=50, help="bucket size (emulator and pool)")
    ap.add_argument("--rate", type=float, default=5.0, help="refill per second (both)")
    ap.add_argument(
        "--pool-rate",
        type=float,
        default=None,
        help="the provider pool's rate, if not --rate (e.g. a little below it)",
    )
    ap.add_argument("--ready-delay", type=float, default=0.2, help="emulator create-to-started")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = ap.parse_args()
    if args.n <= args.burst:
        ap.error("--n must exceed --burst, or the bound is zero")

    pool_rate = args.rate if args.pool_rate is None else args.pool_rate
    r = run(args.n, args.burst, args.rate, pool_rate, args.ready_delay, args.keep)
    bound = (args.n - args.burst) / args.rate
    st, makespan = r["stats"], r["makespan"]
    ratio = "-" if makespan is None else f"{makespan / bound:.3f}"
    span = "-" if makespan is None else f"{makespan:.2f}"
    print(
        f"\nprovider pacing: {args.n} UpCloud creates, emulator bucket and provider pool "
        f"both burst {args.burst}, {args.rate:g}/s (pool {pool_rate:g}/s); "
        f"ready_delay {args.ready_delay:g} s"
    )
    head = ("N", "burst", "rate", "bound s", "makespan s", "ratio", "429s", "completed")
    row = (
        args.n,
        args.burst,
        f"{args.rate:g}",
        f"{bound:.2f}",
        span,
        ratio,
        st["responses_429"],
        f"{r['items'].get('Completed', 0)}/{args.n}",
    )
    print("  ".join(f"{h:>10}" for h in head))
    print("  ".join(f"{v!s:>10}" for v in row))
    pool = r["pool"].get("upcloud", {})
    print(
        f"\nworkflow {r['status']} in {r['wall']:.1f} s wall; emulator: {st['creates']} creates, "
        f"{r['servers']} servers, {r['dup_keys']} keys with more than one server, "
        f"max {st['max_mutating_in_1s']} accepted and {st['max_mutating_attempts_in_1s']} "
        f"offered mutating calls in any 1 s; pool: {pool.get('throttled_events')} throttle "
        f"events, rate now {pool.get('current_rate')}, {pool.get('waits')} waits, "
        f"{pool.get('granted_total')} permits granted, {pool.get('in_flight')} still in flight"
    )
    if args.keep:
        print(f"data dir kept: {r['data']}")
    print(
        f"\nreproduce: .venv/bin/python bench/throttle_bench.py --n {args.n} "
        f"--burst {args.burst} --rate {args.rate:g}"
        + ("" if args.pool_rate is None else f" --pool-rate {args.pool_rate:g}")
    )


if __name__ == "__main__":
    main()
