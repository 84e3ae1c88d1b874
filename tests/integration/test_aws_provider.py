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
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from bench.coalesce_bench import MemoryHost  # the ItemHost without Ray, shared
from runtime.engine import ROLLBACK, OperationRunner, RunnerContext
from runtime.errors import AuthError, PermanentError, ThrottledError, TransientError
from runtime.planner import OperationPlan, build_plan
from runtime.providers.aws import (
    BATCH_TAG,
    DEFAULT_MAX_BATCH,
    DEFAULT_ZONES,
    KEY_TAG,
    AwsProvider,
    client_token,
    load_tables,
    parse_coalesce,
)
from runtime.providers.aws_errors import map_aws_error
from runtime.records import idempotency_key, new_item_doc
from runtime.sandbox.moto_server import MotoServer, free_port, sandbox_aws_env
from schemas.loader import workflow_from_data
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


# ---- coalesced create (create_batch) ------------------------------------------------


def _instances_on_moto(moto: MotoServer, **tags: str) -> list[dict[str, Any]]:
    """Live instances carrying every ``tags`` pair, read with a raw EC2 query:
    id, launch index, state and tags of each."""
    params = {"Filter.1.Name": "instance-state-name"}
    params.update({f"Filter.1.Value.{i}": s for i, s in enumerate(("pending", "running"), 1)})
    for n, (key, value) in enumerate(tags.items(), 2):
        params.update({f"Filter.{n}.Name": f"tag:{key}", f"Filter.{n}.Value.1": value})
    root = _ec2_query(moto, "DescribeInstances", **params)
    found = []
    for group in (el for el in root.iter() if _local(el) == "instancesSet"):
        for inst in group:
            fields = {_local(c): c for c in inst}
            tag_map = {}
            for t in fields.get("tagSet", []):
                kv = {_local(c): c.text or "" for c in t}
                tag_map[kv["key"]] = kv["value"]
            state = next(c for c in fields["instanceState"] if _local(c) == "name")
            found.append(
                {
                    "id": fields["instanceId"].text,
                    "launch_index": int(fields["amiLaunchIndex"].text or -1),
                    "state": state.text,
                    "tags": tag_map,
                }
            )
    return found


def _batch_provider(moto: MotoServer, **kw: Any) -> AwsProvider:
    env = {**sandbox_aws_env(moto.endpoint_url), "PROVISIONING_AWS_COALESCE": "on"}
    env["PROVISIONING_AWS_MEMBER_TAGS"] = "1" if kw.pop("member_tags", False) else "0"
    return AwsProvider.from_env(environ=env, poll_interval=0.05, **kw)


async def test_create_batch_is_one_mutating_call_and_members_are_found_by_index(
    moto: MotoServer, calls: list[tuple[str, str]], provider: AwsProvider
) -> None:
    provider.member_tags = False  # PROVISIONING_AWS_MEMBER_TAGS=0
    run = uuid.uuid4().hex[:8]
    keys = [f"{_key()}-{i}" for i in range(5)]
    specs = [_spec(f"node-{i}", labels={"pool": "a", "run": run}) for i in range(5)]

    refs = await provider.create_batch(specs, keys, f"pb-{run}")

    mutating = [op for _, op in calls if not op.startswith("Describe")]
    assert mutating == ["RunInstances"]  # no per-instance create_tags
    assert [r.extra["launch_index"] for r in refs] == ["0", "1", "2", "3", "4"]
    assert [(r.key, r.name) for r in refs] == [
        (k, s.name) for k, s in zip(keys, specs, strict=True)
    ]
    on_moto = {i["id"]: i for i in _instances_on_moto(moto, run=run)}
    assert sorted(on_moto) == sorted(r.id for r in refs)
    for i, ref in enumerate(refs):
        # Shared tags only: labels and the batch. No Name, no key (they would cost a call each).
        assert on_moto[ref.id]["tags"] == {"pool": "a", "run": run, BATCH_TAG: f"pb-{run}"}
        assert on_moto[ref.id]["launch_index"] == i

    after_crash = _fresh(moto)  # knows neither the batch nor its region
    for i, (spec, key, ref) in enumerate(zip(specs, keys, refs, strict=True)):
        found = await after_crash.find_batch_member(f"pb-{run}", i, key, spec)
        assert found is not None and (found.id, found.key, found.name) == (ref.id, key, spec.name)
        assert found.extra["batch"] == f"pb-{run}" and found.extra["launch_index"] == str(i)
    assert await _fresh(moto).find_batch_member(f"pb-{run}", 3, keys[3]) is not None  # no zone
    assert await after_crash.find_batch_member(f"pb-{run}", 5, "k", specs[0]) is None
    assert await after_crash.find_server(keys[0]) is None  # members are not tagged by key
    await after_crash.close()


