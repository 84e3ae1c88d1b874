"""AWS EC2 behind the four-call provider interface (boto3, run in threads).

Why it is built this way:
- botocore's own retries are off. The retry loop above owns retries, and before it
  sends a create again it reconciles by the key tag: moto (the sandbox) ignores
  ``ClientToken`` and AWS honours it only for a while. A second retry layer would
  also hide throttling from the shared rate limiter.
- Every boto3/botocore error is translated in ``map_aws_error`` (aws_errors.py) and
  nowhere else.
- boto3 clients are thread-safe but creating them from one Session is not, so client
  creation (one per region, lazily) happens under a lock.
- ``find_server(key)`` gets only a key. It searches the key's region when this
  provider knows it (from a create, an earlier find, or the optional ``zone``), else
  every region of the zone table and every region used so far: a missed key means a
  second server for it.

Batch creation (``create_batch``, used by ``runtime.coalesce`` when ``max_batch > 1``:
``PROVISIONING_AWS_COALESCE``, on by default with batches of up to 50; ``off`` sends
one ``run_instances`` per item).
- N configs identical in all but name (plan, zone, image, user_data, labels) are
  launched by ONE ``run_instances`` with ``MinCount = MaxCount = N``: all or nothing.
  EC2 throttles mutating calls per account with one token bucket (burst 50, refill
  5/s), so N items cost one token instead of N.
- Tags at launch are what every member shares: the labels and ``provisioning:batch =
  <batch id>`` (``TagSpecifications`` cannot differ per instance). The batch id is
  also the ``ClientToken``.
- A member's identity is (batch id, ``AmiLaunchIndex``): EC2 numbers the instances of
  one request 0..N-1 and returns the number in ``RunInstances`` and
  ``DescribeInstances``. The item's intent records both before the call, so
  ``find_batch_member`` finds exactly its own instance after a crash or a lost reply:
  one ``DescribeInstances`` by the batch tag (non-mutating bucket; concurrent lookups of
  one batch share it), filtered by launch index here (moto has no ``launch-index``
  filter). ``wait_ready`` of members polls the same way: the members of one launch
  poll together, so one DescribeInstances per round serves all of them.
- Per-instance ``Name`` and key tags: EC2 has no call that writes a different tag
  value to each of several resources, so they cost one ``create_tags`` per instance.
  By default (``member_tags``, ``PROVISIONING_AWS_MEMBER_TAGS``) they are written right
  after the launch, best effort (a failure is logged, the members still count as
  created): the console shows names and ``find_server(key)`` works for members, and
  ``run_instances`` (EC2's resource-intensive call) drops from N to N/50, but the
  mutating calls total N + N/50. ``PROVISIONING_AWS_MEMBER_TAGS=0`` leaves them out:
  N/50 mutating calls in all, and a coalesced instance is found by its batch and index,
  which the store holds (orphan sweeps look for the ``provisioning:batch`` tag).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from runtime.errors import PermanentError, ProviderError, ThrottledError, TransientError
from runtime.providers.aws_errors import aws_errors
from runtime.providers.aws_tables import (
    _AMI,
    _AZ,
    _INSTANCE_TYPE,
    _REGION,
    DEFAULT_PLANS,
    DEFAULT_ZONES,
    load_tables,
)
from runtime.providers.base import Provider, ServerRef
from schemas.models import ServerConfigSpec

log = logging.getLogger(__name__)

KEY_TAG = "provisioning:key"
BATCH_TAG = "provisioning:batch"
DEFAULT_MAX_BATCH = 50  # instances per coalesced run_instances when coalescing is "on"
MAX_BATCH_LIMIT = 1000  # EC2's per-instance RunInstances bucket holds 1,000
CANONICAL_OWNER = "099720109477"  # Ubuntu images are published by this account
UBUNTU_FILTERS = [
    {"Name": "name", "Values": ["ubuntu/images/hvm-ssd*/ubuntu-*-amd64-server-*"]},
    {"Name": "state", "Values": ["available"]},
]

_LIVE_STATES = ["pending", "running", "stopping", "stopped"]


def client_token(key: str) -> str:
    """EC2's idempotency token for ``key``: the key itself if it fits, else its hash."""
    if len(key) <= 64 and key.isascii() and key.isprintable():
        return key
    return hashlib.sha256(key.encode()).hexdigest()  # exactly 64 characters


