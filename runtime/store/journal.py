"""The filesystem backend: per workflow an append-only JSONL journal and a snapshot.

    <root>/LOCK                          owner pid and host (see lock.py)
    <root>/<workflow_id>/journal.jsonl   one line per record or event, then a commit line
    <root>/<workflow_id>/snapshot.json   the compacted state, replaced atomically

``write`` appends, for each workflow it touches, the group's lines and one
``{"op":"commit"}`` line, then fsyncs once. Replay applies only groups that end in a
commit, so a crash mid-append loses that workflow's whole group, never half of it.
Whatever follows the last commit is a torn tail from such a crash: it is ignored and
cut off at open. A bad line before the last commit cannot come from a crash (appends
are sequential and fsynced), so it raises ``StoreCorruptError`` with file and line.

A write that touches several workflows is atomic per workflow, not across them.

Replaying a journal over a snapshot that already contains it gives the same state
(documents are replaced whole, events are keyed by seq), which is what makes a crash
between installing a snapshot and truncating the journal harmless.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import StoreCorruptError, StoreError
from runtime.store.base import Doc, Event, Record, Store
from runtime.store.lock import LOCK_NAME, DirLock

JOURNAL = "journal.jsonl"
SNAPSHOT = "snapshot.json"
SNAPSHOT_VERSION = 1
_COMMIT = b'{"op":"commit"}\n'
_WORKFLOW_ID = re.compile(r"^[A-Za-z0-9_.-]+$")

log = logging.getLogger(__name__)

# A parsed journal line: ("put", kind, key, doc JSON), ("event", seq, type, data JSON)
# or ("commit",). Bodies stay JSON text in memory so a caller mutating what it wrote or
# read can never change the stored state.
_Op = tuple[Any, ...]


def check_workflow_id(workflow_id: str) -> str:
    """Return ``workflow_id`` if it is safe as a directory name, else raise ValueError."""
    if (
        not isinstance(workflow_id, str)
        or not _WORKFLOW_ID.fullmatch(workflow_id)
        or ".." in workflow_id
        or workflow_id in (".", LOCK_NAME)
    ):
        raise ValueError(f"invalid workflow id {workflow_id!r}: use [A-Za-z0-9_.-], no '..'")
    return workflow_id


# One encoder for all: json.dumps with options builds a new encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _to_json(value: Any) -> str:
    return _ENCODER.encode(value)


def _line(op: _Op) -> str:
    if op[0] == "put":
        _, kind, key, doc = op
        return f'{{"op":"put","kind":{_to_json(kind)},"key":{_to_json(key)},"doc":{doc}}}'
    _, seq, type_, data = op
    return f'{{"op":"event","seq":{seq},"type":{_to_json(type_)},"data":{data}}}'


def _parse(obj: Any) -> _Op:
    """Validate one decoded line; raise ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    op = obj.get("op")
    if op == "commit":
        return ("commit",)
    if op == "put":
        kind, key, doc = obj.get("kind"), obj.get("key"), obj.get("doc")
        if isinstance(kind, str) and isinstance(key, str) and isinstance(doc, dict):
            return ("put", kind, key, _to_json(doc))
    elif op == "event":
        seq, type_, data = obj.get("seq"), obj.get("type"), obj.get("data")
        if _is_int(seq) and isinstance(type_, str) and isinstance(data, dict):
            return ("event", seq, type_, _to_json(data))
    raise ValueError(f"not a journal entry: op={op!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _Workflow:
    """One workflow in memory: the result of snapshot + journal."""

    docs: dict[tuple[str, str], str] = field(default_factory=dict)
    events: dict[int, tuple[str, str]] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)  # sorted keys of ``events``
    workflow_keys: set[str] = field(default_factory=set)  # keys of kind "workflow"
    journal_lines: int = 0

    def apply(self, op: _Op) -> None:
        if op[0] == "put":
            self.docs[(op[1], op[2])] = op[3]
            if op[1] == "workflow":
                self.workflow_keys.add(op[2])
        elif op[0] == "event":
            if op[1] not in self.events:
                bisect.insort(self.seqs, op[1])
            self.events[op[1]] = (op[2], op[3])


