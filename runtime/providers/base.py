"""The provider interface: four calls, errors mapped at the adapter's boundary.

Adapters raise only ``ThrottledError``, ``TransientError`` or ``PermanentError``
(see ``runtime.errors``); the cloud library's own exceptions never pass through.
Blocking cloud clients run in a thread so the operation actor's loop stays free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from schemas.models import ServerConfigSpec


@dataclass(frozen=True)
class ServerRef:
    """What the store keeps about a server: enough to find, reach and delete it."""

    provider: str
    id: str
    name: str
    key: str
    state: str = ""
    zone: str = ""
    public_ip: str | None = None
    private_ip: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy is a tenth of an item's cost here.
        return {**self.__dict__, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerRef:
        return cls(**data)


class Provider(ABC):
    """A cloud (or the local machine) that can create, find, await and delete servers."""

    name: str

    @abstractmethod
    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        """Create a server labelled/tagged with ``key``. Does not wait for it to be ready."""

    @abstractmethod
    async def find_server(self, key: str) -> ServerRef | None:
        """The server carrying ``key``, if one exists (any state but deleted)."""

    @abstractmethod
    async def wait_ready(self, ref: ServerRef, timeout: float | None = None) -> ServerRef:
        """Block until the server is up; return its refreshed reference (with addresses)."""

    @abstractmethod
    async def delete_server(self, ref: ServerRef) -> None:
        """Delete the server. Deleting one that is already gone is not an error."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release clients and threads."""

    # ---- optional: batch creation (see runtime.coalesce) -----------------------------

    #: How many identical servers ``create_batch`` can launch in one API call; 1 means
    #: the provider has no batch creation and every item makes its own call.
    max_batch: int = 1

    async def create_batch(
        self, specs: list[ServerConfigSpec], keys: list[str], batch: str
    ) -> list[ServerRef]:
        """Create ``len(specs)`` servers identical in all but name with ONE call, member
        ``i`` (``specs[i]``, ``keys[i]``) findable later by ``find_batch_member(batch, i)``.
        All or nothing: either every member exists afterwards or none does."""
        raise NotImplementedError(f"{self.name} has no batch creation")

    async def find_batch_member(
        self, batch: str, index: int, key: str, spec: ServerConfigSpec | None = None
    ) -> ServerRef | None:
        """Member ``index`` of the batch launched as ``batch``, if it exists (any state
        but deleted), as a reference carrying ``key`` (and ``spec``'s name, when given;
        ``spec``'s zone, when given, narrows the search)."""
        raise NotImplementedError(f"{self.name} has no batch creation")
