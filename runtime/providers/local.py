"""The ``local`` provider: a server is a sandbox directory on this machine.

``<root>/<server name>/`` holds a small state file carrying the server's idempotency
key. ``<root>/.creations.log`` gets one line ``<key> <name>`` per real creation: it
is the key index ``find_server`` reads, and how tests and operators see a server made
twice. Taskservs on local servers run through the subprocess transport with ``ROOT``
set to the server's directory (``ServerRef.extra["root"]``).

Directory entries are the expensive part on a busy disk (a symlink per key cost a
millisecond under load), so a creation is one ``mkdir``, one small file and one
appended line.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import TextIO

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
        self._log_path = root / CREATIONS_LOG
        self._log: TextIO | None = None
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
            extra={"root": str(self.root / name)},
        )

    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        # Synchronous on purpose: a few hundred microseconds of directory work costs
        # less than a hop to a thread (tried: no faster, and it splits group commits).
        found = await self.find_server(key)
        if found is not None:
            return found
        server_dir = self.root / spec.name
        state_path = server_dir / STATE_FILE
        try:
            server_dir.mkdir()
        except FileExistsError:
            # A directory without a state file is one a crash left half made: take it.
            owner = json.loads(state_path.read_text()).get("key") if state_path.exists() else key
            if owner != key:
                raise PermanentError(
                    f"local server {spec.name!r} already exists at {server_dir} with another "
                    f"key ({owner}); remove it or rename the server"
                ) from None
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
        state_path.write_text(json.dumps(state))
        log = self._creations()
        log.write(f"{key} {spec.name}\n")
        log.flush()
        self._index[key] = spec.name
        return self._ref(spec.name, key)

    def _creations(self) -> TextIO:
        if self._log is None:
            self._log = open(self._log_path, "a")  # noqa: SIM115 - kept open on purpose
        return self._log

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
        if self._log is not None:
            self._log.close()
            self._log = None

    def keys(self) -> list[str]:
        """Every key with a live server; the tests count resources through this."""
        self._refresh_index()
        return sorted(k for k, n in self._index.items() if (self.root / n / STATE_FILE).exists())