class AwsProvider(Provider):
    name = "aws"

    def __init__(
        self,
        region_table: Mapping[str, str] | None = None,
        plan_table: Mapping[str, str] | None = None,
        endpoint_url: str | None = None,
        *,
        poll_interval: float = 5.0,
        images: Mapping[str, str] | None = None,
        session: Any = None,
        max_pool_connections: int = 50,
        max_batch: int = 1,
        member_tags: bool = False,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise PermanentError(f"max_batch must be 1..{MAX_BATCH_LIMIT}, got {max_batch}")
        self.max_batch = max_batch
        self.member_tags = member_tags
        self.zones = {**DEFAULT_ZONES, **(region_table or {})}
        self.plans = {**DEFAULT_PLANS, **(plan_table or {})}
        self.endpoint_url = endpoint_url
        self.poll_interval = poll_interval
        self._images: dict[str, str] = dict(images or {})
        self._session = session if session is not None else boto3.session.Session()
        self._config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=max_pool_connections,
        )
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._image_locks: dict[str, threading.Lock] = {}
        self._key_regions: dict[str, str] = {}
        self._batch_regions: dict[str, str] = {}
        self._batch_lookups: dict[tuple[str, str, bool], asyncio.Future[list[dict[str, Any]]]] = {}
        self._listeners: list[Callable[[str, str], None]] = []

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        tables_path: str | Path | None = None,
        poll_interval: float = 5.0,
    ) -> AwsProvider:
        """Endpoint from ``AWS_ENDPOINT_URL``, table overrides from ``tables_path`` or
        ``PROVISIONING_AWS_TABLES``; credentials from ``environ``'s ``AWS_*`` keys when
        present, else boto3's usual chain (profile, SSO, instance role). Coalesced
        creates from ``PROVISIONING_AWS_COALESCE`` (on = 50, the default | off | the batch
        size) and ``PROVISIONING_AWS_MEMBER_TAGS`` (on by default: also tag each member,
        one call each; 0 leaves member tags out)."""
        env = os.environ if environ is None else environ
        tables_path = tables_path or env.get("PROVISIONING_AWS_TABLES") or None
        tables = load_tables(tables_path) if tables_path else {}
        session = None
        if environ is not None:  # os.environ is read by boto3 itself
            session = boto3.session.Session(
                aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                aws_session_token=env.get("AWS_SESSION_TOKEN"),
                profile_name=env.get("AWS_PROFILE"),
            )
        return cls(
            tables.get("zones"),
            tables.get("plans"),
            env.get("AWS_ENDPOINT_URL") or None,
            poll_interval=poll_interval,
            images=tables.get("images"),
            session=session,
            max_batch=parse_coalesce(env.get("PROVISIONING_AWS_COALESCE")),
            member_tags=_flag(env.get("PROVISIONING_AWS_MEMBER_TAGS"), default=True),
        )

    def __repr__(self) -> str:  # never show the session: it holds credentials
        return f"AwsProvider(endpoint_url={self.endpoint_url!r})"

    # ---- tables -------------------------------------------------------------------

    def resolve_zone(self, zone: str) -> tuple[str, str | None]:
        """(region, availability zone or None) for a table name, region or AZ."""
        value = self.zones.get(zone, zone)
        if m := _AZ.match(value):
            return m.group(1), value
        if _REGION.match(value):
            return value, None
        raise PermanentError(
            f"unknown AWS zone {zone!r}: not in the zone table and not a region or AZ",
            code="UnknownZone",
        )

    def resolve_plan(self, plan: str) -> str:
        value = self.plans.get(plan, plan)
        if _INSTANCE_TYPE.match(value):
            return value
        raise PermanentError(
            f"unknown AWS plan {plan!r}: not in the plan table and not an instance type",
            code="UnknownPlan",
        )

    # ---- clients ------------------------------------------------------------------

    def add_call_listener(self, listener: Callable[[str, str], None]) -> Callable[[], None]:
        """Call ``listener(region, operation)`` before every EC2 API call; returns an
        unsubscribe function. For metrics and for tests that count calls."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _client(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._session.client(
                    "ec2", region_name=region, endpoint_url=self.endpoint_url, config=self._config
                )
                client.meta.events.register("before-call.ec2", self._make_hook(region))
                self._clients[region] = client
                self._image_locks.setdefault(region, threading.Lock())
            return client

    def _make_hook(self, region: str) -> Callable[..., None]:
        def hook(model: Any, **_: Any) -> None:
            for listener in list(self._listeners):
                listener(region, str(model.name))

        return hook

    async def _call(self, region: str, operation: str, **params: Any) -> Any:
        def run() -> Any:
            with aws_errors():
                return getattr(self._client(region), operation)(**params)

        return await asyncio.to_thread(run)

    def _default_image(self, region: str) -> str:
        """The newest Canonical Ubuntu amd64 image of ``region``, looked up once."""
        if region in self._images:
            return self._images[region]
        with aws_errors():
            client = self._client(region)
        with self._image_locks[region], aws_errors():
            if region not in self._images:
                images = client.describe_images(Owners=[CANONICAL_OWNER], Filters=UBUNTU_FILTERS)
                images = images["Images"]
                if not images:
                    raise PermanentError(
                        f"no default Ubuntu image in {region}: set `image` to an AMI id",
                        code="NoDefaultImage",
                    )
                best = max(images, key=lambda i: (i.get("CreationDate", ""), i["Name"]))
                self._images[region] = str(best["ImageId"])
        return self._images[region]

    # ---- the provider interface ---------------------------------------------------

    async def _launch_params(
        self, spec: ServerConfigSpec, count: int
    ) -> tuple[str, dict[str, Any]]:
        region, az = self.resolve_zone(spec.zone)
        params: dict[str, Any] = {
            "InstanceType": self.resolve_plan(spec.plan),
            "MinCount": count,
            "MaxCount": count,
        }
        if spec.image is not None:
            if not _AMI.match(spec.image):
                raise PermanentError(f"image {spec.image!r} is not an AMI id", code="BadImage")
            params["ImageId"] = spec.image
        else:
            params["ImageId"] = await asyncio.to_thread(self._default_image, region)
        if az:
            params["Placement"] = {"AvailabilityZone": az}
        if spec.user_data:
            params["UserData"] = spec.user_data  # boto3 base64-encodes it
        return region, params

    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        region, params = await self._launch_params(spec, 1)
        tags = _tags(spec, key)
        params["ClientToken"] = client_token(key)
        params["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tags}]
        self._key_regions[key] = region  # before the call: a lost response must be findable
        resp = await self._call(region, "run_instances", **params)
        return _to_ref(resp["Instances"][0], region, key=key, name=spec.name)

    async def create_batch(
        self, specs: list[ServerConfigSpec], keys: list[str], batch: str
    ) -> list[ServerRef]:
        """Launch identical configs with ONE run_instances; member ``i`` is the instance
        with ``AmiLaunchIndex == i`` (see the module docstring for the tags)."""
        if not specs or len(specs) != len(keys):
            raise PermanentError("create_batch needs one key per spec, and at least one")
        first = specs[0]
        if any(batch_shape(s) != batch_shape(first) for s in specs):
            raise PermanentError(
                "create_batch needs specs identical in plan, zone, image, user_data, labels"
            )
        region, params = await self._launch_params(first, len(specs))
        shared = [{"Key": k, "Value": v} for k, v in {**first.labels, BATCH_TAG: batch}.items()]
        params["ClientToken"] = client_token(batch)
        params["TagSpecifications"] = [{"ResourceType": "instance", "Tags": shared}]
        # Before the call: a lost response must be findable in this region.
        self._batch_regions[batch] = region
        for key in keys:
            self._key_regions[key] = region
        resp = await self._call(region, "run_instances", **params)
        by_index = {int(i.get("AmiLaunchIndex", -1)): i for i in resp["Instances"]}
        if sorted(by_index) != list(range(len(specs))):
            raise PermanentError(
                f"run_instances for batch {batch} returned launch indexes {sorted(by_index)}, "
                f"not 0..{len(specs) - 1}: its instances carry {BATCH_TAG}={batch}",
                code="BadLaunchIndex",
            )
        members = [{**by_index[i], "Tags": shared} for i in range(len(specs))]
        if self.member_tags:
            await self._tag_members(region, batch, members, specs, keys)
        return [
            _to_ref(inst, region, key=key, name=spec.name)
            for inst, spec, key in zip(members, specs, keys, strict=True)
        ]

    async def _tag_members(
        self,
        region: str,
        batch: str,
        members: list[dict[str, Any]],
        specs: list[ServerConfigSpec],
        keys: list[str],
    ) -> None:
        """Name and key tags, one create_tags per instance (EC2 writes one tag value per
        call). Best effort: the members exist and are found by batch and index anyway."""
        for i, (inst, spec, key) in enumerate(zip(members, specs, keys, strict=True)):
            tags = [{"Key": "Name", "Value": spec.name}, {"Key": KEY_TAG, "Value": key}]
            try:
                await self._call(region, "create_tags", Resources=[inst["InstanceId"]], Tags=tags)
            except ProviderError as exc:
                log.warning(
                    "batch %s: %d of %d members left without Name/key tags: %s",
                    batch,
                    len(members) - i,
                    len(members),
                    exc,
                )
                return
            inst["Tags"] = [*inst["Tags"], *tags]

    async def find_batch_member(
        self, batch: str, index: int, key: str, spec: ServerConfigSpec | None = None
    ) -> ServerRef | None:
        if spec is not None:
            regions = [self.resolve_zone(spec.zone)[0]]
        elif batch in self._batch_regions:
            regions = [self._batch_regions[batch]]
        else:
            regions = self._search_regions()
        found = await asyncio.gather(*(self._batch_in(r, batch) for r in regions))
        members = [
            (inst, region)
            for region, insts in zip(regions, found, strict=True)
            for inst in insts
            if int(inst.get("AmiLaunchIndex", -1)) == index
        ]
        if not members:
            return None
        # One call makes one instance per index; more than one would be a reused id.
        inst, region = min(
            members, key=lambda m: (str(m[0].get("LaunchTime", "")), m[0]["InstanceId"])
        )
        self._batch_regions[batch] = self._key_regions[key] = region
        return _to_ref(inst, region, key=key, name=spec.name if spec is not None else None)

    async def _batch_in(
        self, region: str, batch: str, *, live_only: bool = True
    ) -> list[dict[str, Any]]:
        """Instances of ``batch`` in ``region`` (only live ones, or in any state).
        Members of one batch reconcile, and poll for readiness, together: concurrent
        lookups share one DescribeInstances instead of one call per member."""
        slot = (region, batch, live_only)
        lookup = self._batch_lookups.get(slot)
        if lookup is None:
            lookup = asyncio.ensure_future(
                self._describe(region, f"tag:{BATCH_TAG}", batch, live_only=live_only)
            )
            self._batch_lookups[slot] = lookup
            lookup.add_done_callback(lambda f: _forget(self._batch_lookups, slot, f))
        return await asyncio.shield(lookup)

    async def _describe(
        self, region: str, tag_filter: str, value: str, *, live_only: bool = True
    ) -> list[dict[str, Any]]:
        filters = [{"Name": tag_filter, "Values": [value]}]
        if live_only:
            filters.append({"Name": "instance-state-name", "Values": _LIVE_STATES})

        def run() -> list[dict[str, Any]]:
            with aws_errors():
                pages = self._client(region).get_paginator("describe_instances")
                return [
                    inst
                    for page in pages.paginate(Filters=filters)
                    for res in page["Reservations"]
                    for inst in res["Instances"]
                ]

        return await asyncio.to_thread(run)

    async def find_servers(self, key: str, zone: str | None = None) -> list[ServerRef]:
        """Every live instance carrying ``key``, oldest first (more than one is a
        duplicate for the caller to clean up)."""
        if zone is not None:
            regions = [self.resolve_zone(zone)[0]]
        elif key in self._key_regions:
            regions = [self._key_regions[key]]
        else:
            regions = self._search_regions()
        found = await asyncio.gather(*(self._find_in(r, key) for r in regions))
        refs = sorted((r for rs in found for r in rs), key=lambda r: (r.extra["launched"], r.id))
        if refs:
            self._key_regions[key] = refs[0].extra["region"]
        return refs

    async def find_server(self, key: str, zone: str | None = None) -> ServerRef | None:
        refs = await self.find_servers(key, zone)
        return refs[0] if refs else None

    def _search_regions(self) -> list[str]:
        regions = {self.resolve_zone(z)[0] for z in self.zones}
        with self._lock:
            regions |= set(self._clients)
        return sorted(regions)

    async def _find_in(self, region: str, key: str) -> list[ServerRef]:
        return [_to_ref(i, region) for i in await self._describe(region, f"tag:{KEY_TAG}", key)]

    async def wait_ready(self, ref: ServerRef, timeout: float | None = None) -> ServerRef:
        # Polling instead of the boto3 waiter: the waiter holds a thread while it
        # sleeps, and this loop tolerates the brief NotFound right after a create.
        region = self._region_of(ref)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current, delay, last = await self._poll(region, ref)
            if current is not None and current.state == "running":
                return current
            if current is not None and current.state != "pending":
                raise PermanentError(
                    f"instance {ref.id} is {current.state}, it will not become running",
                    code="InstanceNotRunning",
                )
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TransientError(
                    f"instance {ref.id} not running after {timeout}s (last: {last})",
                    code="WaitTimeout",
                )
            await asyncio.sleep(delay)

    async def _poll(self, region: str, ref: ServerRef) -> tuple[ServerRef | None, float, str]:
        """(current ref or None, delay before the next poll, what was seen)."""
        if batch := ref.extra.get("batch"):
            return await self._poll_member(region, ref, batch)
        try:
            resp = await self._call(region, "describe_instances", InstanceIds=[ref.id])
        except ThrottledError as exc:
            return None, max(self.poll_interval, exc.retry_after or 0.0), str(exc)
        except TransientError as exc:
            return None, self.poll_interval, str(exc)
        except PermanentError as exc:
            if exc.code != "InvalidInstanceID.NotFound":  # AWS is briefly behind a create
                raise
            return None, self.poll_interval, str(exc)
        insts = [i for r in resp["Reservations"] for i in r["Instances"]]
        if not insts:
            return None, self.poll_interval, "not listed yet"
        current = _to_ref(insts[0], region, key=ref.key, name=ref.name)
        return current, self.poll_interval, current.state

    async def _poll_member(
        self, region: str, ref: ServerRef, batch: str
    ) -> tuple[ServerRef | None, float, str]:
        """A coalesced member polls with its batch: one DescribeInstances by the batch
        tag serves every member polling at the same time (they launched together)."""
        try:
            insts = await self._batch_in(region, batch, live_only=False)
        except ThrottledError as exc:
            return None, max(self.poll_interval, exc.retry_after or 0.0), str(exc)
        except TransientError as exc:
            return None, self.poll_interval, str(exc)
        mine = [i for i in insts if i["InstanceId"] == ref.id]
        if not mine:
            return None, self.poll_interval, "not listed yet"
        current = _to_ref(mine[0], region, key=ref.key, name=ref.name)
        return current, self.poll_interval, current.state

    async def delete_server(self, ref: ServerRef) -> None:
        try:
            await self._call(self._region_of(ref), "terminate_instances", InstanceIds=[ref.id])
        except PermanentError as exc:
            if exc.code != "InvalidInstanceID.NotFound":
                raise
        self._key_regions.pop(ref.key, None)

    def _region_of(self, ref: ServerRef) -> str:
        if region := ref.extra.get("region"):
            return region
        return self.resolve_zone(ref.zone)[0]

    async def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def parse_coalesce(value: str | None) -> int:
    """``PROVISIONING_AWS_COALESCE``: off, 0 or 1 -> 1 (each item its own call); unset
    or on -> ``DEFAULT_MAX_BATCH``; a number -> that many instances per call at most."""
    text = (value or "").strip().lower()
    if text in ("0", "1", "off", "false", "no"):
        return 1
    if text in ("", "on", "true", "yes"):
        return DEFAULT_MAX_BATCH
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_BATCH_LIMIT:
        raise PermanentError(
            f"PROVISIONING_AWS_COALESCE must be off, on or 1..{MAX_BATCH_LIMIT}: {value!r}",
            code="BadSetting",
        )
    return n


def _flag(value: str | None, default: bool) -> bool:
    text = (value or "").strip().lower()
    return default if not text else text in ("1", "on", "true", "yes")


def batch_shape(spec: ServerConfigSpec) -> tuple[Any, ...]:
    """What members of one coalesced launch share: everything but the name."""
    return (spec.plan, spec.zone, spec.image, spec.user_data, tuple(sorted(spec.labels.items())))


def _forget(
    lookups: dict[tuple[str, str, bool], asyncio.Future[list[dict[str, Any]]]],
    slot: tuple[str, str, bool],
    done: asyncio.Future[list[dict[str, Any]]],
) -> None:
    if lookups.get(slot) is done:
        del lookups[slot]
    if not done.cancelled():
        done.exception()  # retrieved: every caller may have given up waiting


def _tags(spec: ServerConfigSpec, key: str) -> list[dict[str, str]]:
    tags = {**spec.labels, "Name": spec.name, KEY_TAG: key}
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _to_ref(
    inst: Mapping[str, Any], region: str, *, key: str | None = None, name: str | None = None
) -> ServerRef:
    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    launched = inst.get("LaunchTime")
    batch = {}
    if BATCH_TAG in tags:  # a member of a coalesced launch: its identity
        batch = {"batch": tags[BATCH_TAG], "launch_index": str(inst.get("AmiLaunchIndex", ""))}
    return ServerRef(
        provider="aws",
        id=str(inst["InstanceId"]),
        name=name if name is not None else tags.get("Name", ""),
        key=key if key is not None else tags.get(KEY_TAG, ""),
        state=str(inst.get("State", {}).get("Name", "")),
        zone=str(inst.get("Placement", {}).get("AvailabilityZone", "")),
        public_ip=inst.get("PublicIpAddress"),
        private_ip=inst.get("PrivateIpAddress"),
        extra={
            "region": region,
            "instance_type": str(inst.get("InstanceType", "")),
            "image_id": str(inst.get("ImageId", "")),
            "launched": launched.isoformat() if launched is not None else "",
            **batch,
        },
    )
