"""Provider faults from the UpCloud emulator that test_sandbox.py does not cover: 429
with Retry-After, latency spikes past the item timeout, lost replies to deletes during
a rollback. Each ends with the emulator's servers, counted by label, equal to what the
store says, and none left after a rollback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runtime.sandbox.launcher import Sandbox, SandboxPorts
from runtime.sandbox.moto_server import free_port
from tests.integration.faults import (
    assert_no_resource_without_intent,
    assert_store_matches,
    server_items,
)
from tests.integration.ray_fixtures import Orchestrator
from tests.integration.test_faults_crash import base_env, cli, load_offline, resume, run_until_crash
from tests.integration.test_sandbox import admin, emulator_keys, servers_op, workflow

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    ports = SandboxPorts(upcloud=free_port(), ec2=free_port(), ssh=free_port())
    box = Sandbox(tmp_path_factory.mktemp("sandbox"), ports, ready_delay=0.2).start()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture
def orch(orchestrator: Orchestrator, sandbox: Sandbox) -> Orchestrator:
    admin(sandbox, "POST", "/_admin/reset?servers=true")
    orchestrator.restart(replace(orchestrator.settings, provider_env=sandbox.env()))
    return orchestrator


def configs(prefix: str, n: int) -> list[dict[str, Any]]:
    zones = ("de-fra1", "fi-hel1")
    return [
        {"name": f"{prefix}-{i:02d}", "plan": "1xCPU-1GB", "zone": zones[i % 2]} for i in range(n)
    ]


def emulator_live(box: Sandbox) -> dict[str, str]:
    """key -> server uuid, asserting one server per key first."""
    keys = emulator_keys(box)
    twice = {k: n for k, n in keys.items() if n > 1}
    assert not twice, f"servers made twice on the emulator: {twice}"
    servers = admin(box, "GET", "/_admin/servers")["servers"]
    from runtime.providers.upcloud import KEY_LABEL

    return {s["labels"][KEY_LABEL]: s["uuid"] for s in servers}


def check(orch: Orchestrator, box: Sandbox, wid: str, *, rolled_back: bool = False) -> None:
    docs = orch.load(wid)
    live = emulator_live(box)
    assert_store_matches(docs, live)
    if rolled_back:
        assert live == {}
        assert {d["status"] for d in server_items(docs).values()} == {"RolledBack"}


def test_429_with_retry_after_then_lost_delete_replies_in_rollback(
    orch: Orchestrator, sandbox: Sandbox
) -> None:
    # A bucket of 2 mutating calls, refilled at 2/s: creates get 429 + Retry-After.
    admin(sandbox, "PUT", "/_admin/faults", {"rate_limit": {"rate": 2, "burst": 2}})
    retry = {"attempts": 30, "initial_backoff": 0.05, "max_backoff": 0.5}
    doc = orch.run(
        workflow(
            "throttled",
            [servers_op("uc", "upcloud", configs("t", 6), retry=retry)],
            parallel_limit=6,
        ),
        timeout=150,
    )
    assert doc["status"] == "Completed", doc
    stats = admin(sandbox, "GET", "/_admin/stats")
    assert stats["responses_429"] >= 1, stats
    check(orch, sandbox, doc["id"])

    # Every delete happens on the emulator but its reply is cut: the retry must see the
    # server gone (404) and count it deleted, not fail the rollback.
    admin(sandbox, "PUT", "/_admin/faults", {"rate_limit": None, "lost_response_rate": 1.0})
    orch.runner.call(orch.handle.rollback, doc["id"])
    done = orch.wait(doc["id"], timeout=150)
    assert done["status"] == "RolledBack", done
    stats = admin(sandbox, "GET", "/_admin/stats")
    assert stats["deletes"] >= 6 and stats["lost_responses"] >= 6, stats
    check(orch, sandbox, doc["id"], rolled_back=True)


def test_latency_spike_past_the_item_timeout(orch: Orchestrator, sandbox: Sandbox) -> None:
    # For 4 s every call takes 2.5 s against a 1 s item timeout: attempts time out,
    # while the emulator may still carry out a create the client gave up on.
    admin(sandbox, "PUT", "/_admin/faults", {"latency": 2.5})
    calm = threading.Timer(4.0, lambda: admin(sandbox, "PUT", "/_admin/faults", {"latency": 0}))
    calm.start()
    retry = {"attempts": 30, "initial_backoff": 0.2, "max_backoff": 1.0}
    spec = workflow(
        "spiky", [servers_op("uc", "upcloud", configs("l", 4), retry=retry, timeout=1.0)]
    )
    try:
        started = time.monotonic()
        doc = orch.run(spec, timeout=150)
    finally:
        calm.cancel()
    assert doc["status"] == "Completed", doc
    assert time.monotonic() - started > 3  # the spike did hold the run up
    # Each create timed out (2.5 s > 1 s) and was waited for, not sent again.
    calls = admin(sandbox, "GET", "/_admin/stats")["calls"]
    assert calls.get("POST /1.3/server") == 4, calls
    # Wait out creates still sleeping in the emulator, then count: one per key.
    time.sleep(3)
    check(orch, sandbox, doc["id"])


def test_kill_after_an_upcloud_create_then_resume_adopts_it(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """UpCloud has no idempotency token: only the reconcile step (find by label)
    keeps the resumed run from creating the crashed item's server again."""
    admin(sandbox, "POST", "/_admin/reset?servers=true")
    data = tmp_path / "data"
    wf = tmp_path / "wf.ncl"
    names = ", ".join(
        f'{{ name = "x-{i}", plan = "1xCPU-1GB", zone = "fi-hel1" }}' for i in range(6)
    )
    wf.write_text(
        f"""{{ batch_workflow = {{ name = "uc-crash", parallel_limit = 2, operations = [
  {{ id = "uc", type = "server_batch", provider = "upcloud", server_configs = [{names}] }},
] }} }}"""
    )
    env = base_env(data, **sandbox.env())
    wid = run_until_crash(
        cli("batch", "run", str(wf), "--json"),
        {**env, "PROVISIONING_CRASH_AT": "after_call:3:create"},
        tmp_path / "crash.err",
    )
    docs = load_offline(data, "surrealdb", wid)
    live = emulator_live(sandbox)
    assert_no_resource_without_intent(docs, live)
    unrecorded = [d for d in server_items(docs).values() if d["key"] in live and not d["result"]]
    assert unrecorded  # made on the emulator, its result never stored

    doc = resume(wid, env)
    assert doc["status"] == "Completed", doc
    final = load_offline(data, "surrealdb", wid)
    live = emulator_live(sandbox)  # asserts one server per label
    assert_store_matches(final, live)
    assert len(live) == 6