async def test_member_tags_cost_one_create_tags_per_instance(moto: MotoServer) -> None:
    provider = _batch_provider(moto, member_tags=True)
    seen: list[str] = []
    provider.add_call_listener(lambda _, op: seen.append(op))
    keys = [f"{_key()}-{i}" for i in range(4)]
    specs = [_spec(f"tagged-{i}") for i in range(4)]

    refs = await provider.create_batch(specs, keys, f"pb-{uuid.uuid4().hex[:8]}")

    assert seen.count("RunInstances") == 1 and seen.count("CreateTags") == 4
    for spec, key, ref in zip(specs, keys, refs, strict=True):
        assert _tags_on_moto(moto, ref.id)["Name"] == spec.name
        found = await _fresh(moto).find_server(key)  # findable by key as well now
        assert found is not None and found.id == ref.id
    await provider.close()


async def test_create_batch_refuses_mixed_configs(
    provider: AwsProvider, calls: list[tuple[str, str]]
) -> None:
    with pytest.raises(PermanentError):
        await provider.create_batch([_spec(), _spec(plan="t3.large")], [_key(), _key()], "pb-1")
    with pytest.raises(PermanentError):
        await provider.create_batch([_spec(), _spec(labels={"a": "b"})], [_key(), _key()], "pb-2")
    with pytest.raises(PermanentError):
        await provider.create_batch([_spec()], [_key(), _key()], "pb-3")
    assert calls == []


async def test_concurrent_lookups_of_one_batch_share_one_describe(moto: MotoServer) -> None:
    provider = _batch_provider(moto)
    keys = [f"{_key()}-{i}" for i in range(6)]
    batch = f"pb-{uuid.uuid4().hex[:8]}"
    refs = await provider.create_batch([_spec(f"n{i}") for i in range(6)], keys, batch)
    after_crash = _fresh(moto)
    seen: list[str] = []
    after_crash.add_call_listener(lambda _, op: seen.append(op))
    found = await asyncio.gather(
        *(after_crash.find_batch_member(batch, i, k, _spec()) for i, k in enumerate(keys))
    )
    assert [f.id if f else None for f in found] == [r.id for r in refs]
    assert seen == ["DescribeInstances"]
    await provider.close()
    await after_crash.close()


def test_coalesce_setting() -> None:
    assert [parse_coalesce(v) for v in (None, "", "0", "1", "off", "on", "7")] == [
        DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH, 1, 1, 1, DEFAULT_MAX_BATCH, 7,
    ]  # fmt: skip
    for bad in ("many", "-3", "100000"):
        with pytest.raises(PermanentError, match="PROVISIONING_AWS_COALESCE"):
            parse_coalesce(bad)
    default = AwsProvider.from_env({})
    assert default.max_batch == DEFAULT_MAX_BATCH and default.member_tags  # on unless refused
    assert AwsProvider.from_env({"PROVISIONING_AWS_COALESCE": "off"}).max_batch == 1
    assert not AwsProvider.from_env({"PROVISIONING_AWS_MEMBER_TAGS": "0"}).member_tags


# ---- coalesced operations through the real OperationRunner -------------------------


