"""Durable state of workflows: the ``Store`` interface and its two backends."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from runtime.store.base import Doc, Event, Record, Store

__all__ = ["Backend", "Doc", "Event", "Record", "Store", "open_store"]

Backend = Literal["surrealdb", "filesystem"]


def open_store(backend: Backend, data_dir: Path, surrealdb_url: str | None = None) -> Store:
    """Open the store of one orchestrator: ``<data_dir>/db`` or ``<data_dir>/journal``.

    With ``surrealdb_url`` the surrealdb backend talks to that server instead of the
    embedded database, and ``data_dir`` is not used for it.
    """
    # Imported here so that the filesystem backend never loads the SurrealDB engine.
    if backend == "surrealdb":
        from runtime.store.surreal import SurrealStore

        if surrealdb_url:
            return SurrealStore(url=surrealdb_url)
        return SurrealStore(Path(data_dir) / "db")
    if backend == "filesystem":
        from runtime.store.journal import JournalStore

        return JournalStore(Path(data_dir) / "journal")
    raise ValueError(f"unknown store backend {backend!r}: use 'surrealdb' or 'filesystem'")
