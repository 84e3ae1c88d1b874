"""The ``local`` provider: a server is a sandbox directory on this machine.

``<root>/<server name>/`` holds a small state file; ``<root>/.keys/<key>`` is a
symbolic link to the directory that carries an idempotency key, so ``find_server``
is one ``readlink``. Taskservs on local servers run through the subprocess transport
with ``ROOT`` set to the server's directory (``ServerRef.extra["root"]``).
"""

from __future__ import annotations

import asyncio
import json
import os
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
        self._keys = root / ".keys"
        self._keys.mkdir(parents=True, exist_ok=True)
        self._log: TextIO | None = None

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
        found = self._find(key)
        if found is not None:
            return found
        server_dir = self.root / spec.name
        try:
            server_dir.mkdir()
        except FileExistsError:
            state_path = server_dir / STATE_FILE
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
        # Not fsynced: the store is the durable record. The key link is made last, so a
        # crash before it leaves a directory that the retried create takes over.
        (server_dir / STATE_FILE).write_text(json.dumps(state))
        link = self._keys / key
        if link.is_symlink():
            link.unlink()
        os.symlink(spec.name, link)
        # One line per real creation: how tests and operators see a server made twice.
        self._creations().write(f"{key} {spec.name}\n")
        self._creations().flush()
        return self._ref(spec.name, key)

    def _creations(self) -> TextIO:
        if self._log is None:
            self._log = open(self.root / CREATIONS_LOG, "a")  # noqa: SIM115 - kept open
        return self._log

    async def find_server(self, key: str) -> ServerRef | None:
        return self._find(key)

    def _find(self, key: str) -> ServerRef | None:
        try:
            name = os.readlink(self._keys / key)
        except FileNotFoundError:
            return None
        if not (self.root / name / STATE_FILE).exists():
            return None
        return self._ref(name, key)

    async def wait_ready(self, ref: ServerRef, timeout: float | None = None) -> ServerRef:
        if self.ready_delay:
            await asyncio.sleep(self.ready_delay)
        return ref

    async def delete_server(self, ref: ServerRef) -> None:
        (self._keys / ref.key).unlink(missing_ok=True)
        server_dir = self.root / ref.name
        if server_dir.exists():
            shutil.rmtree(server_dir)

    async def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def keys(self) -> list[str]:
        """Every key with a live server; the tests count resources through this."""
        return sorted(
            p.name
            for p in self._keys.iterdir()
            if (self.root / os.readlink(p) / STATE_FILE).exists()
        )