def _fleet(n: int, run: str, **op: Any) -> OperationPlan:
    configs = [
        {"name": f"fleet-{i:02d}", "plan": "1xCPU-2 GB", "zone": "de-fra1", "labels": {"run": run}}
        for i in range(n)
    ]
    retry = {"attempts": 3, "initial_backoff": 0, "max_backoff": 0}
    wf = workflow_from_data(
        {
            "name": "coalesce",
            "parallel_limit": n,
            "operations": [
                {
                    "id": "fleet",
                    "type": "server_batch",
                    "provider": "aws",
                    "server_configs": configs,
                    "retry": retry,
                    **op,
                }
            ],
        }
    )
    return build_plan(wf, {}).operations["fleet"]


def _items(op: OperationPlan, wid: str) -> dict[str, dict[str, Any]]:
    return {
        i.name: new_item_doc("fleet", i.name, i.kind, idempotency_key(wid, "fleet", i.name))
        for i in op.items
    }


def _identity(inst: dict[str, Any]) -> tuple[str, ...]:
    """What names an instance's item: its batch and launch index, or its key tag."""
    if BATCH_TAG in inst["tags"]:
        return (inst["tags"][BATCH_TAG], str(inst["launch_index"]))
    return (inst["tags"].get(KEY_TAG, "?"),)


def _intended(doc: dict[str, Any]) -> tuple[str, ...]:
    intent = doc["intent"] or {}
    if "batch" in intent:
        return (intent["batch"], str(intent["index"]))
    return (doc["key"],)


def _assert_one_instance_per_item(moto: MotoServer, run: str, items: dict[str, Any]) -> None:
    """Counted on moto: every live instance of this run belongs to exactly one item, the
    one whose stored intent names it (batch and launch index, or key), and is that
    item's stored result."""
    live = _instances_on_moto(moto, run=run)
    assert len(live) == len(items), (len(live), len(items))
    assert set(Counter(map(_identity, live)).values()) == {1}
    by_id = {i["id"]: i for i in live}
    for doc in items.values():
        assert doc["status"] == "Completed", doc
        assert _identity(by_id[doc["result"]["id"]]) == _intended(doc)
    assert len({d["result"]["id"] for d in items.values()}) == len(items)


async def test_twenty_identical_servers_take_one_run_instances_call(moto: MotoServer) -> None:
    run = uuid.uuid4().hex[:8]
    op = _fleet(20, run)
    provider = _batch_provider(moto)
    host = MemoryHost()
    seen: list[str] = []
    undurable: list[str] = []

    def listener(_: str, operation: str) -> None:
        seen.append(operation)
        if operation == "RunInstances":  # every member's intent is durable by now
            undurable.extend(
                d["name"] for d in host.docs.values() if "batch" not in (d["intent"] or {})
            )

    provider.add_call_listener(listener)
    items = _items(op, "wf-coalesce")
    runner = OperationRunner(op, items, host, RunnerContext(provider), capacity=20)

    outcome = await runner.run()

    assert outcome.status.value == "Completed", outcome
    assert seen.count("RunInstances") == 1 and "CreateTags" not in seen
    assert seen.count("DescribeInstances") <= 2  # members poll readiness together
    assert len(host.docs) == 20 and undurable == []
    assert outcome.coalescing is not None and outcome.coalescing["calls_saved"] == 19
    _assert_one_instance_per_item(moto, run, items)

    # Rollback deletes each coalesced server by its own stored reference.
    back = OperationRunner(op, items, host, RunnerContext(provider), capacity=20, mode=ROLLBACK)
    assert (await back.run()).status.value == "RolledBack"
    assert _instances_on_moto(moto, run=run) == []
    await provider.close()


