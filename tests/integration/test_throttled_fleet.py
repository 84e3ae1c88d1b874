"""A 200-server mixed fleet against a provider that throttles, paced by the provider pool.

The UpCloud emulator answers mutating calls beyond a token bucket (burst 20, 10/s) with
429 and Retry-After; the orchestrator's provider pool is given the same bucket through
``PROVISIONING_RATE_UPCLOUD``. What the provider saw is read from the emulator's own
accounting (``/_admin/stats``) and from moto, never from the orchestrator's records.

A token bucket of burst ``b`` and rate ``r`` admits at most ``b + r`` calls in any
1 s window. The emulator enforces that on what it accepts, so ``max_mutating_in_1s``
alone proves nothing about us; ``max_mutating_attempts_in_1s`` counts what the client
*offered* (429s included), and only the pool keeps that near ``b + r``. A first phase
without the pool's limit shows the same workload offered far more, and got 429s.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from runtime.sandbox.launcher import Sandbox
from runtime.sandbox.moto_server import MotoServer
from tests.integration.ray_fixtures import Orchestrator
from tests.integration.test_sandbox import (
    _ports,
    admin,
    emulator_keys,
    items,
    moto_keys,
    servers_op,
    workflow,
)

pytestmark = pytest.mark.integration

RATE, BURST = 10, 20
# What reaches the emulator in a 1 s window was granted by the pool over 1 s plus the
# spread of client-side latency; half a second of the rate covers that spread.
OFFERED_BOUND = BURST + RATE + RATE // 2
RETRY = {"attempts": 30, "initial_backoff": 0.1, "max_backoff": 1.0}
ZONES = ("de-fra1", "fi-hel1")  # AWS: eu-central-1 and eu-north-1


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path_factory.mktemp("sandbox"), _ports(), ready_delay=0.1).start()
    try:
        yield box
    finally:
        box.stop()


def fresh_provider_side(box: Sandbox) -> None:
    """No servers, counters at zero, and the emulator's 429 bucket switched on."""
    admin(box, "POST", "/_admin/reset?servers=true")  # also resets faults
    MotoServer(box.ports.ec2).reset()
    admin(box, "PUT", "/_admin/faults", {"rate_limit": {"rate": RATE, "burst": BURST}})


def restart_with_pool(orch: Orchestrator, box: Sandbox, upcloud_limit: str) -> None:
    """Restart the orchestrator with ``PROVISIONING_RATE_UPCLOUD=upcloud_limit``.

    The provider pool is detached and found again by name, so a restarted orchestrator
    would keep the old pool and its old limits: kill it so the new limits apply.
    """
    import ray

    from actors.names import NAMESPACE, PROVIDER_POOL

    try:
        ray.kill(ray.get_actor(PROVIDER_POOL, namespace=NAMESPACE))
    except ValueError:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            ray.get_actor(PROVIDER_POOL, namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.05)
    env = {**box.env(), "PROVISIONING_RATE_UPCLOUD": upcloud_limit}
    orch.restart(replace(orch.settings, provider_env=env))


def pool_stats() -> dict[str, Any]:
    import ray

    from actors.names import NAMESPACE, PROVIDER_POOL

    pool = ray.get_actor(PROVIDER_POOL, namespace=NAMESPACE)
    stats: Any = ray.get(pool.stats.remote())
    return dict(stats)


def configs(prefix: str, n: int, plan: str) -> list[dict[str, Any]]:
    return [{"name": f"{prefix}-{i:03d}", "plan": plan, "zone": ZONES[i % 2]} for i in range(n)]


def test_fleet_under_provider_throttling_is_paced_by_the_pool(
    orchestrator: Orchestrator, sandbox: Sandbox
) -> None:
    orch = orchestrator

    # Phase 1, the contrast: no pool limit for UpCloud. The same kind of workload offers
    # far more than the bucket takes, and the provider pushes back.
    fresh_provider_side(sandbox)
    restart_with_pool(orch, sandbox, "rate=inf,burst=1000000,concurrency=none")
    spec = workflow(
        "unpaced",
        [servers_op("uc", "upcloud", configs("free", 60, "1xCPU-1GB"), retry=RETRY)],
        parallel_limit=200,
    )
    doc = orch.run(spec, timeout=120)
    assert doc["status"] == "Completed", doc
    unpaced = admin(sandbox, "GET", "/_admin/stats")
    assert unpaced["responses_429"] >= 10, unpaced
    assert unpaced["max_mutating_attempts_in_1s"] > OFFERED_BOUND, unpaced

    # Phase 2: 120 UpCloud + 80 AWS servers, the pool set to the provider's own bucket.
    fresh_provider_side(sandbox)
    restart_with_pool(orch, sandbox, f"rate={RATE},burst={BURST},concurrency=100")
    upcloud = configs("uc", 120, "1xCPU-1GB")
    aws = configs("ec2", 80, "1xCPU-2 GB")
    spec = workflow(
        "paced",
        [
            servers_op("uc", "upcloud", upcloud, retry=RETRY),
            servers_op("aws", "aws", aws, retry=RETRY),
        ],
        parallel_limit=200,
    )
    started = time.monotonic()
    doc = orch.run(spec, timeout=150)
    elapsed = time.monotonic() - started
    stored = items(orch, doc["id"])
    errors = {k: d["error"] for k, d in stored.items() if d["status"] != "Completed"}
    assert doc["status"] == "Completed", (doc, errors)
    assert len(stored) == 200 and not errors

    # Exactly one server per key on each provider.
    uc_keys = {d["key"] for k, d in stored.items() if k.startswith("uc/")}
    aws_keys = {d["key"] for k, d in stored.items() if k.startswith("aws/")}
    assert len(uc_keys) == 120 and len(aws_keys) == 80
    assert emulator_keys(sandbox) == Counter(dict.fromkeys(uc_keys, 1))
    assert moto_keys(sandbox) == Counter(dict.fromkeys(aws_keys, 1))

    stats = admin(sandbox, "GET", "/_admin/stats")
    assert stats["creates"] == 120, stats
    # The provider's accounting: never more than its bucket allows in any 1 s...
    assert stats["max_mutating_in_1s"] <= BURST + RATE, stats
    # ...and, what only the pool brings about, hardly more was ever offered: the
    # client's pace stayed at the bucket's, so 429s were rare (the pool's bucket and
    # the provider's run in step, and a call that travels faster than the first one
    # can arrive a few ms early) instead of the flood of phase 1.
    assert stats["max_mutating_attempts_in_1s"] <= OFFERED_BOUND, stats
    assert stats["responses_429"] <= 5, stats
    # Paced, not stalled: 120 creates take (120 - burst) / rate = 10 s at best.
    makespan = stats["last_create_at"] - stats["first_create_at"]
    assert (120 - BURST) / RATE * 0.95 <= makespan <= 2 * (120 - BURST) / RATE, (makespan, stats)

    # Every permit the pool granted came back (it counts them in flight until then).
    deadline = time.monotonic() + 5
    while True:
        pool = pool_stats()
        if all(p["in_flight"] == 0 for p in pool.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert pool["upcloud"]["in_flight"] == 0 and pool["aws"]["in_flight"] == 0, pool
    assert pool["upcloud"]["granted_total"] >= 120, pool
    assert elapsed < 120
    print(f"unpaced: {unpaced}\npaced: {stats}\nmakespan {makespan:.2f} s, pool {pool}")