class JournalStore(Store):
    """A ``Store`` in plain files under ``root``, all of it held in memory after open."""

    def __init__(self, root: Path, *, compact_after_lines: int = 10_000) -> None:
        if compact_after_lines < 1:
            raise ValueError("compact_after_lines must be at least 1")
        self.root = Path(root).resolve()
        self.compact_after_lines = compact_after_lines
        self._lock = DirLock(self.root)
        self._mutex = threading.RLock()
        self._workflows: dict[str, _Workflow] = {}
        self._last_seq = 0
        self._closed = False
        # Set when a failed append could not be rolled back: appending after a partial
        # group would glue it to the next commit, so refuse until a reopen cuts it off.
        self._broken: str | None = None
        try:
            self._open_all()
        except OSError as exc:
            self._lock.close()
            raise StoreError(f"cannot read journal store {self.root}: {exc}") from exc
        except BaseException:
            self._lock.close()
            raise

    # -- reading at open -------------------------------------------------------------

    def _open_all(self) -> None:
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir() or entry.name == LOCK_NAME:
                continue
            try:
                check_workflow_id(entry.name)
            except ValueError:
                continue  # not ours; never fail an open over a stray directory
            wf = self._open_workflow(Path(entry.path))
            if wf is not None:
                self._workflows[entry.name] = wf
                self._last_seq = max(self._last_seq, wf.seqs[-1] if wf.seqs else 0)

    def _open_workflow(self, directory: Path) -> _Workflow | None:
        snapshot, journal = directory / SNAPSHOT, directory / JOURNAL
        # A temp snapshot is a compaction that crashed before its rename; the journal
        # still holds everything it had.
        (directory / (SNAPSHOT + ".tmp")).unlink(missing_ok=True)
        if not snapshot.exists() and not journal.exists():
            return None
        wf = _Workflow()
        if snapshot.exists():
            self._read_snapshot(snapshot, wf)
        if journal.exists():
            self._replay(journal, wf)
        return wf

    @staticmethod
    def _read_snapshot(path: Path, wf: _Workflow) -> None:
        try:
            body = json.loads(path.read_bytes())
            if not isinstance(body, dict) or body.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"unknown snapshot format {str(body)[:80]!r}")
            ops = body.get("ops")
            if not isinstance(ops, list):
                raise ValueError("no list of ops")
            for obj in ops:
                wf.apply(_parse(obj))
        except ValueError as exc:
            raise StoreCorruptError(f"{path}: {exc}") from exc

    @staticmethod
    def _replay(path: Path, wf: _Workflow) -> None:
        data = path.read_bytes()
        pending: list[_Op] = []
        bad: tuple[int, str] | None = None  # first unreadable line since the last commit
        pos = committed_end = lineno = 0
        while (newline := data.find(b"\n", pos)) >= 0:
            lineno += 1
            raw, pos = data[pos:newline], newline + 1
            try:
                op = _parse(json.loads(raw))
            except ValueError as exc:
                bad = bad or (lineno, str(exc))
                continue
            if op[0] != "commit":
                pending.append(op)
                continue
            if bad is not None:
                raise StoreCorruptError(f"{path}:{bad[0]}: corrupt journal line: {bad[1]}")
            for item in pending:
                wf.apply(item)
            pending.clear()
            committed_end, wf.journal_lines = pos, lineno
        if committed_end < len(data):
            log.warning(
                "dropping torn journal tail",
                extra={"file": str(path), "bytes": len(data) - committed_end},
            )
            with open(path, "r+b") as f:
                f.truncate(committed_end)
                os.fsync(f.fileno())

    # -- writing ---------------------------------------------------------------------

    def write(self, records: Sequence[Record], events: Sequence[Event] = ()) -> None:
        # Encode everything before touching a file, so a bad document fails the whole
        # call with nothing written.
        groups: dict[str, list[_Op]] = {}
        for r in records:
            if not (isinstance(r.kind, str) and isinstance(r.key, str)):
                raise TypeError(f"record kind and key must be str: {r.kind!r}, {r.key!r}")
            put: _Op = ("put", r.kind, r.key, _to_json(_object(r.doc)))
            groups.setdefault(check_workflow_id(r.workflow_id), []).append(put)
        for e in events:
            if not (_is_int(e.seq) and isinstance(e.type, str)):
                raise TypeError(f"event seq must be int and type str: {e.seq!r}, {e.type!r}")
            event: _Op = ("event", e.seq, e.type, _to_json(_object(e.data)))
            groups.setdefault(check_workflow_id(e.workflow_id), []).append(event)
        with self._mutex:
            self._check_writable()
            for workflow_id, ops in groups.items():
                payload = "".join(_line(op) + "\n" for op in ops).encode() + _COMMIT
                self._append(workflow_id, payload)
                wf = self._workflows.setdefault(workflow_id, _Workflow())
                for op in ops:
                    wf.apply(op)
                if wf.seqs:
                    self._last_seq = max(self._last_seq, wf.seqs[-1])
                wf.journal_lines += len(ops) + 1
                if wf.journal_lines >= self.compact_after_lines:
                    self._compact(workflow_id, wf)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"journal store {self.root} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._broken is not None:
            raise StoreError(f"journal store {self.root} needs a reopen: {self._broken}")

    def _append(self, workflow_id: str, payload: bytes) -> None:
        directory = self.root / workflow_id
        path = directory / JOURNAL
        try:
            new = not path.exists()
            if new:
                directory.mkdir(exist_ok=True)
                _fsync_dir(self.root)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
        try:
            start = os.fstat(fd).st_size
            try:
                _write_all(fd, payload)
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError:
                    self._broken = f"could not roll back {path} after: {exc}"
                raise StoreError(f"cannot append to {path}: {exc}") from exc
            if new:
                _fsync_dir(directory)
        except OSError as exc:
            raise StoreError(f"cannot append to {path}: {exc}") from exc
        finally:
            os.close(fd)

    def compact(self, workflow_id: str) -> None:
        """Fold the journal of one workflow into its snapshot now."""
        with self._mutex:
            self._check_writable()
            wf = self._workflows.get(check_workflow_id(workflow_id))
            if wf is not None:
                self._compact(workflow_id, wf)

    def _compact(self, workflow_id: str, wf: _Workflow) -> None:
        directory = self.root / workflow_id
        ops = [_line(("put", k[0], k[1], doc)) for k, doc in wf.docs.items()]
        ops += [_line(("event", seq, *wf.events[seq])) for seq in wf.seqs]
        body = f'{{"version":{SNAPSHOT_VERSION},"ops":[\n' + ",\n".join(ops) + "\n]}\n"
        tmp = directory / (SNAPSHOT + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(body.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / SNAPSHOT)
            _fsync_dir(directory)
            # Only now is the journal redundant; a crash before this line replays it
            # over the new snapshot, which changes nothing.
            with open(directory / JOURNAL, "r+b") as f:
                f.truncate(0)
                os.fsync(f.fileno())
        except OSError as exc:
            raise StoreError(f"cannot compact {directory}: {exc}") from exc
        wf.journal_lines = 0

    # -- reading ---------------------------------------------------------------------

    def load(self, workflow_id: str) -> dict[tuple[str, str], Doc]:
        with self._mutex:
            self._check_open()
            wf = self._workflows.get(check_workflow_id(workflow_id))
            docs = dict(wf.docs) if wf is not None else {}
        return {k: json.loads(v) for k, v in docs.items()}

    def workflows(self) -> list[Doc]:
        with self._mutex:
            self._check_open()
            texts = [
                wf.docs[("workflow", key)]
                for wf in self._workflows.values()
                for key in sorted(wf.workflow_keys)
            ]
        return [json.loads(t) for t in texts]

    def events(self, workflow_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        with self._mutex:
            self._check_open()
            wf = self._workflows.get(check_workflow_id(workflow_id))
            if wf is None or limit <= 0:
                return []
            start = bisect.bisect_right(wf.seqs, after_seq)
            picked = [(seq, *wf.events[seq]) for seq in wf.seqs[start : start + limit]]
        return [Event(seq, workflow_id, type_, json.loads(data)) for seq, type_, data in picked]

    def last_seq(self) -> int:
        with self._mutex:
            self._check_open()
            return self._last_seq

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            self._lock.close()


def _object(value: Any) -> Doc:
    if not isinstance(value, dict):
        raise TypeError(f"documents and event data must be dicts, not {type(value).__name__}")
    return value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