async def test_lost_batch_reply_is_reconciled_per_item_then_rolled_back(
    moto: MotoServer,
) -> None:
    run = uuid.uuid4().hex[:8]
    op = _fleet(12, run)
    provider = _batch_provider(moto)
    seen: list[str] = []
    provider.add_call_listener(lambda _, operation: seen.append(operation))
    lost: list[bool] = []

    def lose_response(**_: object) -> None:
        if not lost:  # the first launch reaches moto; its answer never comes back
            lost.append(True)
            raise ConnectionClosedError(endpoint_url=moto.endpoint_url)

    provider._client(REGION).meta.events.register("after-call.ec2.RunInstances", lose_response)
    host = MemoryHost()
    items = _items(op, "wf-lost")

    outcome = await OperationRunner(op, items, host, RunnerContext(provider), capacity=12).run()

    assert outcome.status.value == "Completed", outcome
    assert lost and seen.count("RunInstances") == 1  # adopted, never launched again
    assert {d["attempt"] for d in items.values()} == {1}  # the retry adopted, no new intent
    _assert_one_instance_per_item(moto, run, items)

    # A crash-like rollback: the results are gone, only the intents are left.
    for doc in items.values():
        doc["result"], doc["status"] = None, "Failed"
    fresh = _fresh(moto)
    back = OperationRunner(op, items, host, RunnerContext(fresh), capacity=12, mode=ROLLBACK)
    assert (await back.run()).status.value == "RolledBack"
    assert _instances_on_moto(moto, run=run) == []
    await provider.close()
    await fresh.close()


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


# ---- kill -9 around the batched call, through `provisioning batch run` ---------------

CRASH_FLEET = 12


def _crash_workflow(path: Path, run: str) -> None:
    config = '{{ name = "c-{i:02d}", plan = "1xCPU-2 GB", zone = "de-fra1", labels = {labels} }}'
    labels = f'{{ run = "{run}" }}'
    configs = ", ".join(config.format(i=i, labels=labels) for i in range(CRASH_FLEET))
    path.write_text(
        f"""{{ batch_workflow = {{
  name = "coalesced-crash", storage_backend = "filesystem", parallel_limit = {CRASH_FLEET},
  operations = [
    {{ id = "fleet", type = "server_batch", provider = "aws", server_configs = [{configs}] }},
  ] }} }}
"""
    )


@pytest.mark.parametrize("point", ["after_intent:3:create", "after_call:3:create"])
def test_kill_around_the_batched_call_then_resume_makes_one_instance_per_item(
    moto: MotoServer, tmp_path: Path, point: str
) -> None:
    from tests.integration.faults import server_items
    from tests.integration.test_faults_crash import (
        base_env,
        cli,
        load_offline,
        resume,
        run_until_crash,
    )

    run = uuid.uuid4().hex[:8]
    wf = tmp_path / "wf.ncl"
    _crash_workflow(wf, run)
    data = tmp_path / "data"
    env = base_env(
        data,
        **sandbox_aws_env(moto.endpoint_url),
        PROVISIONING_AWS_COALESCE="on",
        PROVISIONING_POLL_INTERVAL="0.05",
    )
    wid = run_until_crash(
        cli("batch", "run", str(wf), "--json"),
        {**env, "PROVISIONING_CRASH_AT": point},
        tmp_path / "crash.err",
    )

    left = server_items(load_offline(data, "filesystem", wid))
    live = _instances_on_moto(moto, run=run)
    # Nothing exists on moto that a durable intent does not name.
    intended = {_intended(d) for d in left.values() if d.get("intent")}
    assert {_identity(i) for i in live} <= intended
    if point.startswith("after_call"):
        # One call launched the whole fleet; the kill came before most results were stored.
        assert len(live) == CRASH_FLEET and len({i["tags"][BATCH_TAG] for i in live}) == 1
        assert any(d["status"] != "Completed" for d in left.values())
    else:
        # Intents durable, the shared call never made.
        assert live == [] and any(d.get("intent") for d in left.values())

    doc = resume(wid, env)
    assert doc["status"] == "Completed", doc
    final = server_items(load_offline(data, "filesystem", wid))
    _assert_one_instance_per_item(moto, run, final)
    batches = {d["intent"].get("batch") for d in final.values()}
    crashed = {d["intent"].get("batch") for d in left.values() if d.get("intent")}
    if point.startswith("after_call"):
        assert batches == crashed  # every item adopted its member of the one launch
    else:
        # Relaunched: those that reconciled first may land in a second window.
        assert not batches & crashed and len(batches - {None}) >= 1
