"""The UpCloud emulator over real HTTP: uvicorn in a thread on a free loopback port."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from runtime.sandbox.app_thread import AppServerThread
from runtime.sandbox.upcloud_emulator import create_app
from runtime.sandbox.upcloud_faults import TokenBucket, route_key

pytestmark = pytest.mark.integration

T = TypeVar("T")
AUTH = ("sandbox", "sandbox")
UBUNTU = "01000000-0000-4000-8000-000030240200"


def eventually(check: Callable[[], T], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll until ``check`` stops raising AssertionError; then return its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def server_body(name: str, zone: str = "fi-hel1", plan: str = "1xCPU-1GB", **labels: str) -> Any:
    return {
        "server": {
            "zone": zone,
            "hostname": name,
            "title": name,
            "plan": plan,
            "labels": {"label": [{"key": k, "value": v} for k, v in labels.items()]},
            "storage_devices": {
                "storage_device": [{"action": "clone", "storage": UBUNTU, "size": 25}]
            },
        }
    }


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServerThread]:
    state = tmp_path_factory.mktemp("upcloud") / "state.json"
    with AppServerThread(create_app(state, ready_delay=0.2, stop_delay=0.05)) as server:
        yield server


@pytest.fixture
def admin(emulator: AppServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{emulator.url}/_admin", timeout=10) as client:
        client.post("/reset", params={"servers": "true"}).raise_for_status()
        yield client


@pytest.fixture
def api(emulator: AppServerThread, admin: httpx.Client) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{emulator.url}/1.3", auth=AUTH, timeout=10) as client:
        yield client


def create(api: httpx.Client, name: str, **labels: str) -> dict[str, Any]:
    res = api.post("/server", json=server_body(name, **labels))
    assert res.status_code == 202, res.text
    server: dict[str, Any] = res.json()["server"]
    return server


def state_of(api: httpx.Client, uuid: str) -> str:
    return str(api.get(f"/server/{uuid}").json()["server"]["state"])


def test_auth_basic_and_bearer_required(emulator: AppServerThread, api: httpx.Client) -> None:
    with httpx.Client(base_url=f"{emulator.url}/1.3") as anon:
        res = anon.get("/account")
        assert res.status_code == 401
        assert res.json() == {
            "error": {
                "error_code": "AUTHENTICATION_FAILED",
                "error_message": "Authentication failed.",
            }
        }
        assert anon.get("/account", auth=("sandbox", "wrong")).status_code == 401
        assert anon.get("/account", headers={"Authorization": "Bearer nope"}).status_code == 401
        good = {"Authorization": "Bearer sandbox-token"}
        assert anon.get("/account", headers=good).status_code == 200
    assert api.get("/account").json()["account"]["username"] == "sandbox"


def test_catalog_routes(api: httpx.Client) -> None:
    plans = {p["name"] for p in api.get("/plan").json()["plans"]["plan"]}
    zones = {z["id"] for z in api.get("/zone").json()["zones"]["zone"]}
    assert "1xCPU-1GB" in plans
    assert "fi-hel1" in zones


def test_create_is_maintenance_then_started(api: httpx.Client) -> None:
    server = create(api, "web-1", role="web")
    assert server["state"] == "maintenance"
    assert server["hostname"] == server["title"] == "web-1"
    assert server["labels"] == {"label": [{"key": "role", "value": "web"}]}
    for field in ("ip_addresses", "storage_devices", "networking"):
        assert field in server
    public = [ip for ip in server["ip_addresses"]["ip_address"] if ip["access"] == "public"]
    assert public[0]["address"].startswith("198.51.100.")

    def started() -> dict[str, Any]:
        got: dict[str, Any] = api.get(f"/server/{server['uuid']}").json()["server"]
        assert got["state"] == "started"
        return got

    got = eventually(started)
    for field in ("ip_addresses", "storage_devices", "networking"):
        assert field in got


def test_each_server_gets_its_own_address(api: httpx.Client) -> None:
    servers = [create(api, f"n-{i}") for i in range(5)]
    addresses = {
        ip["address"]
        for s in servers
        for ip in s["ip_addresses"]["ip_address"]
        if ip["access"] == "public"
    }
    assert len(addresses) == 5


def test_label_filters_are_anded(api: httpx.Client) -> None:
    create(api, "a", role="web", env="prod")
    create(api, "b", role="web", env="dev")
    create(api, "c", role="db", env="prod")

    def names(*labels: str) -> set[str]:
        res = api.get("/server", params=[("label", label) for label in labels])
        return {s["hostname"] for s in res.json()["servers"]["server"]}

    assert names("role=web") == {"a", "b"}
    assert names("role=web", "env=prod") == {"a"}
    assert names("env") == {"a", "b", "c"}
    assert names("role=cache") == set()
    assert names() == {"a", "b", "c"}


def test_delete_needs_a_stopped_server(api: httpx.Client) -> None:
    uuid = create(api, "doomed")["uuid"]
    res = api.delete(f"/server/{uuid}", params={"storages": 1})
    assert res.status_code == 409
    assert res.json()["error"]["error_code"] == "SERVER_STATE_ILLEGAL"  # maintenance
    eventually(lambda: _assert_eq(state_of(api, uuid), "started"))
    res = api.delete(f"/server/{uuid}", params={"storages": 1})
    assert res.status_code == 409
    assert res.json()["error"]["error_code"] == "SERVER_STATE_ILLEGAL"  # started
    assert api.post(f"/server/{uuid}/stop", json={"stop_server": {}}).status_code == 202
    eventually(lambda: _assert_eq(state_of(api, uuid), "stopped"))
    assert api.delete(f"/server/{uuid}", params={"storages": 1}).status_code == 204
    res = api.get(f"/server/{uuid}")
    assert res.status_code == 404
    assert res.json()["error"]["error_code"] == "SERVER_NOT_FOUND"
    assert api.delete(f"/server/{uuid}").status_code == 404


def _assert_eq(got: object, want: object) -> None:
    assert got == want


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (server_body("x", zone="xx-nowhere1"), 400, "ZONE_INVALID"),
        (server_body("x", plan="99xCPU-1TB"), 400, "PLAN_INVALID"),
        (server_body("x", **{"bad key!": "v"}), 400, "LABEL_INVALID"),
        (server_body("not a hostname"), 400, "HOSTNAME_INVALID"),
        ({"server": {"zone": "fi-hel1"}}, 400, "HOSTNAME_MISSING"),
    ],
)
def test_create_rejects_bad_input(api: httpx.Client, body: Any, status: int, code: str) -> None:
    res = api.post("/server", json=body)
    assert res.status_code == status
    assert res.json()["error"]["error_code"] == code
    assert api.get("/server").json()["servers"]["server"] == []


def test_token_bucket_bursts_then_refills() -> None:
    bucket = TokenBucket(rate=5, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.2)
    assert bucket.take(0.1) == pytest.approx(0.1)
    assert bucket.take(0.2) == 0.0
    assert bucket.take(10.0) == 0.0  # refills to the burst, not beyond
    assert [bucket.take(10.0) for _ in range(3)][-1] == pytest.approx(0.2)


def test_rate_limit_over_http(api: httpx.Client, admin: httpx.Client) -> None:
    # A slow rate, so a loaded machine cannot refill a token between the burst's calls.
    admin.put("/faults", json={"rate_limit": {"rate": 1, "burst": 3}}).raise_for_status()
    stop = "/server/00000000-0000-4000-8000-000000000000/stop"
    assert [api.post(stop).status_code for _ in range(3)] == [404, 404, 404]
    res = api.post(stop)
    assert res.status_code == 429
    assert res.headers["Retry-After"] == "1"
    assert res.json()["error"]["error_code"] == "TOO_MANY_REQUESTS"
    assert api.get("/server").status_code == 200  # reads are not limited
    time.sleep(1.05)
    assert api.post(stop).status_code == 404
    stats = admin.get("/stats").json()
    assert stats["responses_429"] == 1
    assert stats["max_mutating_in_1s"] == 3
    assert stats["calls"]["POST /1.3/server/{uuid}/stop"] == 5


def test_injected_errors_are_deterministic(api: httpx.Client, admin: httpx.Client) -> None:
    def run() -> list[int]:
        admin.post("/reset").raise_for_status()
        admin.put("/faults", json={"error_rate": 0.5, "seed": 7}).raise_for_status()
        return [api.get("/zone").status_code for _ in range(30)]

    first, second = run(), run()
    assert first == second
    assert {500, 502, 503} & set(first) and 200 in first
    assert admin.get("/stats").json()["responses_5xx"] == sum(s >= 500 for s in second)


def test_lost_response_creates_anyway(api: httpx.Client, admin: httpx.Client) -> None:
    admin.put("/faults", json={"lost_response_rate": 1, "lost_response_mode": "error"})
    res = api.post("/server", json=server_body("lost-1"))
    assert res.status_code == 500
    assert res.headers["content-type"].startswith("text/plain")
    admin.put("/faults", json={"lost_response_mode": "reset"})
    with pytest.raises(httpx.TransportError):
        api.post("/server", json=server_body("lost-2"))
    admin.put("/faults", json={"lost_response_rate": 0})
    names = {s["hostname"] for s in api.get("/server").json()["servers"]["server"]}
    assert names == {"lost-1", "lost-2"}
    stats = admin.get("/stats").json()
    assert stats["creates"] == 2
    assert stats["lost_responses"] == 2


def test_latency(api: httpx.Client, admin: httpx.Client) -> None:
    admin.put("/faults", json={"latency": 0.2}).raise_for_status()
    start = time.monotonic()
    assert api.get("/zone").status_code == 200
    assert time.monotonic() - start >= 0.2


def test_fault_settings_validate_and_reset(admin: httpx.Client) -> None:
    assert admin.put("/faults", json={"error_rate": 2}).status_code == 400
    assert admin.put("/faults", json={"nonsense": 1}).status_code == 400
    assert admin.put("/faults", json={"ready_delay": 3}).json()["ready_delay"] == 3
    assert admin.post("/reset").json()["faults"]["ready_delay"] == 0.2
    assert admin.get("/faults").json()["rate_limit"] is None


def test_state_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with (
        AppServerThread(create_app(state, ready_delay=0.0)) as first,
        httpx.Client(base_url=f"{first.url}/1.3", auth=AUTH) as api,
    ):
        created = create(api, "keeper", role="db")
    assert state.exists()
    with (
        AppServerThread(create_app(state)) as second,
        httpx.Client(base_url=f"{second.url}/1.3", auth=AUTH) as api,
    ):
        got = api.get(f"/server/{created['uuid']}").json()["server"]
        assert got["hostname"] == "keeper"
        assert got["state"] == "started"
        assert got["labels"] == created["labels"]
        other = create(api, "newcomer")
        assert other["ip_addresses"] != created["ip_addresses"]


def test_route_key_names_uuid_routes() -> None:
    uuid = "00798b85-efdc-41ca-8021-f6ef457b8531"
    assert route_key("POST", f"/1.3/server/{uuid}/stop") == "POST /1.3/server/{uuid}/stop"
    assert route_key("GET", "/1.3/server/") == "GET /1.3/server"
