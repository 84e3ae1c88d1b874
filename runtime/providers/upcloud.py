"""UpCloud behind the four-call provider interface, on the ``upcloud-api`` client.

Why it is built this way:
- The client (2.9.0) drops the HTTP status and ``Retry-After`` and raises a JSON
  decode error on a non-JSON body (a proxy's 502 page, a reply cut short). So its
  ``API`` class is replaced by ``_StatusKeepingAPI`` at the same boundary; every call
  still goes through the client's ``api_root`` and its ``Authorization`` header (Basic
  or Bearer, which ``CloudManager`` builds from username/password or token).
- Every error is translated in ``map_upcloud_error`` and nowhere else, and re-raised
  ``from None``: the library's exceptions hold the request, and with it the
  credentials header, so they must not ride along as ``__cause__``.
- UpCloud has no idempotency token. Each server carries the item key in a label and
  ``find_server`` lists by that label; the retry loop above finds before it creates.
- Mutating calls (create, stop, start, delete) make one request each and let
  ``ThrottledError`` out, so the shared throttle learns the provider's pace. Status
  polls absorb transient errors until their deadline: a lost poll costs nothing.
- The client blocks; calls run on this provider's own thread pool so a burst of
  creates is not capped by the event loop's small default executor.
- Servers booting at once are polled together: one list call per tick for all of
  them (``StateBoard``), not one GET per server per tick.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests
from upcloud_api import CloudManager, Label, Server, Storage
from upcloud_api.api import API
from upcloud_api.errors import UpCloudAPIError, UpCloudClientError

from runtime.errors import AuthError, PermanentError, ProviderError, ThrottledError, TransientError
from runtime.providers.base import Provider, ServerRef
from runtime.providers.state_board import StateBoard
from schemas.models import ServerConfigSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_API_ROOT = "https://api.upcloud.com/1.3"
UNLISTED_POLLS = 3  # polls a waited-on server may be missing from the list before it is gone
KEY_LABEL = "provisioning-key"
# UpCloud label values are at most 255 characters; keys outside this safe set are hashed.
_LABEL_VALUE_OK = re.compile(r"^[A-Za-z0-9._:@/+-]{1,255}$")
DEFAULT_IMAGE = "01000000-0000-4000-8000-000030240200"  # Ubuntu Server 24.04 LTS
IMAGE_ALIASES: dict[str, str] = {
    "ubuntu-24.04": DEFAULT_IMAGE,
    "ubuntu-22.04": "01000000-0000-4000-8000-000030220200",
    "debian-12": "01000000-0000-4000-8000-000020070100",
    "rocky-9": "01000000-0000-4000-8000-000150020100",
    "almalinux-9": "01000000-0000-4000-8000-000140020100",
}


class UpCloudHTTPError(UpCloudAPIError):  # type: ignore[misc]  # the library has no types
    """The stock error plus what it drops: the HTTP status and Retry-After (seconds)."""

    def __init__(
        self, status: int, code: str | None, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(error_code=code, error_message=message)
        self.status = status
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _error_fields(payload: Any) -> tuple[str | None, str]:
    """(code, message) from ``{"error": {...}}`` or the problem+json form newer endpoints use."""
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            return err.get("error_code"), str(err.get("error_message", ""))
        if payload.get("type") or payload.get("title"):
            return payload.get("title"), str(payload.get("detail", payload.get("title", "")))
    return None, ""


class _StatusKeepingAPI(API):  # type: ignore[misc]  # the library has no types
    """``upcloud_api.api.API`` that keeps status and Retry-After and survives non-JSON.

    One ``requests.Session`` per worker thread: connections are reused, and no session
    is shared between threads.
    """

    def __init__(self, token: str, timeout: float, api_root: str) -> None:
        super().__init__(token=token, timeout=timeout)
        self.api_root = api_root
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def api_request(
        self,
        method: str,
        endpoint: str,
        body: Any = None,
        params: Any = None,
        timeout: float | None = -1,
    ) -> Any:
        headers = {"Authorization": self.token, "User-Agent": self.user_agent}
        data = None
        if body:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        res = self._session().request(
            method,
            f"{self.api_root}{endpoint}",
            data=data,
            params=params,
            headers=headers,
            timeout=self.timeout if timeout == -1 else timeout,
        )
        payload: Any = {}
        if res.content:
            try:
                payload = res.json()
            except ValueError:
                raise UpCloudHTTPError(
                    res.status_code,
                    None,
                    f"HTTP {res.status_code} with a non-JSON body",
                    parse_retry_after(res.headers.get("Retry-After")),
                ) from None
        if res.status_code >= 400:
            code, message = _error_fields(payload)
            raise UpCloudHTTPError(
                res.status_code, code, message, parse_retry_after(res.headers.get("Retry-After"))
            )
        return payload


def map_upcloud_error(exc: BaseException) -> ProviderError:
    """The one place where the client's and the transport's errors become ours."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, UpCloudHTTPError):
        status, code = exc.status, exc.error_code
        text = f"UpCloud HTTP {status}" + (f" {code}" if code else "")
        if exc.error_message:
            text += f": {exc.error_message}"
        if status == 429:
            return ThrottledError(text, retry_after=exc.retry_after, status=status, code=code)
        if status in (401, 403):
            return AuthError(text, status=status, code=code)
        # 2xx/3xx land here only with a body we could not read: the reply was mangled.
        if status >= 500 or status < 400 or status == 408:
            return TransientError(text, status=status, code=code)
        return PermanentError(text, status=status, code=code)
    if isinstance(exc, UpCloudAPIError):  # raised by client code paths we do not override
        code = exc.error_code
        if code == "AUTHENTICATION_FAILED":
            return AuthError(f"UpCloud {code}", code=code)
        return PermanentError(f"UpCloud {code}: {exc.error_message}", code=code)
    if isinstance(exc, UpCloudClientError):
        return PermanentError(f"upcloud-api: {exc}")
    if isinstance(exc, requests.Timeout):
        return TransientError(f"UpCloud call timed out: {type(exc).__name__}")
    if isinstance(exc, requests.RequestException | ConnectionError | TimeoutError):
        # Connection refused or reset, or a reply cut short (ChunkedEncodingError).
        return TransientError(f"UpCloud connection failed: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError | KeyError):
        return TransientError(f"UpCloud reply unreadable: {type(exc).__name__}: {exc}")
    return PermanentError(f"UpCloud call failed: {type(exc).__name__}: {exc}")


def normalize_plan(plan: str) -> str:
    """UpCloud's plan names have no spaces ("1xCPU-2GB"); workflows often write
    "1xCPU-2 GB" as the web console shows it."""
    return plan.replace(" ", "")


def key_label_value(key: str) -> str:
    """The label value that carries ``key``: the key itself, or a hash when it does not fit.

    The full key is kept in the ``ServerRef`` (and so in the store); the hash is stable,
    so ``find_server(key)`` computes the same value.
    """
    if _LABEL_VALUE_OK.match(key):
        return key
    return "sha256-" + hashlib.sha256(key.encode()).hexdigest()[:48]


def _addresses(server: dict[str, Any]) -> tuple[str | None, str | None]:
    """(public, private) IPv4, preferring IPv4; private is an SDN address, else the utility one."""
    found: dict[str, list[tuple[str, str]]] = {}
    interfaces = server.get("networking", {}).get("interfaces", {}).get("interface", [])
    for iface in interfaces:
        for ip in iface.get("ip_addresses", {}).get("ip_address", []):
            found.setdefault(iface.get("type", ""), []).append((ip.get("family"), ip["address"]))
    if not found:  # older replies carry only the flat list
        for ip in server.get("ip_addresses", {}).get("ip_address", []):
            found.setdefault(ip.get("access", ""), []).append((ip.get("family"), ip["address"]))

    def pick(*kinds: str) -> str | None:
        for kind in kinds:
            ips = sorted(found.get(kind, []), key=lambda fa: fa[0] != "IPv4")
            if ips:
                return ips[0][1]
        return None

    return pick("public"), pick("private", "utility")


def _label_pairs(server: dict[str, Any]) -> set[tuple[str, str]]:
    labels = server.get("labels") or {}
    items = labels.get("label", []) if isinstance(labels, dict) else labels
    return {(str(i.get("key")), str(i.get("value"))) for i in items if isinstance(i, dict)}


class UpCloudProvider(Provider):
    name = "upcloud"

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        api_root: str | None = None,
        *,
        poll_interval: float = 2.0,
        ready_timeout: float = 900.0,
        delete_timeout: float = 600.0,
        request_timeout: float = 30.0,
        storage_size: int = 25,
        max_workers: int = 16,
    ) -> None:
        if not (token or (username and password)):
            raise AuthError("UpCloud credentials missing: set a username and password, or a token")
        manager = CloudManager(username=username, password=password, token=token)
        self.api_root = (api_root or DEFAULT_API_ROOT).rstrip("/")
        # The client's own API object holds the Authorization header it built; reuse it.
        self._api = _StatusKeepingAPI(manager.api.token, request_timeout, self.api_root)
        manager.api = self._api
        self._manager = manager
        self.poll_interval = poll_interval
        self.ready_timeout = ready_timeout
        self.delete_timeout = delete_timeout
        self.storage_size = storage_size
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="upcloud")
        self._board = StateBoard(self._list_states, self._poll_delays)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **kwargs: Any) -> UpCloudProvider:
        env = dict(os.environ) if env is None else env
        return cls(
            username=env.get("UPCLOUD_USERNAME") or None,
            password=env.get("UPCLOUD_PASSWORD") or None,
            token=env.get("UPCLOUD_TOKEN") or None,
            api_root=env.get("UPCLOUD_API_ROOT") or None,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"UpCloudProvider(api_root={self.api_root!r})"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except Exception as exc:
            raise map_upcloud_error(exc) from None

    async def _get(self, uuid: str) -> dict[str, Any]:
        res = await self._call(self._api.get_request, f"/server/{uuid}")
        server: dict[str, Any] = res["server"]
        return server

    def _ref(self, server: dict[str, Any], key: str) -> ServerRef:
        public, private = _addresses(server)
        return ServerRef(
            provider=self.name,
            id=str(server["uuid"]),
            name=str(server.get("hostname") or server.get("title") or ""),
            key=key,
            state=str(server.get("state", "")),
            zone=str(server.get("zone", "")),
            public_ip=public,
            private_ip=private,
            extra={"plan": str(server.get("plan", "")), "title": str(server.get("title", ""))},
        )

    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        labels = [Label(KEY_LABEL, key_label_value(key))]
        labels += [Label(k, v) for k, v in sorted(spec.labels.items()) if k != KEY_LABEL]
        image = IMAGE_ALIASES.get(spec.image or "", spec.image or DEFAULT_IMAGE)
        fields: dict[str, Any] = {
            "hostname": spec.name,
            "title": spec.name,
            "zone": spec.zone,
            "plan": normalize_plan(spec.plan),
            "labels": labels,
            "storage_devices": [Storage(os=image, size=self.storage_size)],
            "metadata": True,
        }
        if spec.user_data:
            fields["user_data"] = spec.user_data
        # The client builds the POST body (storage clone action, password_delivery, ...).
        body = Server(**fields).prepare_post_body()
        res = await self._call(self._api.post_request, "/server", body)
        return self._ref(res["server"], key)

    async def find_server(self, key: str) -> ServerRef | None:
        pair = (KEY_LABEL, key_label_value(key))
        res = await self._call(self._api.get_request, "/server", {"label": "=".join(pair)})
        servers = [s for s in res.get("servers", {}).get("server", []) if pair in _label_pairs(s)]
        if not servers:
            return None
        servers.sort(key=lambda s: (s.get("created", 0), s.get("uuid", "")))
        if len(servers) > 1:
            log.warning("%d UpCloud servers carry key %s; using the oldest", len(servers), key)
        return self._ref(servers[0], key)

    def _poll_delays(self) -> Iterator[float]:
        """Start fast (a sandbox server is up in well under a second), then back off to
        ``poll_interval`` so a real 23-61 s boot is not polled needlessly often."""
        delay = min(0.1, self.poll_interval)
        while True:
            yield delay
            delay = min(delay * 2, self.poll_interval)

    async def wait_ready(self, ref: ServerRef, timeout: float | None = None) -> ServerRef:
        """Wait for ``started`` through the state board: one list call per poll for all
        the servers this provider waits on, then one GET for the started server's
        addresses."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        state, unlisted = ref.state, 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransientError(f"server {ref.id} not started in time (state {state!r})")
                try:
                    seen = await self._board.next_state(ref.id, remaining)
                except TimeoutError:
                    continue  # the deadline check above words the error
                if seen is None:
                    unlisted += 1
                    if unlisted >= UNLISTED_POLLS:
                        # Gone: let the retry loop find or create again.
                        raise TransientError(f"server {ref.id} not found while waiting")
                    continue
                state, unlisted = seen, 0
                if state == "started":
                    return self._ref(await self._details(ref.id, deadline), ref.key)
                if state == "stopped":
                    await self._start(ref.id)
        finally:
            self._board.done_with(ref.id)

    async def _details(self, uuid: str, deadline: float) -> dict[str, Any]:
        """The full server (addresses), riding out transient errors like the polls do."""
        for delay in self._poll_delays():
            try:
                return await self._get(uuid)
            except PermanentError as exc:
                if exc.status == 404:
                    raise TransientError(f"server {uuid} not found while waiting") from None
                raise
            except (TransientError, ThrottledError) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                await asyncio.sleep(min(max(delay, exc.retry_after or 0.0), remaining))
        raise AssertionError("unreachable: the poll delays never end")

    async def _list_states(self) -> dict[str, str]:
        """uuid -> state of every server that carries a key label (ours)."""
        res = await self._call(self._api.get_request, "/server", {"label": KEY_LABEL})
        return {
            str(s["uuid"]): str(s.get("state", ""))
            for s in res.get("servers", {}).get("server", [])
        }

    async def _start(self, uuid: str) -> None:
        try:
            await self._call(self._api.post_request, f"/server/{uuid}/start")
        except PermanentError as exc:
            if exc.status != 409:  # 409: it changed state meanwhile; the next poll sees it
                raise

    async def delete_server(self, ref: ServerRef) -> None:
        uuid = ref.id
        if not uuid:
            found = await self.find_server(ref.key)
            if found is None:
                return
            uuid = found.id
        deadline = time.monotonic() + self.delete_timeout
        for delay in self._poll_delays():
            try:
                server: dict[str, Any] | None = await self._get(uuid)
            except PermanentError as exc:
                if exc.status == 404:
                    return
                raise
            except (TransientError, ThrottledError) as exc:
                server, delay = None, max(delay, exc.retry_after or 0.0)
            if server is not None and await self._stop_or_delete(uuid, server.get("state", "")):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransientError(f"server {uuid} not deletable in time")
            await asyncio.sleep(min(delay, remaining))

    async def _stop_or_delete(self, uuid: str, state: str) -> bool:
        """One step towards deletion; True once the server is gone."""
        try:
            if state == "started":
                body = {"stop_server": {"stop_type": "hard", "timeout": "60"}}
                await self._call(self._api.post_request, f"/server/{uuid}/stop", body)
            elif state == "stopped":
                await self._call(self._manager.delete_server, uuid, True)  # storages too
                return True
        except PermanentError as exc:
            if exc.status == 404:
                return True
            if exc.status != 409:  # 409: the state moved under us; look again
                raise
        return False

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._api.close()
