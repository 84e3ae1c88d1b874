"""Servers of the UpCloud emulator: catalog, records, rendering and the JSON state file.

Only what the ``upcloud-api`` client and our adapter read is modelled. States are
never stored: each record keeps timestamps and ``state_at(now)`` derives
``maintenance`` / ``started`` / ``stopped`` from them, so no background task is
needed and a restarted emulator resumes where the old one stopped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# plan name -> (cores, memory MiB, storage GiB); a subset of UpCloud's general purpose plans.
PLANS: dict[str, tuple[int, int, int]] = {
    "1xCPU-1GB": (1, 1024, 25),
    "1xCPU-2GB": (1, 2048, 50),
    "2xCPU-4GB": (2, 4096, 80),
    "4xCPU-8GB": (4, 8192, 160),
    "6xCPU-16GB": (6, 16384, 320),
    "8xCPU-32GB": (8, 32768, 640),
    "DEV-1xCPU-1GB": (1, 1024, 20),
    "DEV-1xCPU-2GB": (1, 2048, 30),
}

ZONES: dict[str, str] = {
    "fi-hel1": "Helsinki #1",
    "fi-hel2": "Helsinki #2",
    "de-fra1": "Frankfurt #1",
    "nl-ams1": "Amsterdam #1",
    "uk-lon1": "London #1",
    "es-mad1": "Madrid #1",
    "pl-waw1": "Warsaw #1",
    "se-sto1": "Stockholm #1",
    "us-nyc1": "New York #1",
    "us-chi1": "Chicago #1",
    "us-sjo1": "San Jose #1",
    "sg-sin1": "Singapore #1",
    "au-syd1": "Sydney #1",
}

# Public templates by UUID; the API also accepts a template's title in place of its UUID.
TEMPLATES: dict[str, str] = {
    "01000000-0000-4000-8000-000030240200": "Ubuntu Server 24.04 LTS (Noble Numbat)",
    "01000000-0000-4000-8000-000030220200": "Ubuntu Server 22.04 LTS (Jammy Jellyfish)",
    "01000000-0000-4000-8000-000020070100": "Debian GNU/Linux 12 (Bookworm)",
    "01000000-0000-4000-8000-000150020100": "Rocky Linux 9",
    "01000000-0000-4000-8000-000140020100": "AlmaLinux 9",
}

# Documentation and benchmarking ranges (RFC 5737, RFC 2544): never routable, and
# together large enough for benchmarks with many thousands of servers.
_PUBLIC_POOLS = [
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("198.18.0.0/15"),
]
_POOL_SIZE = sum(net.num_addresses - 2 for net in _PUBLIC_POOLS)
_UTILITY_POOL = ipaddress.ip_network("10.0.0.0/8")


def _public_address(n: int) -> str:
    """The n-th usable address across the public pools (network and broadcast skipped)."""
    for net in _PUBLIC_POOLS:
        size = net.num_addresses - 2
        if n < size:
            return str(net.network_address + 1 + n)
        n -= size
    raise IndexError(n)


LABEL_KEY = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]{1,31}$")
LABEL_VALUE_MAX = 255
HOSTNAME = re.compile(r"^(?=.{1,128}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$")


def resolve_template(ref: str) -> str | None:
    """The template UUID for a UUID or a template title; None if unknown."""
    if ref in TEMPLATES:
        return ref
    for template_uuid, title in TEMPLATES.items():
        if title == ref:
            return template_uuid
    return None


@dataclass
class ServerRecord:
    uuid: str
    hostname: str
    title: str
    zone: str
    plan: str
    core_number: int
    memory_amount: int
    labels: list[tuple[str, str]]
    public_ip: str
    utility_ip: str
    storage_uuid: str
    storage_size: int
    storage_title: str
    template: str
    created: float
    ready_at: float
    stop_at: float | None = None
    user_data: str | None = None
    metadata: bool = True

    def state_at(self, now: float) -> str:
        if self.stop_at is not None:
            return "stopped" if now >= self.stop_at else "maintenance"
        return "started" if now >= self.ready_at else "maintenance"

    def matches(self, filters: list[tuple[str, str | None]]) -> bool:
        """All filters hold; keys compare case-insensitively, values exactly."""
        for key, value in filters:
            hit = any(
                k.lower() == key.lower() and (value is None or v == value) for k, v in self.labels
            )
            if not hit:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = [list(pair) for pair in self.labels]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerRecord:
        data = dict(data)
        data["labels"] = [(str(k), str(v)) for k, v in data.get("labels", [])]
        return cls(**data)


def _labels(record: ServerRecord) -> dict[str, Any]:
    return {"label": [{"key": k, "value": v} for k, v in record.labels]}


def render_summary(record: ServerRecord, now: float) -> dict[str, Any]:
    """The short form ``GET /server`` lists."""
    return {
        "uuid": record.uuid,
        "hostname": record.hostname,
        "title": record.title,
        "zone": record.zone,
        "plan": record.plan,
        "core_number": str(record.core_number),
        "memory_amount": str(record.memory_amount),
        "state": record.state_at(now),
        "created": int(record.created),
        "license": 0,
        "plan_ipv4_bytes": "0",
        "plan_ipv6_bytes": "0",
        "labels": _labels(record),
        "tags": {"tag": []},
    }


def render_server(record: ServerRecord, now: float) -> dict[str, Any]:
    """The full form; ``ip_addresses``, ``storage_devices`` and ``networking`` are always
    present because the client pops the first two unconditionally."""
    server = render_summary(record, now)
    server.update(
        {
            "boot_order": "disk",
            "firewall": "off",
            "host": 7000000000 + int(record.uuid[:6], 16),
            "metadata": "yes" if record.metadata else "no",
            "nic_model": "virtio",
            "simple_backup": "no",
            "timezone": "UTC",
            "video_model": "vga",
            "vnc": "off",
            "server_group": "",
            "ip_addresses": {
                "ip_address": [
                    {"access": "public", "address": record.public_ip, "family": "IPv4"},
                    {"access": "utility", "address": record.utility_ip, "family": "IPv4"},
                ]
            },
            "storage_devices": {
                "storage_device": [
                    {
                        "address": "virtio:0",
                        "boot_disk": "0",
                        "part_of_plan": "yes",
                        "storage": record.storage_uuid,
                        "storage_size": record.storage_size,
                        "storage_tier": "maxiops",
                        "storage_title": record.storage_title,
                        "type": "disk",
                    }
                ]
            },
            "networking": {
                "interfaces": {
                    "interface": [
                        _interface(1, "public", record.public_ip, record.uuid),
                        _interface(2, "utility", record.utility_ip, record.uuid),
                    ]
                }
            },
        }
    )
    return server


def _interface(index: int, kind: str, address: str, server_uuid: str) -> dict[str, Any]:
    mac_tail = ":".join(server_uuid.replace("-", "")[i : i + 2] for i in range(0, 8, 2))
    return {
        "index": index,
        "type": kind,
        "ip_addresses": {"ip_address": [{"address": address, "family": "IPv4", "floating": "no"}]},
        "mac": f"de:{index:02x}:{mac_tail}"[:17],
        "network": f"03{server_uuid[2:]}" if kind == "public" else f"0c{server_uuid[2:]}",
        "source_ip_filtering": "yes",
        "bootable": "no",
    }


@dataclass
class ServerStore:
    """All servers plus the address counter, loaded from and saved to one JSON file."""

    path: Path | None = None
    servers: dict[str, ServerRecord] = field(default_factory=dict)
    next_address: int = 0

    @classmethod
    def load(cls, path: Path | None) -> ServerStore:
        store = cls(path=path)
        if path is None or not path.exists():
            return store
        data = json.loads(path.read_text(encoding="utf-8"))
        store.next_address = int(data.get("next_address", 0))
        for raw in data.get("servers", []):
            record = ServerRecord.from_dict(raw)
            store.servers[record.uuid] = record
        return store

    def save(self) -> None:
        """Write atomically: a reader or a crash sees the old file or the new one, never half."""
        if self.path is None:
            return
        payload = {
            "version": 1,
            "next_address": self.next_address,
            "servers": [r.to_dict() for r in self.servers.values()],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, separators=(",", ":"))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def allocate_addresses(self) -> tuple[str, str]:
        """A public and a utility IPv4 address no live server holds."""
        in_use = {r.public_ip for r in self.servers.values()}
        for _ in range(_POOL_SIZE):
            n = self.next_address % _POOL_SIZE
            self.next_address += 1
            public = _public_address(n)
            if public not in in_use:
                utility = str(_UTILITY_POOL.network_address + 1 + n % 2**23)
                return public, utility
        raise RuntimeError("emulator address pools exhausted")

    def new_record(
        self,
        *,
        hostname: str,
        title: str,
        zone: str,
        plan: str,
        labels: list[tuple[str, str]],
        template: str,
        storage_size: int,
        storage_title: str,
        now: float,
        ready_delay: float,
        user_data: str | None,
        metadata: bool,
    ) -> ServerRecord:
        cores, memory, _ = PLANS[plan]
        public, utility = self.allocate_addresses()
        record = ServerRecord(
            uuid="00" + str(uuidlib.uuid4())[2:],
            hostname=hostname,
            title=title,
            zone=zone,
            plan=plan,
            core_number=cores,
            memory_amount=memory,
            labels=labels,
            public_ip=public,
            utility_ip=utility,
            storage_uuid="01" + str(uuidlib.uuid4())[2:],
            storage_size=storage_size,
            storage_title=storage_title,
            template=template,
            created=now,
            ready_at=now + ready_delay,
            user_data=user_data,
            metadata=metadata,
        )
        self.servers[record.uuid] = record
        return record
