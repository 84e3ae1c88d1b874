"""AWS EC2 behind the four-call provider interface (boto3, run in threads).

Why it is built this way:
- botocore's own retries are off. The retry loop above owns retries, and before it
  sends a create again it reconciles by the key tag: moto (the sandbox) ignores
  ``ClientToken`` and AWS honours it only for a while. A second retry layer would
  also hide throttling from the shared rate limiter.
- Every boto3/botocore error is translated in ``map_aws_error`` and nowhere else.
- boto3 clients are thread-safe but creating them from one Session is not, so client
  creation (one per region, lazily) happens under a lock.
- ``find_server(key)`` gets only a key. It searches the key's region when this
  provider knows it (from a create, an earlier find, or the optional ``zone``), else
  every region of the zone table and every region used so far: a missed key means a
  second server for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoAuthTokenError,
    NoCredentialsError,
    PartialCredentialsError,
    SSOError,
    TokenRetrievalError,
)
from botocore.parsers import ResponseParserError

from runtime.errors import AuthError, PermanentError, ProviderError, ThrottledError, TransientError
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

KEY_TAG = "provisioning:key"
BATCH_TAG = "provisioning:batch"
CANONICAL_OWNER = "099720109477"  # Ubuntu images are published by this account
UBUNTU_FILTERS = [
    {"Name": "name", "Values": ["ubuntu/images/hvm-ssd*/ubuntu-*-amd64-server-*"]},
    {"Name": "state", "Values": ["available"]},
]

_LIVE_STATES = ["pending", "running", "stopping", "stopped"]

# EC2 error codes by what the retry loop should do; any other 4xx is permanent.
_THROTTLE_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "SlowDown"}
_AUTH_CODES = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "Blocked"}
_AUTH_CODES |= {"SignatureDoesNotMatch", "IncompleteSignature", "MissingAuthenticationToken"}
_AUTH_CODES |= {"ExpiredToken", "RequestExpired", "AccessDenied", "OptInRequired"}
_TRANSIENT_CODES = {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"}
_TRANSIENT_CODES |= {"RequestTimeout", "RequestTimeoutException"}
# Capacity shortages are 4xx on EC2 but come back: worth retrying later.
_TRANSIENT_CODES |= {"InsufficientInstanceCapacity", "InsufficientHostCapacity"}
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
_TOKEN_ERRORS = (TokenRetrievalError, NoAuthTokenError, SSOError)
_NETWORK_ERRORS: tuple[type[Exception], ...] = (ConnectionError, HTTPClientError)
# OSError: raw socket errors that botocore did not wrap.
_NETWORK_ERRORS += (IncompleteReadError, ResponseParserError, OSError)


def _first_line(text: str) -> str:
    # Some AWS messages append the canonical request, which can carry a session token.
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def map_aws_error(exc: BaseException) -> ProviderError:
    """The one translation of boto3/botocore errors into the runtime's error classes."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(err.get("Code", "Unknown"))
        status = meta.get("HTTPStatusCode")
        msg = f"{exc.operation_name}: {code}: {_first_line(str(err.get('Message', '')))}"
        if code in _THROTTLE_CODES or status == 429:
            return ThrottledError(msg, retry_after=_retry_after(meta), status=status, code=code)
        if code in _AUTH_CODES or status in (401, 403):
            return AuthError(msg, status=status, code=code)
        if code in _TRANSIENT_CODES or (status is not None and status >= 500):
            return TransientError(msg, status=status, code=code)
        return PermanentError(msg, status=status, code=code)
    name = type(exc).__name__
    if isinstance(exc, _CREDENTIAL_ERRORS + _TOKEN_ERRORS):
        return AuthError(f"AWS credentials: {name}", code=name)  # the text may name a profile
    detail = f"{name}: {_first_line(str(exc))}"
    if isinstance(exc, _NETWORK_ERRORS):
        return TransientError(f"AWS connection: {detail}", code=name)
    return PermanentError(f"AWS client: {detail}", code=name)


def _retry_after(meta: Mapping[str, Any]) -> float | None:
    headers = {str(k).lower(): v for k, v in (meta.get("HTTPHeaders") or {}).items()}
    try:
        return max(0.0, float(headers["retry-after"]))
    except (KeyError, TypeError, ValueError):
        return None  # EC2 sends none; an HTTP date is not worth parsing here


@contextmanager
def _aws_errors() -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError, ResponseParserError, OSError) as exc:
        raise map_aws_error(exc) from exc


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
    ) -> None:
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
        present, else boto3's usual chain (profile, SSO, instance role)."""
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
            with _aws_errors():
                return getattr(self._client(region), operation)(**params)

        return await asyncio.to_thread(run)

    def _default_image(self, region: str) -> str:
        """The newest Canonical Ubuntu amd64 image of ``region``, looked up once."""
        if region in self._images:
            return self._images[region]
        with _aws_errors():
            client = self._client(region)
        with self._image_locks[region], _aws_errors():
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

    async def create_servers(
        self, specs: list[ServerConfigSpec], keys: list[str]
    ) -> list[ServerRef]:
        """Create identical configs with ONE run_instances call, then tag each instance
        with its own Name and key (one create_tags call each).

        Reconcile stays per item: a retry of any item uses find_server(key) and
        create_server. Between the launch and the tagging, instances carry only the
        ``provisioning:batch`` tag (a hash of the keys), so a crash in that window
        leaves instances that orphan sweeps can find by that tag, never by a key.
        """
        if not specs or len(specs) != len(keys):
            raise PermanentError("create_servers needs one key per spec, and at least one")
        first = specs[0]
        shape = (first.plan, first.zone, first.image, first.user_data)
        if any((s.plan, s.zone, s.image, s.user_data) != shape for s in specs):
            raise PermanentError("create_servers needs specs with one plan, zone, image")
        region, params = await self._launch_params(first, len(specs))
        batch = client_token("\n".join(keys))
        params["ClientToken"] = batch
        params["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": BATCH_TAG, "Value": batch}]}
        ]
        for key in keys:
            self._key_regions[key] = region
        resp = await self._call(region, "run_instances", **params)
        instances = sorted(resp["Instances"], key=lambda i: int(i.get("AmiLaunchIndex", 0)))
        refs = []
        for inst, spec, key in zip(instances, specs, keys, strict=True):
            tags = _tags(spec, key)
            await self._call(region, "create_tags", Resources=[inst["InstanceId"]], Tags=tags)
            refs.append(_to_ref({**inst, "Tags": tags}, region, key=key, name=spec.name))
        return refs

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
        filters = [
            {"Name": f"tag:{KEY_TAG}", "Values": [key]},
            {"Name": "instance-state-name", "Values": _LIVE_STATES},
        ]

        def run() -> list[dict[str, Any]]:
            with _aws_errors():
                pages = self._client(region).get_paginator("describe_instances")
                return [
                    inst
                    for page in pages.paginate(Filters=filters)
                    for res in page["Reservations"]
                    for inst in res["Instances"]
                ]

        return [_to_ref(i, region) for i in await asyncio.to_thread(run)]

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


def _tags(spec: ServerConfigSpec, key: str) -> list[dict[str, str]]:
    tags = {**spec.labels, "Name": spec.name, KEY_TAG: key}
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _to_ref(
    inst: Mapping[str, Any], region: str, *, key: str | None = None, name: str | None = None
) -> ServerRef:
    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    launched = inst.get("LaunchTime")
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
        },
    )
