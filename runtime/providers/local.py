"""The ``local`` provider: a server is a sandbox directory on this machine.

``<root>/<server name>/`` holds a small state file; ``<root>/.keys/<key>`` names the
directory that carries an idempotency key, so ``find_server`` is one file read.
Taskservs on local servers run through the subprocess transport with ``ROOT`` set to
the server's directory (``ServerRef.extra["root"]``).
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
        (root / ".keys").mkdir(parents=True, exist_ok=True)

    def _ref(self, name: str, key: str, state: str = "started") -> ServerRef:
        root = self.root / name
        return ServerRef(
            provider=self.name,
            id=name,
            name=name,
            key=key,
            state=state,
            zone="local",
            public_ip="127.0.0.1",
            extra={"root": str(root)},
        )

    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        found = await self.find_server(key)
        if found is not None:
            return found
        server_dir = self.root / spec.name
        state_path = server_dir / STATE_FILE
        if state_path.exists():
            owner = json.loads(state_path.read_text()).get("key")
            raise PermanentError(
                f"local server {spec.name!r} already exists at {server_dir} with another key "
                f"({owner}); remove it or rename the server"
            )
        server_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "name": spec.name,
            "key": key,
            "plan": spec.plan,
            "zone": spec.zone,
            "labels": spec.labels,
            "created_at": time.time(),
        }
        _atomic_write(state_path, json.dumps(state))
        _atomic_write(self.root / ".keys" / key, spec.name)
        # One line per real creation: how tests and operators see a server made twice.
        with open(self.root / CREATIONS_LOG, "a") as log:
            log.write(f"{key} {spec.name}\n")
        return self._ref(spec.name, key)

    async def find_server(self, key: str) -> ServerRef | None:
        try:
            name = (self.root / ".keys" / key).read_text()
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
        server_dir = self.root / ref.name
        (self.root / ".keys" / ref.key).unlink(missing_ok=True)
        if server_dir.exists():
            shutil.rmtree(server_dir)

    def keys(self) -> list[str]:
        """Every key with a live server; the tests count resources through this."""
        return sorted(
            p.name
            for p in (self.root / ".keys").iterdir()
            if (self.root / p.read_text() / STATE_FILE).exists()
        )


def _atomic_write(path: Path, text: str) -> None:
    # Atomic but not fsynced: the store is the durable record, and after a machine
    # crash a lost key file only makes create refuse the directory, never duplicate it.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
