"""The UpCloud emulator's behaviour, free of HTTP: validate, create, stop, start, delete.

``ApiError`` carries the status and UpCloud error code; the app turns it into
``{"error": {"error_code", "error_message"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from collections.abc import Callable
from typing import Any

from runtime.sandbox.upcloud_faults import FaultInjector
from runtime.sandbox.upcloud_state import (
    HOSTNAME,
    LABEL_KEY,
    LABEL_VALUE_MAX,
    PLANS,
    ZONES,
    ServerRecord,
    ServerStore,
    resolve_template,
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Emulator:
    """The emulator's state, shared by its routes; exposed as ``app.state.emulator``."""

    def __init__(
        self,
        store: ServerStore,
        injector: FaultInjector,
        *,
        credentials: tuple[str, str],
        token: str,
        persist_delay: float,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.injector = injector
        self.clock = clock
        self.persist_delay = persist_delay
        self._basic = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        self._bearer = f"Bearer {token}"
        self._flush: asyncio.TimerHandle | None = None

    def authorize(self, header: str | None) -> bool:
        if not header:
            return False
        return hmac.compare_digest(header.encode(), self._basic.encode()) or hmac.compare_digest(
            header.encode(), self._bearer.encode()
        )

    def persist(self) -> None:
        """Write through by default; with a delay, coalesce bursts of changes into one write."""
        if self.persist_delay <= 0:
            self.store.save()
        elif self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self.persist_delay, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.store.save()

    def get(self, uuid: str) -> ServerRecord:
        record = self.store.servers.get(uuid)
        if record is None:
            raise ApiError(404, "SERVER_NOT_FOUND", f"The server {uuid} does not exist.")
        return record

    def create(self, body: Any) -> ServerRecord:
        spec = body.get("server") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            raise ApiError(400, "SERVER_MISSING", "The request body must contain a server.")
        zone = _required(spec, "zone", "ZONE")
        if zone not in ZONES:
            raise ApiError(400, "ZONE_INVALID", f"The zone {zone} is not valid.")
        hostname = _required(spec, "hostname", "HOSTNAME")
        if not HOSTNAME.match(hostname):
            raise ApiError(400, "HOSTNAME_INVALID", "The hostname is not a valid hostname.")
        title = _required(spec, "title", "SERVER_TITLE")
        if len(title) > 255:
            raise ApiError(400, "SERVER_TITLE_INVALID", "The title is longer than 255 characters.")
        plan = spec.get("plan", "1xCPU-1GB")
        if plan not in PLANS:
            raise ApiError(400, "PLAN_INVALID", f"The plan {plan} is not valid.")
        template, size, storage_title = _storage(spec, plan, hostname)
        labels = _labels(spec.get("labels"))
        user_data = spec.get("user_data")
        if user_data is not None and (not isinstance(user_data, str) or len(user_data) > 16384):
            raise ApiError(400, "USER_DATA_INVALID", "user_data must be a string up to 16 KiB.")
        record = self.store.new_record(
            hostname=hostname,
            title=title,
            zone=zone,
            plan=plan,
            labels=labels,
            template=template,
            storage_size=size,
            storage_title=storage_title,
            now=self.clock(),
            ready_delay=self.injector.config.ready_delay,
            user_data=user_data,
            metadata=spec.get("metadata", "yes") != "no",
        )
        self.persist()
        return record

    def stop(self, uuid: str) -> ServerRecord:
        record = self.get(uuid)
        now = self.clock()
        if record.state_at(now) != "started":
            raise ApiError(409, "SERVER_STATE_ILLEGAL", "The server is not started.")
        record.stop_at = now + self.injector.config.stop_delay
        self.persist()
        return record

    def start(self, uuid: str) -> ServerRecord:
        record = self.get(uuid)
        now = self.clock()
        if record.state_at(now) != "stopped":
            raise ApiError(409, "SERVER_STATE_ILLEGAL", "The server is not stopped.")
        record.stop_at = None
        record.ready_at = now + self.injector.config.ready_delay
        self.persist()
        return record

    def delete(self, uuid: str) -> None:
        record = self.get(uuid)
        if record.state_at(self.clock()) != "stopped":
            raise ApiError(409, "SERVER_STATE_ILLEGAL", "The server must be stopped first.")
        del self.store.servers[uuid]
        self.persist()


def _required(spec: dict[str, Any], name: str, code: str) -> str:
    value = spec.get(name)
    if value is None or value == "":
        raise ApiError(400, f"{code}_MISSING", f"The {name} attribute is missing.")
    if not isinstance(value, str):
        raise ApiError(400, f"{code}_INVALID", f"The {name} attribute must be a string.")
    return value


def _storage(spec: dict[str, Any], plan: str, hostname: str) -> tuple[str, int, str]:
    """(template UUID, size GiB, title) of the OS disk; other disks are accepted and ignored."""
    devices = spec.get("storage_devices")
    if isinstance(devices, dict):
        devices = devices.get("storage_device")
    if not isinstance(devices, list) or not devices:
        raise ApiError(400, "STORAGE_DEVICES_MISSING", "At least one storage device is needed.")
    template = ""
    size = PLANS[plan][2]
    title = f"{hostname} OS disk"
    for device in devices:
        if not isinstance(device, dict):
            raise ApiError(400, "STORAGE_DEVICE_INVALID", "A storage device must be an object.")
        if device.get("action") != "clone" or template:
            continue
        ref = str(device.get("storage", ""))
        found = resolve_template(ref)
        if found is None:
            raise ApiError(404, "STORAGE_NOT_FOUND", f"The storage {ref} does not exist.")
        template = found
        try:
            size = int(device.get("size", size))
        except (TypeError, ValueError):
            raise ApiError(400, "SIZE_INVALID", "The size must be a number.") from None
        if not 1 <= size <= 4096:
            raise ApiError(400, "SIZE_INVALID", "The size must be between 1 and 4096 GiB.")
        title = str(device.get("title") or title)
    return template, size, title


def _labels(raw: Any) -> list[tuple[str, str]]:
    if raw is None:
        return []
    items = raw.get("label", []) if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ApiError(400, "LABEL_INVALID", "labels must be {'label': [{key, value}]}.")
    labels: list[tuple[str, str]] = []
    for item in items:
        key = item.get("key") if isinstance(item, dict) else None
        value = item.get("value", "") if isinstance(item, dict) else None
        if not isinstance(key, str) or not LABEL_KEY.match(key):
            msg = f"Label key {key!r} must be 2-32 characters of A-Z a-z 0-9 _ -."
            raise ApiError(400, "LABEL_INVALID", msg)
        if not isinstance(value, str) or len(value) > LABEL_VALUE_MAX:
            raise ApiError(400, "LABEL_INVALID", f"Label {key} value must be 0-255 characters.")
        if any(k.lower() == key.lower() for k, _ in labels):
            raise ApiError(400, "LABEL_INVALID", f"Label key {key} is given twice.")
        labels.append((key, value))
    return labels
