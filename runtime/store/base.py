"""The store interface: documents per workflow and a numbered event log.

A workflow's state is a set of documents keyed by ``(kind, key)``: the workflow
itself (``kind="workflow"``, ``key=""``), each operation (``"operation"``, op id) and
each item (``"item"``, ``"<op_id>/<item name>"``). A write replaces the whole
document. Events are append-only with a sequence number given by the checkpoint
actor; live progress streams resume from one.

One call to ``write`` is one group commit: all of it is durable when it returns, or
it raises ``StoreError`` and none of it may be assumed written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class Record:
    workflow_id: str
    kind: str
    key: str
    doc: Doc


@dataclass(frozen=True)
class Event:
    seq: int
    workflow_id: str
    type: str
    data: Doc


class Store(ABC):
    @abstractmethod
    def write(self, records: Sequence[Record], events: Sequence[Event] = ()) -> None:
        """Upsert ``records`` and append ``events`` durably, as one group commit."""

    @abstractmethod
    def load(self, workflow_id: str) -> dict[tuple[str, str], Doc]:
        """Every document of one workflow, by ``(kind, key)``; empty if unknown."""

    @abstractmethod
    def workflows(self) -> list[Doc]:
        """The ``workflow`` document of every workflow in this store."""

    @abstractmethod
    def events(self, workflow_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        """Events of one workflow with ``seq > after_seq``, oldest first."""

    @abstractmethod
    def last_seq(self) -> int:
        """The highest event sequence number stored (0 when empty)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the lock."""
