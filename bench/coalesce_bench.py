"""Create coalescing: N identical AWS servers on moto, each item its own run_instances
versus identical configs sharing one (runtime/coalesce.py), counted call by call.

    .venv/bin/python -m bench.coalesce_bench [--n 200] [--limits 200,10] [--max-batch 50]

What runs: the engine's OperationRunner and item lifecycle in this process (what the
operation actor runs, without Ray), with the real AwsProvider against the sandbox's
moto server (a subprocess on a free port). Every EC2 call is counted at the boto3
client (``add_call_listener``). Modes: ``per-item`` (``PROVISIONING_AWS_COALESCE=off``),
``coalesced`` (``PROVISIONING_AWS_MEMBER_TAGS=0``) and ``coalesced+tags`` (the default:
also a Name/key create_tags per instance). ``limit`` is the
operation's parallel_limit: a batch can only hold items in flight together.

The bucket column is the time EC2's mutating-call bucket (burst 50, refill 5/s per
account and region, NOTES.md) needs to admit that many mutating calls, ``max(0, (calls -
burst) / rate)``; the per-item bound is the same for one call per item. moto does not
throttle, so wall times show the engine, not EC2. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

BURST, RATE = 50, 5.0  # EC2 mutating calls: bucket size, refill per second
MODES = ("per-item", "coalesced", "coalesced+tags")


class MemoryHost:
    """The ItemHost without Ray: persists into a dict, no pool permits."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    async def persist(self, item: dict[str, Any]) -> None:
        self.docs[item["key"]] = copy.deepcopy(item)
        await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        yield

    def on_throttled(self, retry_after: float | None) -> None:
        pass


def bucket_seconds(calls: int) -> float:
    return max(0.0, (calls - BURST) / RATE)


async def run_mode(endpoint: str, mode: str, n: int, limit: int, max_batch: int) -> dict[str, Any]:
    from runtime.engine import OperationRunner, RunnerContext
    from runtime.planner import build_plan
    from runtime.providers.aws import AwsProvider
    from runtime.records import idempotency_key, new_item_doc, new_workflow_id
    from runtime.sandbox.moto_server import sandbox_aws_env
    from schemas.loader import workflow_from_data

    env = sandbox_aws_env(endpoint)
    env["PROVISIONING_AWS_COALESCE"] = "off" if mode == "per-item" else str(max_batch)
    env["PROVISIONING_AWS_MEMBER_TAGS"] = "1" if mode == "coalesced+tags" else "0"
    provider = AwsProvider.from_env(environ=env, poll_interval=0.05)
    calls: Counter[str] = Counter()
    provider.add_call_listener(lambda _region, op: calls.update([op]))
    await provider.find_server("warm-up", zone="de-fra1")  # client creation, off the clock
    calls.clear()

    configs = [{"name": f"cb-{i:04d}", "plan": "1xCPU-2 GB", "zone": "de-fra1"} for i in range(n)]
    wf = workflow_from_data(
        {
            "name": "coalesce-bench",
            "parallel_limit": limit,
            "operations": [
                {
                    "id": "fleet",
                    "type": "server_batch",
                    "provider": "aws",
                    "server_configs": configs,
                }
            ],
        }
    )
    op = build_plan(wf, {}).operations["fleet"]
    wid = new_workflow_id()
    items = {
        i.name: new_item_doc("fleet", i.name, i.kind, idempotency_key(wid, "fleet", i.name))
        for i in op.items
    }
    runner = OperationRunner(op, items, MemoryHost(), RunnerContext(provider), capacity=limit)
    started = time.monotonic()
    outcome = await runner.run()
    wall = time.monotonic() - started
    await provider.close()
    run_instances = calls["RunInstances"]
    mutating = sum(c for op_name, c in calls.items() if not op_name.startswith("Describe"))
    return {
        "mode": mode,
        "limit": limit,
        "status": outcome.status.value,
        "completed": sum(1 for d in items.values() if d["status"] == "Completed"),
        "distinct": len({d["result"]["id"] for d in items.values() if d["result"]}),
        "run_instances": run_instances,
        "other_mutating": mutating - run_instances,
        "mutating": mutating,
        "describe": sum(c for op_name, c in calls.items() if op_name.startswith("Describe")),
        "wall": wall,
        "largest": (outcome.coalescing or {}).get("largest_batch", 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="identical servers to create")
    ap.add_argument(
        "--limits", default=None, help="parallel limits to try, comma-separated (default: N,10)"
    )
    ap.add_argument("--max-batch", type=int, default=50, help="instances per run_instances")
    args = ap.parse_args()
    limits = [int(x) for x in (args.limits or f"{args.n},10").split(",")]

    from runtime.sandbox.moto_server import MotoServer, free_port

    moto = MotoServer(free_port())
    moto.start()
    rows = []
    try:
        for limit in limits:
            for mode in MODES:
                moto.reset()  # each mode on an empty EC2
                rows.append(
                    asyncio.run(run_mode(moto.endpoint_url, mode, args.n, limit, args.max_batch))
                )
    finally:
        moto.stop()

    bound = bucket_seconds(args.n)
    print(
        f"\ncreate coalescing: {args.n} identical AWS servers on moto, max batch "
        f"{args.max_batch}; EC2 mutating-call bucket burst {BURST}, {RATE:g}/s; "
        f"per-item bound max(0, (N - {BURST}) / {RATE:g}) = {bound:.1f} s"
    )
    head = (
        "mode",
        "limit",
        "items",
        "run_inst",
        "other_mut",
        "mutating",
        "saved",
        "bucket s",
        "bound s",
        "describe",
        "max batch",
        "wall s",
        "completed",
    )
    widths = (15, 6, 6, 9, 10, 9, 6, 9, 8, 9, 10, 7, 10)
    print("  ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for r in rows:
        values = (
            r["mode"],
            r["limit"],
            args.n,
            r["run_instances"],
            r["other_mutating"],
            r["mutating"],
            args.n - r["mutating"],
            f"{bucket_seconds(r['mutating']):.1f}",
            f"{bound:.1f}",
            r["describe"],
            r["largest"],
            f"{r['wall']:.1f}",
            f"{r['completed']}/{args.n}" + ("" if r["distinct"] == args.n else " DUP?"),
        )
        print("  ".join(f"{v!s:>{w}}" for v, w in zip(values, widths, strict=True)))
    print(
        "\nother_mut: create_tags (coalesced+tags: one per instance, EC2 writes one tag value "
        "per call). describe: DescribeInstances/-Images, the non-mutating bucket (burst 100, "
        "20/s). RunInstances' per-instance bucket (1,000, 2/s) counts instances, the same "
        "in every mode."
    )
    print(
        f"\nreproduce: .venv/bin/python -m bench.coalesce_bench --n {args.n} "
        f"--limits {','.join(map(str, limits))} --max-batch {args.max_batch}"
    )


if __name__ == "__main__":
    main()
