"""The sandbox launcher, and workflows run on real Ray against the sandbox's real servers.

The UpCloud emulator, moto and the SSH endpoint run as the processes ``up --sandbox``
starts; the orchestrator's provider adapters reach them only through ``Sandbox.env()``.
What the providers hold afterwards is read from the providers themselves (the
emulator's admin API, moto over boto3), not from the orchestrator's own records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest

from runtime.providers.aws import KEY_TAG
from runtime.providers.upcloud import KEY_LABEL
from runtime.sandbox.launcher import Sandbox, SandboxPorts
from runtime.sandbox.moto_server import MotoServer, free_port
from schemas.loader import load_workflow
from tests.integration.ray_fixtures import Orchestrator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "workflows" / "example_batch.ncl"
TASKSERVS = ("containerd", "kubernetes", "cilium")
AWS_REGIONS = ("eu-central-1", "eu-north-1")  # where "de-fra1" and "fi-hel1" lead


def _ports() -> SandboxPorts:
    return SandboxPorts(upcloud=free_port(), ec2=free_port(), ssh=free_port())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path_factory.mktemp("sandbox"), _ports(), ready_delay=0.2).start()
    pids = dict(box.pids)
    try:
        yield box
    finally:
        box.stop()
        assert not any(_alive(pid) for pid in pids.values())


def admin(box: Sandbox, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        box.upcloud_url + path, data, {"Content-Type": "application/json"}, method=method
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def emulator_keys(box: Sandbox) -> Counter[str]:
    servers = admin(box, "GET", "/_admin/servers")["servers"]
    return Counter(s["labels"].get(KEY_LABEL) for s in servers)


def moto_keys(box: Sandbox) -> Counter[str]:
    env = box.env()
    found: Counter[str] = Counter()
    for region in AWS_REGIONS:
        ec2 = boto3.client(
            "ec2",
            region_name=region,
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        live = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        for page in ec2.get_paginator("describe_instances").paginate(Filters=live):
            for inst in (i for r in page["Reservations"] for i in r["Instances"]):
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                found[tags.get(KEY_TAG)] += 1
    return found


@pytest.fixture
def orch(orchestrator: Orchestrator, sandbox: Sandbox) -> Orchestrator:
    """The test's orchestrator, its adapters pointed at a sandbox with no servers."""
    admin(sandbox, "POST", "/_admin/reset?servers=true")
    MotoServer(sandbox.ports.ec2).reset()
    orchestrator.restart(replace(orchestrator.settings, provider_env=sandbox.env()))
    return orchestrator


def items(orch: Orchestrator, wid: str) -> dict[str, dict[str, Any]]:
    return {key: d for (kind, key), d in orch.load(wid).items() if kind == "item"}


def servers_op(op_id: str, provider: str, configs: list[dict[str, Any]], **extra: Any) -> Any:
    return {
        "id": op_id,
        "type": "server_batch",
        "provider": provider,
        "server_configs": configs,
        **extra,
    }


def workflow(name: str, ops: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"batch_workflow": {"name": name, "operations": ops, **extra}}


# ---- the launcher on its own ---------------------------------------------------------


def test_sandbox_outlives_its_starter_and_is_reused_then_stopped(tmp_path: Path) -> None:
    ports = _ports()
    # A starter that exits without stopping anything, as a crashed `up --sandbox` would.
    code = (
        "import sys; from pathlib import Path; from runtime.sandbox.launcher import *; "
        f"Sandbox(Path(sys.argv[1]), SandboxPorts({ports.upcloud}, {ports.ec2}, {ports.ssh}))"
        ".start()"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=90)
    recorded = json.loads((tmp_path / "sandbox" / "pids.json").read_text())
    pids = {name: entry["pid"] for name, entry in recorded.items()}
    assert set(pids) == {"upcloud", "ec2", "ssh"} and all(map(_alive, pids.values()))

    again = Sandbox(tmp_path, ports).start()  # a second `up` after the crash reuses them
    try:
        assert again.pids == pids
        assert admin(again, "GET", "/_admin/faults")["ready_delay"] == 0.5
    finally:
        down = Sandbox.attach(tmp_path)  # what `provisioning down` does
        assert down.ports == ports and down.pids == pids
        down.stop()
    deadline = time.monotonic() + 10
    while any(map(_alive, pids.values())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, pids.values()))
    assert not (tmp_path / "sandbox" / "pids.json").exists()


def test_stop_leaves_a_recorded_pid_alone_once_it_is_another_process(tmp_path: Path) -> None:
    # pids get reused: a recorded pid that now runs something else must not be killed.
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "sandbox").mkdir()
        entry = {"pid": other.pid, "port": 1}
        pids = {"upcloud": entry, "ec2": entry, "ssh": entry}
        (tmp_path / "sandbox" / "pids.json").write_text(json.dumps(pids))
        Sandbox.attach(tmp_path).stop(timeout=1)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


# ---- workflows in the sandbox --------------------------------------------------------


def test_seed_example_end_to_end_in_the_sandbox(orch: Orchestrator, sandbox: Sandbox) -> None:
    spec = load_workflow(EXAMPLE).model_dump(mode="json")
    doc = orch.run(spec, timeout=150)
    stored = items(orch, doc["id"])
    assert doc["status"] == "Completed", (doc, {k: d["error"] for k, d in stored.items()})

    names = ("web-01", "web-02")
    installs = {k: d for k, d in stored.items() if d["kind"] == "taskserv"}
    assert len(installs) == 6 and {d["status"] for d in installs.values()} == {"Completed"}
    for server in names:
        marker_dir = sandbox.servers_dir / server / "var/lib/provisioning/taskservs"
        for taskserv in TASKSERVS:
            assert (marker_dir / f"{taskserv}.installed").is_file(), (server, taskserv)
        config = sandbox.servers_dir / server / "etc/containerd/config.toml"
        assert "SystemdCgroup = true" in config.read_text()

    servers = admin(sandbox, "GET", "/_admin/servers")["servers"]
    assert sorted(s["hostname"] for s in servers) == sorted(names)
    keys = {stored[f"upcloud_servers/{n}"]["key"] for n in names}
    assert {s["labels"][KEY_LABEL] for s in servers} == keys
    assert all(s["state"] == "started" for s in servers)


