"""UpCloudProvider against the emulator over real HTTP, plus the error mapping on its own."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import requests

from runtime.errors import AuthError, PermanentError, ThrottledError, TransientError
from runtime.providers.upcloud import (
    KEY_LABEL,
    UpCloudHTTPError,
    UpCloudProvider,
    key_label_value,
    map_upcloud_error,
    parse_retry_after,
)
from runtime.sandbox.app_thread import AppServerThread
from runtime.sandbox.upcloud_emulator import create_app
from schemas.models import ServerConfigSpec

pytestmark = pytest.mark.integration

SPEC = ServerConfigSpec(name="web-1", plan="1xCPU-1GB", zone="fi-hel1", labels={"env": "test"})


@pytest.fixture(scope="module")
def emulator() -> Iterator[AppServerThread]:
    with AppServerThread(create_app(None, ready_delay=0.2, stop_delay=0.05)) as server:
        yield server


@pytest.fixture
def admin(emulator: AppServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{emulator.url}/_admin", timeout=10) as client:
        client.post("/reset", params={"servers": "true"}).raise_for_status()
        yield client


@pytest.fixture
async def provider(
    emulator: AppServerThread, admin: httpx.Client
) -> AsyncIterator[UpCloudProvider]:
    p = UpCloudProvider("sandbox", "sandbox", api_root=f"{emulator.url}/1.3", poll_interval=0.05)
    yield p
    await p.close()


def raw_servers(emulator: AppServerThread) -> list[dict[str, Any]]:
    res = httpx.get(f"{emulator.url}/1.3/server", auth=("sandbox", "sandbox"))
    servers: list[dict[str, Any]] = res.json()["servers"]["server"]
    return servers


async def test_round_trip(provider: UpCloudProvider, emulator: AppServerThread) -> None:
    created = await provider.create_server(SPEC, "prov-0001")
    assert created.provider == "upcloud"
    assert created.state == "maintenance"
    assert created.name == "web-1"
    assert created.key == "prov-0001"

    found = await provider.find_server("prov-0001")
    assert found is not None and found.id == created.id
    assert await provider.find_server("prov-0002") is None

    ready = await provider.wait_ready(found, timeout=10)
    assert ready.state == "started"
    assert ready.public_ip and ready.public_ip.startswith("198.51.100.")
    assert ready.private_ip and ready.private_ip.startswith("10.")
    assert ready.zone == "fi-hel1"
    labels = {(lb["key"], lb["value"]) for lb in raw_servers(emulator)[0]["labels"]["label"]}
    assert labels == {(KEY_LABEL, "prov-0001"), ("env", "test")}

    await provider.delete_server(ready)
    assert await provider.find_server("prov-0001") is None
    await provider.delete_server(ready)  # already gone is success


async def test_find_by_key_among_many(provider: UpCloudProvider) -> None:
    refs = {k: await provider.create_server(SPEC, k) for k in ("prov-a", "prov-b", "prov-c")}
    for key, ref in refs.items():
        found = await provider.find_server(key)
        assert found is not None and found.id == ref.id


async def test_long_keys_are_hashed_but_found(provider: UpCloudProvider) -> None:
    key = "workflow with spaces/" + "x" * 300
    assert len(key_label_value(key)) <= 255
    assert key_label_value(key) == key_label_value(key)
    ref = await provider.create_server(SPEC, key)
    found = await provider.find_server(key)
    assert found is not None and found.id == ref.id and found.key == key


async def test_deleting_a_started_server_raw_is_409(provider: UpCloudProvider) -> None:
    ref = await provider.wait_ready(await provider.create_server(SPEC, "prov-409"), timeout=10)
    with pytest.raises(PermanentError) as info:
        await provider._call(provider._api.delete_request, f"/server/{ref.id}?storages=1")
    assert info.value.status == 409
    assert info.value.code == "SERVER_STATE_ILLEGAL"
    await provider.delete_server(ref)  # the adapter stops first, then deletes
    assert await provider.find_server("prov-409") is None


async def test_wrong_credentials_fail_fast(emulator: AppServerThread, admin: httpx.Client) -> None:
    bad = UpCloudProvider("sandbox", "hunter2-wrong", api_root=f"{emulator.url}/1.3")
    start = time.monotonic()
    with pytest.raises(AuthError) as info:
        await bad.create_server(SPEC, "prov-auth")
    assert time.monotonic() - start < 2
    assert info.value.status == 401 and not info.value.retryable
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(bad)
    assert info.value.__cause__ is None  # the request (with its header) is not kept
    assert admin.get("/stats").json()["calls"] == {"POST /1.3/server": 1}
    await bad.close()


def test_missing_credentials_are_an_auth_error() -> None:
    with pytest.raises(AuthError):
        UpCloudProvider(username="only-a-user")


async def test_token_from_env(emulator: AppServerThread, admin: httpx.Client) -> None:
    env = {"UPCLOUD_TOKEN": "sandbox-token", "UPCLOUD_API_ROOT": f"{emulator.url}/1.3"}
    p = UpCloudProvider.from_env(env, poll_interval=0.05)
    assert p.api_root == f"{emulator.url}/1.3"
    assert await p.find_server("prov-none") is None
    await p.close()


async def test_unknown_zone_is_permanent(provider: UpCloudProvider) -> None:
    spec = SPEC.model_copy(update={"zone": "xx-nowhere1"})
    with pytest.raises(PermanentError) as info:
        await provider.create_server(spec, "prov-zone")
    assert not isinstance(info.value, AuthError)
    assert (info.value.status, info.value.code) == (400, "ZONE_INVALID")


async def test_429_carries_retry_after(provider: UpCloudProvider, admin: httpx.Client) -> None:
    admin.put("/faults", json={"rate_limit": {"rate": 0.5, "burst": 1}}).raise_for_status()
    await provider.create_server(SPEC, "prov-rl-1")
    with pytest.raises(ThrottledError) as info:
        await provider.create_server(SPEC, "prov-rl-2")
    assert info.value.retry_after == 2.0
    assert info.value.status == 429 and info.value.retryable


async def test_5xx_is_transient(provider: UpCloudProvider, admin: httpx.Client) -> None:
    admin.put("/faults", json={"error_rate": 1, "seed": 3}).raise_for_status()
    statuses = set()
    for i in range(12):  # 500 and 503 with JSON bodies, 502 with an HTML one
        with pytest.raises(TransientError) as info:
            await provider.create_server(SPEC, f"prov-5xx-{i}")
        statuses.add(info.value.status)
    assert statuses == {500, 502, 503}
    admin.put("/faults", json={"error_rate": 0}).raise_for_status()
    assert await provider.find_server("prov-5xx-0") is None


@pytest.mark.parametrize("mode", ["reset", "error"])
async def test_lost_create_is_transient_but_findable(
    provider: UpCloudProvider, admin: httpx.Client, mode: str
) -> None:
    admin.put("/faults", json={"lost_response_rate": 1, "lost_response_mode": mode})
    with pytest.raises(TransientError):
        await provider.create_server(SPEC, "prov-lost")
    admin.put("/faults", json={"lost_response_rate": 0})
    found = await provider.find_server("prov-lost")
    assert found is not None
    ready = await provider.wait_ready(found, timeout=10)
    assert ready.public_ip


async def test_lost_delete_then_delete_again(
    provider: UpCloudProvider, admin: httpx.Client
) -> None:
    ref = await provider.wait_ready(await provider.create_server(SPEC, "prov-ld"), timeout=10)
    admin.put("/faults", json={"lost_response_rate": 1})
    with pytest.raises(TransientError):
        await provider.delete_server(ref)
    admin.put("/faults", json={"lost_response_rate": 0})
    await provider.delete_server(ref)
    assert await provider.find_server("prov-ld") is None
    assert admin.get("/stats").json()["deletes"] == 1


async def test_wait_ready_times_out_as_transient(
    provider: UpCloudProvider, admin: httpx.Client
) -> None:
    admin.put("/faults", json={"ready_delay": 30}).raise_for_status()
    ref = await provider.create_server(SPEC, "prov-slow")
    with pytest.raises(TransientError, match="not started in time"):
        await provider.wait_ready(ref, timeout=0.3)


async def test_polls_ride_out_5xx(provider: UpCloudProvider, admin: httpx.Client) -> None:
    ref = await provider.create_server(SPEC, "prov-flaky")
    admin.put("/faults", json={"error_rate": 0.5, "seed": 1}).raise_for_status()
    ready = await provider.wait_ready(ref, timeout=10)
    assert ready.state == "started"


async def test_servers_booting_together_share_one_status_poll(
    provider: UpCloudProvider, admin: httpx.Client
) -> None:
    admin.put("/faults", json={"ready_delay": 0.6}).raise_for_status()
    refs = [
        await provider.create_server(SPEC.model_copy(update={"name": f"w-{i}"}), f"prov-b{i}")
        for i in range(12)
    ]
    paths: list[str] = []
    real_get = provider._api.get_request

    def counting_get(path: str, *args: Any, **kwargs: Any) -> Any:
        paths.append(path)
        return real_get(path, *args, **kwargs)

    provider._api.get_request = counting_get  # type: ignore[method-assign]
    ready = await asyncio.gather(*(provider.wait_ready(r, timeout=20) for r in refs))
    assert {r.state for r in ready} == {"started"} and all(r.public_ip for r in ready)
    lists = paths.count("/server")
    gets = [p for p in paths if p != "/server"]
    # One GET per server for its addresses once started; the waiting itself is shared:
    # a dozen 0.6 s boots polled every 0.05 s one by one would take 12 x ~10 GETs.
    assert sorted(gets) == sorted(f"/server/{r.id}" for r in refs)
    assert 1 <= lists <= 25, paths


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = UpCloudProvider(token="t", api_root=f"http://127.0.0.1:{port}/1.3", request_timeout=2)
    with pytest.raises(TransientError):
        await p.find_server("prov-x")
    await p.close()


def _http(status: int, code: str | None = "X", retry_after: float | None = None) -> Exception:
    return UpCloudHTTPError(status, code, "msg", retry_after)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_http(429, "TOO_MANY_REQUESTS", 3.0), ThrottledError),
        (_http(401, "AUTHENTICATION_FAILED"), AuthError),
        (_http(403, "FORBIDDEN"), AuthError),
        (_http(400, "ZONE_INVALID"), PermanentError),
        (_http(404, "SERVER_NOT_FOUND"), PermanentError),
        (_http(409, "SERVER_STATE_ILLEGAL"), PermanentError),
        (_http(408, None), TransientError),
        (_http(500, "INTERNAL_ERROR"), TransientError),
        (_http(502, None), TransientError),
        (_http(503, "SERVICE_UNAVAILABLE"), TransientError),
        (_http(200, None), TransientError),  # a 2xx whose body was not JSON
        (requests.ConnectionError("refused"), TransientError),
        (requests.Timeout("slow"), TransientError),
        (requests.exceptions.ChunkedEncodingError("cut"), TransientError),
        (ValueError("Expecting value"), TransientError),
        (KeyError("server"), TransientError),
        (RuntimeError("???"), PermanentError),
    ],
)
def test_map_upcloud_error(exc: Exception, kind: type[Exception]) -> None:
    mapped = map_upcloud_error(exc)
    assert type(mapped) is kind
    if isinstance(exc, UpCloudHTTPError):
        assert mapped.status == exc.status
        assert mapped.code == exc.error_code
    if kind is ThrottledError:
        assert mapped.retry_after == 3.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = datetime(2030, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(30)
