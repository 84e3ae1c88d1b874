"""The ``local`` provider: a server is a sandbox directory on this machine.

``<root>/<server name>/`` holds a small state file carrying the server's idempotency
key. ``<root>/.creations.log`` gets one line ``<key> <name>`` per real creation: it
is the key index ``find_server`` reads, and how tests and operators see a server made
twice. Taskservs on local servers run through the subprocess transport with ``ROOT``
set to the server's directory (``ServerRef.extra["root"]``).

Directory entries are the expensive part on a busy disk (a symlink per key cost a
millisecond under load), so a creation is one ``mkdir``, one small file and one
appended line, in plain system calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

from runtime.errors import PermanentError
from runtime.providers.base import Provider, ServerRef
from schemas.models import ServerConfigSpec

STATE_FILE = ".provisioning-server.json"
CREATIONS_LOG = ".creations.log"


class LocalProvider(Provider):
    name = "local"

    def __init__(self, root: Path, *, ready_delay: float = 0.0) -> None:
        self.root = root
        self.ready_delay = ready_delay
        root.mkdir(parents=True, exist_ok=True)
        self._root = str(root)
        self._log_path = root / CREATIONS_LOG
        self._log_fd: int | None = None
        self._index: dict[str, str] = {}
        self._index_read = 0  # bytes of the log already in the index

    def _ref(self, name: str, key: str, state: str = "started") -> ServerRef:
        return ServerRef(
            provider=self.name,
            id=name,
            name=name,
            key=key,
            state=state,
            zone="local",
            public_ip="127.0.0.1",
            extra={"root": f"{self._root}/{name}"},
        )

    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        # Synchronous on purpose: a few system calls cost less than a hop to a thread
        # (tried: no faster, and it splits group commits). The ``mkdir`` is the existence
        # check: no lookup in the log before it, so a new server costs five calls.
        server_dir = f"{self._root}/{spec.name}"
        try:
            os.mkdir(server_dir)
        except FileExistsError:
            owner = self._owner(server_dir)
            if owner is not None and owner != key:
                raise PermanentError(
                    f"local server {spec.name!r} already exists at {server_dir} with another "
                    f"key ({owner}); remove it or rename the server"
                ) from None
            if owner == key and self._logged(key):
                return self._ref(spec.name, key)  # made before, by an earlier attempt
            # A directory without a state file or a log line is one a crash left half
            # made: finish it.
        state = {
            "name": spec.name,
            "key": key,
            "plan": spec.plan,
            "zone": spec.zone,
            "labels": spec.labels,
            "created_at": time.time(),
        }
        # Not fsynced: the store is the durable record. The log line comes last, so a
        # crash before it leaves a directory that the retried create takes over.
        fd = os.open(f"{server_dir}/{STATE_FILE}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, json.dumps(state).encode())
        finally:
            os.close(fd)
        if self._log_fd is None:
            self._log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._log_fd, f"{key} {spec.name}\n".encode())  # one append, one line
        self._index[key] = spec.name
        return self._ref(spec.name, key)

    @staticmethod
    def _owner(server_dir: str) -> str | None:
        try:
            with open(f"{server_dir}/{STATE_FILE}", "rb") as fh:
                key = json.loads(fh.read()).get("key")
        except (FileNotFoundError, ValueError):
            return None  # no state file yet, or one a crash cut short
        return str(key) if key else None

    def _logged(self, key: str) -> bool:
        if key not in self._index:
            self._refresh_index()
        return key in self._index

    def _refresh_index(self) -> None:
        """Read lines other processes (an earlier actor, another run) appended."""
        try:
            with open(self._log_path, "rb") as fh:
                fh.seek(self._index_read)
                data = fh.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.decode().splitlines():
            key, _, name = line.partition(" ")
            self._index[key] = name
        self._index_read += len(complete)

    async def find_server(self, key: str) -> ServerRef | None:
        name = self._index.get(key)
        if name is None:
            self._refresh_index()
            name = self._index.get(key)
        if name is None or not (self.root / name / STATE_FILE).exists():
            return None
        return self._ref(name, key)

    async def wait_ready(self, ref: ServerRef, timeout: float | None = None) -> ServerRef:
        if self.ready_delay:
            await asyncio.sleep(self.ready_delay)
        return ref

    async def delete_server(self, ref: ServerRef) -> None:
        server_dir = self.root / ref.name
        if server_dir.exists():
            shutil.rmtree(server_dir)

    async def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def keys(self) -> list[str]:
        """Every key with a live server; the tests count resources through this."""
        self._refresh_index()
        return sorted(k for k, n in self._index.items() if (self.root / n / STATE_FILE).exists())
