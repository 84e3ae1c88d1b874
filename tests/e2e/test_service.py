"""The service as a user drives it: the real CLI in subprocesses and REST over HTTP
against ``provisioning up --sandbox`` (real Ray, Serve, the UpCloud emulator, SSH)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.records import idempotency_key
from tests.e2e.conftest import REPO, P, Service, local_workflow

pytestmark = pytest.mark.e2e
SEED = REPO / "workflows" / "example_batch.ncl"
SEED_SERVERS = ("web-01", "web-02")


def upcloud_workflow(name: str, servers: int, parallel: int = 2) -> dict[str, Any]:
    configs = [
        {"name": f"{name}-{i:02d}", "plan": "1xCPU-1GB", "zone": "de-fra1"} for i in range(servers)
    ]
    return {
        "name": name,
        "parallel_limit": parallel,
        "operations": [
            {
                "id": "servers",
                "type": "server_batch",
                "provider": "upcloud",
                "server_configs": configs,
            }
        ],
    }


@pytest.fixture
def slow(service: Service) -> Iterator[None]:
    """Servers take a while to start on the emulator, so workflows stay in flight."""
    service.emulator("PUT", "/_admin/faults", {"ready_delay": 1.0})
    yield
    service.emulator("PUT", "/_admin/faults", {"ready_delay": 0.5})


def server_keys(service: Service) -> list[str]:
    servers = service.emulator("GET", "/1.3/server")["servers"]["server"]
    keys = []
    for s in servers:
        labels = s.get("labels", {}).get("label", [])
        keys += [lb["value"] for lb in labels if lb["key"] == "provisioning-key"]
    return keys


def submitted_id(stderr: str) -> str:
    match = re.search(r"workflow (wf-[0-9a-f]+) submitted", stderr)
    assert match, stderr
    return match.group(1)


@pytest.fixture(scope="module")
def seed(service: Service) -> tuple[str, subprocess.CompletedProcess[str]]:
    """The seed example submitted first (so no earlier workflow has installed its
    taskservs on servers of the same names, which would make them adopted)."""
    done = service.cli("batch", "submit", SEED, "--wait")
    return submitted_id(done.stderr), done


def test_submit_wait_then_status_list_monitor_stats(
    service: Service, seed: tuple[str, subprocess.CompletedProcess[str]]
) -> None:
    wid, done = seed
    assert done.returncode == 0, done.stdout + done.stderr
    assert "upcloud_servers" in done.stdout and "Completed" in done.stdout

    status = json.loads(service.cli("batch", "status", wid, "--json").stdout)
    assert status["status"] == "Completed"
    assert {op["id"]: op["counts"] for op in status["operations"]} == {
        "upcloud_servers": {"Completed": 2},
        "aws_taskservs": {"Completed": 6},
    }
    listed = json.loads(service.cli("batch", "list", "--status", "Completed", "--json").stdout)
    assert wid in [d["id"] for d in listed]
    assert "Completed" in service.cli("batch", "list").stdout

    replay = service.cli("batch", "monitor", wid)  # a finished workflow: replays, then ends
    assert replay.returncode == 0 and "aws_taskservs" in replay.stdout

    stats = json.loads(service.cli("batch", "stats", "--json").stdout)
    assert stats["by_status"]["Completed"] >= 1
    assert stats["items_by_state"]["Completed"] >= 8
    assert {"server_batch", "taskserv_batch"} <= set(stats["operations_by_type"])
    assert stats["providers"]["upcloud"]["granted_total"] >= 2
    assert "workflows by status" in service.cli("batch", "stats").stdout

    keys = server_keys(service)
    for name in SEED_SERVERS:
        assert keys.count(idempotency_key(wid, "upcloud_servers", name)) == 1


def test_rollback_removes_every_server_of_the_workflow(
    service: Service, seed: tuple[str, subprocess.CompletedProcess[str]]
) -> None:
    wid = seed[0]
    assert service.wait(wid)["status"] == "Completed"
    ours = {idempotency_key(wid, "upcloud_servers", n) for n in SEED_SERVERS}
    assert ours <= set(server_keys(service))

    # The preview lists exactly what the rollback then undoes, and changes nothing.
    preview = service.cli("batch", "rollback", wid, "--dry-run", "--json")
    assert preview.returncode == 0, preview.stdout + preview.stderr
    steps = json.loads(preview.stdout)["steps"]
    assert sorted(s["item"] for s in steps if s["action"] == "delete_server") == sorted(
        SEED_SERVERS
    )
    assert len([s for s in steps if s["action"] == "uninstall"]) == 3 * len(SEED_SERVERS)
    first_delete = min(i for i, s in enumerate(steps) if s["action"] == "delete_server")
    assert all(s["action"] == "uninstall" for s in steps[:first_delete])  # taskservs first
    assert service.wait(wid)["status"] == "Completed"
    assert ours <= set(server_keys(service))

    result = service.cli("batch", "rollback", wid, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = service.wait(wid)
    assert doc["status"] == "RolledBack"
    for op in doc["operations"]:
        assert op["status"] == "RolledBack"
        assert op["counts"] == {"RolledBack": op["total"]}, op
    assert not ours & set(server_keys(service))
    for name in SEED_SERVERS:  # the taskservs were uninstalled from the server's root
        root = service.data_dir / "sandbox" / "ssh" / "servers" / name
        assert not [p for p in root.rglob("*") if p.is_file()], list(root.rglob("*"))


def test_cancel_then_resume(service: Service, slow: None) -> None:
    wf = upcloud_workflow("cancel-me", servers=10, parallel=2)
    with service.http() as c:
        wid = c.post(f"{P}/submit", json={"workflow": wf}).json()["id"]
        service.wait(wid, until={"Running"})
        # Rollback while it runs is refused.
        conflict = c.post(f"{P}/{wid}/rollback")
        assert conflict.status_code == 409
        assert conflict.headers["content-type"].startswith("application/problem+json")

    cancelled = service.cli("batch", "cancel", wid)
    assert cancelled.returncode == 0, cancelled.stderr
    doc = service.wait(wid)
    assert doc["status"] == "Cancelled"
    counts = doc["operations"][0]["counts"]
    assert counts.get("Completed", 0) < 10, counts

    resumed = service.cli("batch", "resume", wid, "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    doc = service.wait(wid)
    assert doc["status"] == "Completed"
    assert doc["operations"][0]["counts"] == {"Completed": 10}
    keys = server_keys(service)
    for i in range(10):  # exactly one server per item, none made twice
        assert keys.count(idempotency_key(wid, "servers", f"cancel-me-{i:02d}")) == 1


def test_tokens(service: Service) -> None:
    with service.http(token=None) as anon:
        assert anon.get("/v1/health").status_code == 200
        for method, path in [("GET", P), ("GET", f"{P}/stats"), ("POST", f"{P}/submit")]:
            resp = anon.request(method, path)
            assert resp.status_code == 401
            assert resp.headers["content-type"].startswith("application/problem+json")
    with service.http(token="wrong") as bad:
        assert bad.get(P).status_code == 401
    denied = service.cli("batch", "list", PROVISIONING_API_TOKEN="wrong")
    assert denied.returncode == 2 and "401" in denied.stderr


def test_bad_input_is_a_problem_document_and_never_reaches_ray(service: Service) -> None:
    with service.http() as c:
        bad = SEED.read_text().replace('provider = "upcloud"', 'provider = "hetzner"')
        resp = c.post(f"{P}/submit", json={"source": bad, "filename": "bad.ncl"})
        assert resp.status_code == 422
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert "bad.ncl" in resp.json()["detail"] and "provider" in resp.json()["detail"]

        for source in ['import "/etc/passwd"', '{ x = import "/etc/os-release" as \'Text }']:
            resp = c.post(f"{P}/submit", json={"source": source})
            assert resp.status_code == 422
            assert "import refused" in resp.json()["detail"]
            assert "root:" not in resp.text and "NAME=" not in resp.text

        huge = {"source": "# " + "x" * (2 << 20)}
        resp = c.post(f"{P}/submit", json=huge)
        assert resp.status_code == 413 and "limit" in resp.json()["detail"]

        for path in (f"{P}/wf-00000000000deadbeef", f"{P}/not-an-id"):
            resp = c.get(path)
            assert resp.status_code == 404
            assert resp.headers["content-type"].startswith("application/problem+json")
        assert c.get(f"{P}/stats").status_code == 200  # not taken for an id

    missing = service.cli("batch", "status", "wf-00000000000deadbeef")
    assert missing.returncode == 2 and "no workflow" in missing.stderr
    invalid = service.cli(
        "batch", "submit", REPO / "tests" / "unit" / "fixtures" / "bad" / "cycle.ncl"
    )
    assert invalid.returncode == 2 and "cycle" in invalid.stderr


def test_unreachable_api_exits_3(service: Service) -> None:
    from tests.e2e.conftest import free_port

    result = service.cli("batch", "list", PROVISIONING_API_URL=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3 and "provisioning up" in result.stderr


def read_events(
    client: httpx.Client, wid: str, last: int | None, stop_after: int | None
) -> list[int]:
    headers = {"Accept": "text/event-stream"}
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    ids: list[int] = []
    with client.stream("GET", f"{P}/{wid}/progress", headers=headers) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
                if stop_after is not None and len(ids) >= stop_after:
                    break  # drop the connection mid-stream
    return ids


def test_progress_stream_resumes_with_last_event_id(service: Service, slow: None) -> None:
    with service.http() as c:
        wid = c.post(f"{P}/submit", json={"workflow": upcloud_workflow("sse", 6)}).json()["id"]
        first = read_events(c, wid, None, stop_after=3)
        rest = read_events(c, wid, first[-1], stop_after=None)
        assert service.wait(wid)["status"] == "Completed"
        everything = read_events(c, wid, None, stop_after=None)
    assert first + rest == everything  # no duplicate, none missing, in order
    assert len(everything) >= 6 + 2


def test_fifty_concurrent_submissions_all_complete(service: Service) -> None:
    def one(i: int) -> str:
        wf = local_workflow(f"many-{i}", f"m{i}", 2)
        with service.http() as c:
            resp = c.post(f"{P}/submit", json={"workflow": wf})
            assert resp.status_code == 202, resp.text
            return str(resp.json()["id"])

    with ThreadPoolExecutor(50) as pool:
        ids = list(pool.map(one, range(50)))
    assert len(set(ids)) == 50
    for wid in ids:
        assert service.wait(wid, timeout=300)["status"] == "Completed"
    stats = json.loads(service.cli("batch", "stats", "--json").stdout)
    assert stats["live"] <= stats["max_live"]


def test_schemathesis_finds_no_server_error(service: Service) -> None:
    """Inputs generated from /openapi.json alone, with the token: never a 500."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")), "run",
            f"{service.api_url}/openapi.json",
            "--header", f"Authorization: Bearer {service.token}",
            "--checks", "not_a_server_error", "--max-examples", "30",
            "--request-timeout", "60", "--seed", "1",
        ],
        # Run outside the repository: schemathesis leaves a .schemathesis/ dir behind.
        cwd=service.data_dir.parent, env=service.env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