def test_mixed_fleet_under_faults_has_one_server_per_key(
    orch: Orchestrator, sandbox: Sandbox
) -> None:
    # Seeded: whether the n-th successful create's reply is lost does not depend on
    # timing; with seed 7 the 1st, 6th and 8th of the ten UpCloud creates lose theirs.
    faults = {"error_rate": 0.2, "lost_response_rate": 0.3, "seed": 7}
    admin(sandbox, "PUT", "/_admin/faults", faults)
    retry = {"attempts": 20, "initial_backoff": 0.05, "max_backoff": 0.5}
    upcloud = [
        {"name": f"uc-{i:02d}", "plan": "1xCPU-1GB", "zone": ("de-fra1", "fi-hel1")[i % 2]}
        for i in range(10)
    ]
    aws = [
        {"name": f"ec2-{i:02d}", "plan": "1xCPU-2 GB", "zone": ("de-fra1", "fi-hel1")[i % 2]}
        for i in range(10)
    ]
    spec = workflow(
        "mixed",
        [
            servers_op("uc", "upcloud", upcloud, retry=retry),
            servers_op("aws", "aws", aws, retry=retry),
            {
                "id": "runtime",
                "type": "taskserv_batch",
                "taskservs": ["containerd"],
                "dependencies": ["uc", "aws"],
                "retry": retry,
            },
        ],
        parallel_limit=20,
    )
    doc = orch.run(spec, timeout=150)
    stored = items(orch, doc["id"])
    errors = {k: d["error"] for k, d in stored.items() if d["status"] != "Completed"}
    assert doc["status"] == "Completed", (doc, errors)
    assert len(stored) == 40 and not errors

    stats = admin(sandbox, "GET", "/_admin/stats")
    assert stats["lost_responses"] >= 1 and stats["responses_5xx"] >= 1, stats
    uc_keys = {d["key"] for k, d in stored.items() if k.startswith("uc/")}
    aws_keys = {d["key"] for k, d in stored.items() if k.startswith("aws/")}
    on_emulator, on_moto = emulator_keys(sandbox), moto_keys(sandbox)
    # Exactly one server per key: a lost create reply was adopted, not created again.
    assert on_emulator == Counter(dict.fromkeys(uc_keys, 1)), on_emulator
    assert on_moto == Counter(dict.fromkeys(aws_keys, 1)), on_moto
    for server in [c["name"] for c in upcloud + aws]:
        marker = (
            sandbox.servers_dir / server / "var/lib/provisioning/taskservs/containerd.installed"
        )
        assert marker.is_file(), server


def test_wrong_upcloud_credentials_fail_fast_without_retries(
    orch: Orchestrator, sandbox: Sandbox
) -> None:
    secret = "not-the-sandbox-password-4711"
    orch.restart(replace(orch.settings, provider_env={**sandbox.env(), "UPCLOUD_PASSWORD": secret}))
    retry = {"attempts": 5, "initial_backoff": 1.0, "max_backoff": 5.0}
    configs = [{"name": "auth-1", "plan": "1xCPU-1GB", "zone": "fi-hel1"}]
    started = time.monotonic()
    doc = orch.run(workflow("auth", [servers_op("uc", "upcloud", configs, retry=retry)]))
    assert time.monotonic() - started < 20  # five attempts with backoff would take longer
    assert doc["status"] == "Failed"
    item = items(orch, doc["id"])["uc/auth-1"]
    assert item["status"] == "Failed" and item["attempt"] == 1
    assert item["error"]["class"] == "AuthError"
    assert "401" in item["error"]["message"] and "AUTHENTICATION_FAILED" in item["error"]["message"]
    everything = json.dumps([doc, item])
    assert secret not in everything and "Basic " not in everything
    calls = admin(sandbox, "GET", "/_admin/stats")["calls"]
    assert (
        calls.get("POST /1.3/server") == 1
        and not admin(sandbox, "GET", "/_admin/servers")["servers"]
    )


def test_unknown_zone_fails_the_item_as_permanent(orch: Orchestrator, sandbox: Sandbox) -> None:
    retry = {"attempts": 5, "initial_backoff": 1.0, "max_backoff": 5.0}
    bad = [{"name": "nowhere-1", "plan": "1xCPU-1GB", "zone": "xx-nowhere1"}]
    spec = workflow(
        "zones",
        [
            servers_op("uc", "upcloud", bad, retry=retry),
            servers_op(
                "aws", "aws", [{**bad[0], "name": "nowhere-2", "plan": "1xCPU-2 GB"}], retry=retry
            ),
        ],
    )
    doc = orch.run(spec)
    assert doc["status"] == "Failed"
    stored = items(orch, doc["id"])
    for key, needle in (("uc/nowhere-1", "ZONE_INVALID"), ("aws/nowhere-2", "unknown AWS zone")):
        item = stored[key]
        assert item["status"] == "Failed" and item["attempt"] == 1, item
        assert item["error"]["class"] == "PermanentError", item
        assert needle in item["error"]["message"] and "xx-nowhere1" in item["error"]["message"]
    assert not admin(sandbox, "GET", "/_admin/servers")["servers"]
    assert not moto_keys(sandbox)
