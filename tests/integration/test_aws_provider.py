"""AwsProvider against moto's EC2 server over real HTTP.

What the provider wrote is checked with raw EC2 Query requests to moto, not with the
provider's own reads, so a bug that writes and reads back the same wrong thing fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from runtime.errors import AuthError, PermanentError, ThrottledError, TransientError
from runtime.providers.aws import (
    DEFAULT_ZONES,
    KEY_TAG,
    AwsProvider,
    client_token,
    load_tables,
    map_aws_error,
)
from runtime.sandbox.moto_server import MotoServer, free_port, sandbox_aws_env
from schemas.models import ServerConfigSpec

pytestmark = pytest.mark.integration

REGION = "eu-central-1"  # where "de-fra1" leads


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer(free_port())
    server.start()
    pid = server.pid
    assert pid is not None
    try:
        yield server
    finally:
        server.stop()
        assert not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid)


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _fresh(moto: MotoServer) -> AwsProvider:
    """A provider that knows nothing yet, like one started after a crash."""
    return AwsProvider.from_env(environ=sandbox_aws_env(moto.endpoint_url), poll_interval=0.05)


@pytest.fixture
async def provider(moto: MotoServer) -> AsyncIterator[AwsProvider]:
    p = _fresh(moto)
    yield p
    await p.close()


@pytest.fixture
def calls(provider: AwsProvider) -> Iterator[list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    unsubscribe = provider.add_call_listener(lambda region, op: seen.append((region, op)))
    yield seen
    unsubscribe()


def _key() -> str:
    return f"wf-{uuid.uuid4().hex[:8]}/op/item-0"


def _spec(name: str = "web-1", **kw: object) -> ServerConfigSpec:
    base: dict[str, object] = {"name": name, "plan": "1xCPU-2 GB", "zone": "de-fra1"}
    return ServerConfigSpec.model_validate({**base, **kw})


def _ops(calls: list[tuple[str, str]], op: str) -> int:
    return sum(1 for _, o in calls if o == op)


def _ec2_query(moto: MotoServer, action: str, **params: str) -> ET.Element:
    """A raw EC2 Query API call to moto, bypassing boto3 and the provider."""
    query = urllib.parse.urlencode({"Action": action, "Version": "2016-11-15", **params})
    # moto routes by the credential scope; it does not check the signature by default.
    auth = f"AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/ec2/aws4_request, "
    req = urllib.request.Request(
        f"{moto.endpoint_url}/?{query}",
        headers={"Authorization": auth + "SignedHeaders=host, Signature=0"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return ET.fromstring(resp.read())


def _local(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1]


def _tags_on_moto(moto: MotoServer, instance_id: str) -> dict[str, str]:
    root = _ec2_query(
        moto, "DescribeTags", **{"Filter.1.Name": "resource-id", "Filter.1.Value.1": instance_id}
    )
    tags = {}
    for item in root.iter():
        fields = {_local(c): c.text or "" for c in item}
        if _local(item) == "item" and "key" in fields:
            tags[fields["key"]] = fields["value"]
    return tags


def _state_on_moto(moto: MotoServer, instance_id: str) -> str:
    root = _ec2_query(moto, "DescribeInstances", **{"InstanceId.1": instance_id})
    states = [el for el in root.iter() if _local(el) == "instanceState"]
    name = next(c for c in states[0] if _local(c) == "name")
    return name.text or ""


# ---- the four calls ---------------------------------------------------------------


async def test_create_find_wait_delete_round_trip(moto: MotoServer, provider: AwsProvider) -> None:
    key = _key()
    spec = _spec(labels={"env": "test", "team": "core"}, user_data="#!/bin/sh\ntrue\n")

    ref = await provider.create_server(spec, key)

    assert (ref.provider, ref.name, ref.key) == ("aws", "web-1", key)
    assert ref.id.startswith("i-") and ref.extra["region"] == REGION
    assert ref.extra["instance_type"] == "t3.small"
    assert _tags_on_moto(moto, ref.id) == {
        "Name": "web-1",
        KEY_TAG: key,
        "env": "test",
        "team": "core",
    }

    after_crash = _fresh(moto)  # knows neither the key nor its region
    found = await after_crash.find_server(key)
    assert found is not None and found.id == ref.id and found.key == key
    assert found.name == "web-1"

    ready = await provider.wait_ready(ref, timeout=10)
    assert ready.state == "running" and ready.id == ref.id
    assert ready.public_ip and ready.private_ip and ready.zone.startswith(REGION)

    await after_crash.delete_server(found)
    assert _state_on_moto(moto, ref.id) in ("shutting-down", "terminated")
    assert await provider.find_server(key) is None
    await after_crash.close()


async def test_find_unknown_key_searches_every_table_region(
    provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    assert await provider.find_server(_key()) is None
    searched = {region for region, op in calls if op == "DescribeInstances"}
    assert searched == {provider.resolve_zone(z)[0] for z in DEFAULT_ZONES}


async def test_find_with_zone_searches_one_region(
    provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    assert await provider.find_server(_key(), zone="de-fra1") is None
    assert calls == [(REGION, "DescribeInstances")]


async def test_terminated_instance_is_not_found_and_delete_is_idempotent(
    moto: MotoServer, provider: AwsProvider
) -> None:
    key = _key()
    ref = await provider.create_server(_spec(), key)
    await provider.delete_server(ref)
    await provider.delete_server(ref)  # already gone: success
    await provider.delete_server(ref.__class__(**{**ref.to_dict(), "id": "i-0123456789abcdef0"}))
    assert _state_on_moto(moto, ref.id) == "terminated"
    assert await _fresh(moto).find_server(key) is None


async def test_wait_ready_on_terminated_instance_is_permanent(provider: AwsProvider) -> None:
    ref = await provider.create_server(_spec(), _key())
    await provider.delete_server(ref)
    with pytest.raises(PermanentError, match=r"terminated|shutting-down"):
        await provider.wait_ready(ref, timeout=5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("zone", "xx-nowhere9"), ("plan", "a very big one"), ("image", "Ubuntu 24.04")],
)
async def test_unknown_table_values_fail_before_any_call(
    provider: AwsProvider, calls: list[tuple[str, str]], field: str, value: str
) -> None:
    with pytest.raises(PermanentError, match=re.escape(value)) as info:
        await provider.create_server(_spec(**{field: value}), _key())
    assert not isinstance(info.value, TransientError | ThrottledError)
    assert calls == []


async def test_raw_regions_azs_and_instance_types_pass_through(provider: AwsProvider) -> None:
    ref = await provider.create_server(_spec(zone="eu-central-1b", plan="t3.nano"), _key())
    assert (ref.zone, ref.extra["instance_type"]) == ("eu-central-1b", "t3.nano")
    assert provider.resolve_zone("us-east-1") == ("us-east-1", None)


@pytest.mark.parametrize(
    ("update", "code"),
    [({"image": "ami-12345678"}, "InvalidAMIID"), ({"plan": "t3.bogus"}, "InvalidInstanceType")],
)
async def test_moto_strict_mode_rejects_what_aws_would_reject(
    provider: AwsProvider, update: dict[str, str], code: str
) -> None:
    with pytest.raises(PermanentError) as info:
        await provider.create_server(_spec(**update), _key())
    assert info.value.code is not None and info.value.code.startswith(code)
    assert info.value.status == 400


async def test_wrong_credentials_raise_auth_error_once(
    moto: MotoServer, provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    moto.enforce_auth(True)  # moto now rejects the unknown "testing" key
    try:
        with pytest.raises(AuthError) as info:
            await provider.find_server(_key(), zone="de-fra1")
    finally:
        moto.enforce_auth(False)
    assert info.value.code == "AuthFailure" and not info.value.retryable
    assert calls == [(REGION, "DescribeInstances")]  # no botocore retry behind our back
    assert "testing" not in str(info.value) and "testing" not in repr(provider)


async def test_unreachable_endpoint_is_transient() -> None:
    env = sandbox_aws_env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    provider = AwsProvider.from_env(environ=env)
    attempts: list[object] = []
    # before-send fires once per HTTP attempt: botocore must not retry on its own.
    provider._client(REGION).meta.events.register(
        "before-send.ec2", lambda **kw: attempts.append(kw)
    )
    with pytest.raises(TransientError) as info:
        await provider.find_server(_key(), zone="de-fra1")
    assert info.value.code == "EndpointConnectionError"
    assert len(attempts) == 1


async def test_same_key_twice_makes_two_instances_on_moto(
    moto: MotoServer, provider: AwsProvider
) -> None:
    # moto ignores ClientToken (AWS would return the first instance), which is why the
    # retry loop reconciles with find_server before it creates again.
    key = _key()
    first = await provider.create_server(_spec(), key)
    second = await provider.create_server(_spec(), key)
    assert first.id != second.id
    found = await _fresh(moto).find_servers(key)
    assert sorted(r.id for r in found) == sorted([first.id, second.id])
    oldest = await _fresh(moto).find_server(key)
    assert oldest is not None and oldest.id == found[0].id  # the same one every time


async def test_lost_create_response_is_found_by_key(
    moto: MotoServer, provider: AwsProvider
) -> None:
    def lose_response(**_: object) -> None:
        raise ConnectionClosedError(endpoint_url=moto.endpoint_url)

    # The request reaches moto and makes the instance; the answer never comes back.
    provider._client(REGION).meta.events.register("after-call.ec2.RunInstances", lose_response)
    key = _key()
    with pytest.raises(TransientError):
        await provider.create_server(_spec(), key)
    found = await provider.find_server(key)
    assert found is not None and _tags_on_moto(moto, found.id)[KEY_TAG] == key
    again = await _fresh(moto).find_server(key)
    assert again is not None and again.id == found.id


async def test_concurrent_creates_share_one_client_and_one_image_lookup(
    provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    keys = [_key() for _ in range(12)]
    refs = await asyncio.gather(*(provider.create_server(_spec(), k) for k in keys))
    assert len({r.id for r in refs}) == 12 and [r.key for r in refs] == keys
    assert _ops(calls, "DescribeImages") == 1 and _ops(calls, "RunInstances") == 12


def test_client_token_fits_ec2_limit() -> None:
    assert client_token("wf/op/0") == "wf/op/0"
    long = "w" * 65
    assert len(client_token(long)) == 64 and client_token(long) == client_token(long)
    assert client_token(long) != client_token(long + "x")
    assert client_token("zürich").isascii()


async def test_default_image_is_resolved_once_per_region(
    provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    a = await provider.create_server(_spec(), _key())
    b = await provider.create_server(_spec(), _key())
    assert _ops(calls, "DescribeImages") == 1
    assert a.extra["image_id"] == b.extra["image_id"] and a.extra["image_id"].startswith("ami-")


# ---- coalesced create -------------------------------------------------------------


async def test_coalesced_create_makes_one_run_instances_call(
    moto: MotoServer, provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    keys = [f"{_key()}-{i}" for i in range(5)]
    specs = [_spec(f"node-{i}", labels={"pool": "a"}) for i in range(5)]

    refs = await provider.create_servers(specs, keys)

    assert _ops(calls, "RunInstances") == 1 and _ops(calls, "CreateTags") == 5
    assert len({r.id for r in refs}) == 5
    after_crash = _fresh(moto)
    for spec, key, ref in zip(specs, keys, refs, strict=True):
        tags = _tags_on_moto(moto, ref.id)
        assert (tags["Name"], tags[KEY_TAG], tags["pool"]) == (spec.name, key, "a")
        found = await after_crash.find_server(key)
        assert found is not None and (found.id, found.name) == (ref.id, spec.name)


async def test_coalesced_create_refuses_mixed_configs(
    provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    with pytest.raises(PermanentError):
        await provider.create_servers([_spec(), _spec(plan="t3.large")], [_key(), _key()])
    with pytest.raises(PermanentError):
        await provider.create_servers([_spec()], [_key(), _key()])
    assert calls == []


# ---- tables -----------------------------------------------------------------------


async def test_tables_file_overrides_defaults(moto: MotoServer, tmp_path: Path) -> None:
    path = tmp_path / "aws.json"
    path.write_text(json.dumps({"zones": {"lab": "eu-central-1c"}, "plans": {"tiny": "t3.nano"}}))
    provider = AwsProvider.from_env(sandbox_aws_env(moto.endpoint_url), tables_path=path)
    ref = await provider.create_server(_spec(zone="lab", plan="tiny"), _key())
    assert (ref.zone, ref.extra["instance_type"]) == ("eu-central-1c", "t3.nano")
    assert provider.resolve_zone("de-fra1") == (REGION, None)  # defaults still there
    env = {**sandbox_aws_env(moto.endpoint_url), "PROVISIONING_AWS_TABLES": str(path)}
    assert AwsProvider.from_env(env).resolve_plan("tiny") == "t3.nano"

    path.write_text(json.dumps({"zones": {"lab": 3}}))
    with pytest.raises(PermanentError, match="zones"):
        load_tables(path)


# ---- error mapping ----------------------------------------------------------------


def _client_error(code: str, status: int, headers: dict[str, str] | None = None) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": f"{code} happened\nCanonical request: secret"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
    }
    return ClientError(response, "RunInstances")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("RequestLimitExceeded", 503, ThrottledError),
        ("Throttling", 400, ThrottledError),
        ("SomethingNew", 429, ThrottledError),
        ("InternalError", 500, TransientError),
        ("Unavailable", 503, TransientError),
        ("InsufficientInstanceCapacity", 500, TransientError),
        ("AuthFailure", 401, AuthError),
        ("UnauthorizedOperation", 403, AuthError),
        ("InvalidClientTokenId", 403, AuthError),
        ("InvalidParameterValue", 400, PermanentError),
        ("InvalidAMIID.NotFound", 400, PermanentError),
        ("InvalidInstanceType", 400, PermanentError),
    ],
)
def test_client_errors_map_by_code_and_status(
    code: str, status: int, expected: type[Exception]
) -> None:
    err = map_aws_error(_client_error(code, status))
    assert type(err) is expected
    assert (err.code, err.status) == (code, status)
    assert "secret" not in str(err)  # only the first line of AWS's message is kept


def test_throttle_keeps_retry_after() -> None:
    err = map_aws_error(_client_error("RequestLimitExceeded", 503, {"Retry-After": "7"}))
    assert isinstance(err, ThrottledError) and err.retry_after == 7.0
    assert map_aws_error(_client_error("Throttling", 400)).retry_after is None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (EndpointConnectionError(endpoint_url="http://x"), TransientError),
        (ReadTimeoutError(endpoint_url="http://x"), TransientError),
        (ConnectionResetError("reset"), TransientError),
        (NoCredentialsError(), AuthError),
        (ParamValidationError(report="bad"), PermanentError),
    ],
)
def test_client_library_errors_map_by_class(exc: Exception, expected: type[Exception]) -> None:
    assert type(map_aws_error(exc)) is expected


# ---- the sandbox server -----------------------------------------------------------


async def test_moto_server_reset_and_stop_by_pid() -> None:
    server = MotoServer(free_port())
    server.start()
    pid = server.pid
    assert pid is not None
    try:
        provider = AwsProvider.from_env(environ=sandbox_aws_env(server.endpoint_url))
        key = _key()
        await provider.create_server(_spec(), key)
        server.reset()
        assert await provider.find_server(key, zone="de-fra1") is None
        MotoServer.attach(os.getpid()).stop()  # not a moto server: must not be signalled
        MotoServer.attach(pid, server.port).stop()  # a restarted `up` stopping it
        assert not server.answering()
    finally:
        server.stop()
