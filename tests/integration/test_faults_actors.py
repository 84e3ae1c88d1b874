"""``ray.kill`` of the workflow, provider-pool and checkpoint actors mid-run: the
workflow still completes, with one server per key and the store equal to the provider.
(The operation actor's kill is in test_runtime.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from tests.conftest import eventually
from tests.integration.faults import assert_local_invariants, local_creations
from tests.integration.ray_fixtures import Orchestrator
from tests.integration.test_runtime import servers, taskservs, workflow

pytestmark = pytest.mark.integration

N = 24


def spec(backend: str = "surrealdb", **extra: Any) -> dict[str, Any]:
    names = [f"k-{i:02d}" for i in range(N)]
    doc = workflow(
        "killed",
        [servers("fleet", names), taskservs("runtime", ["containerd"], ["fleet"])],
        parallel_limit=4,
        **extra,
    )
    doc["batch_workflow"]["storage_backend"] = backend
    return doc


def slow(orch: Orchestrator, **changes: Any) -> None:
    """Local servers take a while to be ready, so a kill lands mid-operation."""
    orch.restart(replace(orch.settings, local_ready_delay=0.25, **changes))


def kill_mid_run(orch: Orchestrator, wid: str, kill: Callable[[], None]) -> None:
    def partly_done() -> bool:
        done = orch.get(wid)["operations"][0]["counts"].get("Completed", 0)
        return 3 <= done < N - 6

    eventually(partly_done, timeout=90, interval=0.05)
    kill()


def finish(orch: Orchestrator, wid: str) -> None:
    doc = orch.wait(wid, timeout=180)
    assert doc["status"] == "Completed", doc
    assert {op["id"]: op["counts"] for op in doc["operations"]} == {
        "fleet": {"Completed": N},
        "runtime": {"Completed": N},
    }
    assert_local_invariants(orch.settings.data_dir, orch.load(wid))
    assert sum(local_creations(orch.settings.data_dir).values()) == N


def named(name: str) -> Any:
    import ray

    from actors.names import NAMESPACE

    return ray.get_actor(name, namespace=NAMESPACE)


@pytest.mark.parametrize("no_restart", [False, True], ids=["restarted", "recreated"])
def test_workflow_actor_killed_mid_run(orchestrator: Orchestrator, no_restart: bool) -> None:
    import ray

    from actors.names import workflow_actor

    slow(orchestrator)
    wid = orchestrator.submit(spec())
    # no_restart=False: Ray restarts it and retries the pending run(); True: it is gone
    # and the orchestrator makes a new one. Either reloads the store and carries on.
    kill_mid_run(
        orchestrator, wid, lambda: ray.kill(named(workflow_actor(wid)), no_restart=no_restart)
    )
    finish(orchestrator, wid)


def test_provider_pool_actor_killed_mid_run(orchestrator: Orchestrator) -> None:
    import ray

    from actors.names import PROVIDER_POOL

    # Local calls are unlimited by default and never ask the pool: limit them, so every
    # create holds a permit from the pool (a new pool takes the new limits).
    ray.kill(named(PROVIDER_POOL), no_restart=True)
    env = {"PROVISIONING_RATE_LOCAL": "rate=12,burst=2,concurrency=3"}
    slow(orchestrator, provider_env=env)
    wid = orchestrator.submit(spec())
    pool = named(PROVIDER_POOL)
    kill_mid_run(orchestrator, wid, lambda: ray.kill(pool, no_restart=False))
    finish(orchestrator, wid)
    stats = ray.get(named(PROVIDER_POOL).stats.remote())
    assert "local" in stats  # the restarted pool served the rest of the run


@pytest.mark.parametrize("backend", ["surrealdb", "filesystem"])
def test_checkpoint_actor_killed_mid_run(orchestrator: Orchestrator, backend: str) -> None:
    import ray

    from actors.names import CHECKPOINT

    slow(orchestrator)
    wid = orchestrator.submit(spec(backend))
    # Restarted by Ray: it takes the data dir's lock again, reopens the store, and the
    # writes that were in flight are retried on it (documents are upserts).
    kill_mid_run(orchestrator, wid, lambda: ray.kill(named(CHECKPOINT), no_restart=False))
    finish(orchestrator, wid)
