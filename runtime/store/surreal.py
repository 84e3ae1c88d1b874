"""The SurrealDB backend: embedded surrealkv by default, or a server over ``ws://``.

Layout: table ``doc`` with record id ``[workflow_id, kind, key]`` and table ``event``
with id ``[workflow_id, seq]``. Array ids keep user text out of the query string and
make "one workflow" and "events after seq" ordered range scans of the primary key.
``meta:seq`` holds the highest event seq, so ``last_seq`` is one point read.

Documents are stored as JSON text, not as SurrealDB objects: the SDK sends Python
``None`` as ``NONE``, which SurrealDB drops from objects, so ``{"error": None}`` would
come back as ``{}``. Text also keeps the round trip exact for every JSON value.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surrealdb import BlockingEmbeddedSurrealConnection, Surreal

from runtime.errors import StoreCorruptError, StoreError
from runtime.store.base import Doc, Event, Record, Store
from runtime.store.lock import DirLock

NAMESPACE = "provisioning"
DATABASE = "provisioning"

_SCHEMA = """
DEFINE TABLE IF NOT EXISTS doc SCHEMALESS;
DEFINE INDEX IF NOT EXISTS doc_kind ON doc FIELDS kind;
DEFINE TABLE IF NOT EXISTS event SCHEMALESS;
DEFINE TABLE IF NOT EXISTS meta SCHEMALESS;
"""

# One round trip per group commit. BEGIN/COMMIT makes the statements all-or-nothing;
# ON DUPLICATE KEY UPDATE turns INSERT into an upsert, so a retried write is harmless.
_WRITE = """
BEGIN TRANSACTION;
INSERT INTO doc $docs ON DUPLICATE KEY UPDATE doc = $input.doc RETURN NONE;
INSERT INTO event $events ON DUPLICATE KEY UPDATE type = $input.type, data = $input.data
    RETURN NONE;
UPSERT meta:seq SET value = math::max([value ?? 0, $max_seq]) RETURN NONE;
COMMIT TRANSACTION;
"""

# NONE sorts below and ``..`` above every value, which bounds "all ids of this workflow".
_LOAD = "SELECT kind, key, doc FROM doc:[$wf, NONE]..=[$wf, ..]"
_EVENTS = "SELECT seq, type, data FROM event:[$wf, $after]>..=[$wf, ..] LIMIT $limit"
_WORKFLOWS = "SELECT VALUE doc FROM doc WHERE kind = 'workflow'"
_LAST_SEQ = "SELECT VALUE value FROM ONLY meta:seq"


# One encoder for all: json.dumps with options builds a new encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _to_json(value: Any) -> str:
    return _ENCODER.encode(value)


class SurrealStore(Store):
    """A ``Store`` on SurrealDB; give ``path`` for embedded surrealkv or ``url`` for a server.

    Embedded, the directory is locked against a second orchestrator (surrealkv itself
    lets a second process open it without any error). A server is shared by design,
    so no lock is taken for ``url``.
    """

    def __init__(
        self,
        path: Path | None = None,
        url: str | None = None,
        *,
        namespace: str = NAMESPACE,
        database: str = DATABASE,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        if (path is None) == (url is None):
            raise ValueError("SurrealStore needs exactly one of path or url")
        self._lock: DirLock | None = None
        self._closed = False
        if path is not None:
            path = Path(path).resolve()
            self._lock = DirLock(path)
            # surrealkv reads this when a datastore opens; without it commits are not
            # fsynced and a power loss drops acknowledged writes.
            os.environ["SURREAL_SYNC_DATA"] = "true"
            target = f"surrealkv://{path}"
        else:
            assert url is not None
            target = url
        self.target = target
        try:
            self._db = Surreal(target)
            if isinstance(self._db, BlockingEmbeddedSurrealConnection):
                self._db.connect()  # the engine opens the files here; ws connects lazily
            if credentials is not None:
                self._db.signin({"username": credentials[0], "password": credentials[1]})
            self._db.use(namespace, database)
        except Exception as exc:
            self._abandon()
            raise StoreError(f"cannot open surrealdb {target}: {exc}") from exc
        try:
            self._query(_SCHEMA)
        except BaseException:
            self._abandon()
            raise

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run ``sql`` and return each statement's result; any failure is a StoreError."""
        if self._closed:
            raise StoreError(f"store {self.target} is closed")
        try:
            response = self._db.query_raw(sql, params or {})
        except Exception as exc:
            # The embedded engine raises RuntimeError, the ws client its own errors.
            raise StoreError(f"surrealdb {self.target}: {exc}") from exc
        if response.get("error") is not None:
            raise StoreError(f"surrealdb {self.target}: {response['error']}")
        statements = response.get("result")
        if not isinstance(statements, list):
            raise StoreError(f"surrealdb {self.target}: unexpected response {response!r}")
        # query() checks only the first statement. In a failed transaction every other
        # statement reports "not executed due to a failed transaction": find the cause.
        failed = [str(s["result"]) for s in statements if s.get("status") == "ERR"]
        if failed:
            cause = next((m for m in failed if "failed transaction" not in m), failed[0])
            raise StoreError(f"surrealdb {self.target}: {cause}")
        return [s.get("result") for s in statements]

    def write(self, records: Sequence[Record], events: Sequence[Event] = ()) -> None:
        if not records and not events:
            return
        docs = [
            {
                "id": [r.workflow_id, r.kind, r.key],
                "kind": r.kind,
                "key": r.key,
                "doc": _to_json(r.doc),
            }
            for r in records
        ]
        rows = [
            {"id": [e.workflow_id, e.seq], "seq": e.seq, "type": e.type, "data": _to_json(e.data)}
            for e in events
        ]
        max_seq = max((e.seq for e in events), default=0)
        self._query(_WRITE, {"docs": docs, "events": rows, "max_seq": max_seq})

    def load(self, workflow_id: str) -> dict[tuple[str, str], Doc]:
        rows = self._query(_LOAD, {"wf": workflow_id})[0]
        return {(row["kind"], row["key"]): _from_json(row["doc"]) for row in rows}

    def workflows(self) -> list[Doc]:
        return [_from_json(text) for text in self._query(_WORKFLOWS)[0]]

    def events(self, workflow_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        if limit <= 0:
            return []
        params = {"wf": workflow_id, "after": after_seq, "limit": limit}
        rows = self._query(_EVENTS, params)[0]
        return [
            Event(row["seq"], workflow_id, row["type"], _from_json(row["data"])) for row in rows
        ]

    def last_seq(self) -> int:
        value = self._query(_LAST_SEQ)[0]
        return int(value) if value is not None else 0

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._db.close()
        except Exception as exc:
            raise StoreError(f"surrealdb {self.target}: close failed: {exc}") from exc
        finally:
            self._release()

    def _abandon(self) -> None:
        # Already failing to open: the first error is the one worth reporting.
        db = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()
        self._release()

    def _release(self) -> None:
        self._closed = True
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _from_json(text: Any) -> Doc:
    if not isinstance(text, str):
        raise StoreCorruptError(f"expected a JSON document, found {type(text).__name__}")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise StoreCorruptError(f"unreadable JSON document in surrealdb: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreCorruptError(f"expected a JSON object, found {type(value).__name__}")
    return value
