"""One contract for every ``Store`` backend, run against a real embedded SurrealDB and
real files, plus the failure modes particular to each backend."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from surrealdb import Surreal

from runtime.errors import StoreCorruptError, StoreError, StoreLockedError
from runtime.store import Backend, open_store
from runtime.store import surreal as surreal_module
from runtime.store.base import Event, Record, Store
from runtime.store.journal import JOURNAL, SNAPSHOT, JournalStore
from runtime.store.lock import DirLock
from runtime.store.surreal import SurrealStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["surrealdb", "filesystem"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return cast(Backend, request.param)


@pytest.fixture
def store(backend: Backend, tmp_path: Path) -> Iterator[Store]:
    s = open_store(backend, tmp_path)
    yield s
    s.close()


def reopen(store: Store, backend: Backend, data_dir: Path) -> Store:
    store.close()
    return open_store(backend, data_dir)


def wf_doc(workflow_id: str, **fields: Any) -> Record:
    return Record(workflow_id, "workflow", "", {"id": workflow_id, **fields})


def item(workflow_id: str, key: str, **fields: Any) -> Record:
    return Record(workflow_id, "item", key, {"key": key, **fields})


def eventually(attempt: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            attempt()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_child(code: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, text=True, **popen
    )


# -- documents ----------------------------------------------------------------------


def test_upsert_replaces_the_whole_document(store: Store) -> None:
    store.write([item("wf1", "op/a", state="running", attempt=1)])
    store.write([item("wf1", "op/a", state="done")])
    assert store.load("wf1") == {("item", "op/a"): {"key": "op/a", "state": "done"}}


def test_last_record_of_a_group_wins(store: Store) -> None:
    store.write([item("wf1", "k", n=1), item("wf1", "k", n=2)])
    assert store.load("wf1")[("item", "k")]["n"] == 2


def test_documents_round_trip_exactly(store: Store) -> None:
    doc: dict[str, Any] = {
        "none": None,
        "list": [1, None, "x", {"deep": [None]}],
        "float": 1.5,
        "big": 2**53 + 1,
        "neg": -7,
        "bool": False,
        "date_like": "2024-01-01T00:00:00Z",
        "id_like": "doc:⟨x⟩",
        "unicode": "ü ☃ 🚀",
        "empty": {},
    }
    key = 'op-1/it\'em "q" ; DROP TABLE doc; -- ]`⟩'
    store.write([Record("wf1", "item", key, doc), Record("wf1", "operation", "", {})])
    assert store.load("wf1") == {("item", key): doc, ("operation", ""): {}}


def test_load_returns_one_workflow_only(store: Store) -> None:
    # Ids that prefix each other catch a range scan with the wrong bounds.
    for wf in ("wf", "wf1", "wf10", "wf2"):
        store.write([wf_doc(wf), item(wf, "a", wf=wf), item(wf, "b", wf=wf)])
    loaded = store.load("wf1")
    assert set(loaded) == {("workflow", ""), ("item", "a"), ("item", "b")}
    assert {doc.get("wf", doc.get("id")) for doc in loaded.values()} == {"wf1"}
    assert store.load("unknown") == {}


def test_workflows_lists_only_workflow_documents(store: Store) -> None:
    assert store.workflows() == []
    for n in range(3):
        store.write([wf_doc(f"wf{n}", name=f"w{n}"), item(f"wf{n}", "x")])
    store.write([wf_doc("wf1", name="renamed")])
    found = sorted(store.workflows(), key=lambda d: d["id"])
    assert found == [
        {"id": "wf0", "name": "w0"},
        {"id": "wf1", "name": "renamed"},
        {"id": "wf2", "name": "w2"},
    ]


def test_returned_documents_are_copies(store: Store) -> None:
    tags = ["a"]
    doc = {"state": "done", "tags": tags}
    store.write([Record("wf1", "item", "k", doc)])
    tags.append("mutated after write")
    store.load("wf1")[("item", "k")]["tags"].append("mutated after load")
    assert store.load("wf1")[("item", "k")] == {"state": "done", "tags": ["a"]}


def test_a_write_with_a_bad_document_writes_nothing(store: Store) -> None:
    with pytest.raises((TypeError, ValueError)):
        store.write([item("wf1", "good"), Record("wf1", "item", "bad", {"x": float("nan")})])
    with pytest.raises((TypeError, ValueError)):
        store.write([item("wf1", "good")], [Event(1, "wf1", "t", {"s": {1, 2}})])
    assert store.load("wf1") == {}
    assert store.last_seq() == 0


def test_a_closed_store_refuses_use(store: Store) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreError):
        store.write([item("wf1", "k")])
    with pytest.raises(StoreError):
        store.load("wf1")


def test_empty_write_is_allowed(store: Store) -> None:
    store.write([])
    assert store.workflows() == []


def test_a_group_of_1000_records_round_trips(store: Store) -> None:
    records = [item("wf1", f"op/{n:04}", n=n, payload="x" * 50) for n in range(1000)]
    events = [Event(n, "wf1", "item.done", {"n": n}) for n in range(1, 1001)]
    store.write(records, events)
    loaded = store.load("wf1")
    assert len(loaded) == 1000
    assert loaded == {("item", r.key): r.doc for r in records}
    assert store.events("wf1", limit=1000) == events
    assert store.last_seq() == 1000


# -- events -------------------------------------------------------------------------


def test_events_are_ordered_and_filtered(store: Store) -> None:
    # Seqs are global, interleaved between workflows, and cross 9 -> 10 and 99 -> 100 so
    # that a string ordering would show.
    expected: dict[str, list[Event]] = {"wf1": [], "wf2": []}
    batches = [range(60, 120), range(1, 60)]  # written out of order
    for batch in batches:
        events = [Event(s, "wf1" if s % 3 else "wf2", "tick", {"s": s}) for s in batch]
        store.write([], events)
        for e in events:
            expected[e.workflow_id].append(e)
    for wf, evs in expected.items():
        evs.sort(key=lambda e: e.seq)
        assert store.events(wf) == evs
    wf1 = expected["wf1"]
    assert store.events("wf1", after_seq=9, limit=5) == [e for e in wf1 if e.seq > 9][:5]
    assert store.events("wf1", after_seq=wf1[-1].seq) == []
    assert store.events("wf1", limit=1) == wf1[:1]
    assert store.events("nobody") == []


def test_rewriting_an_event_replaces_it(store: Store) -> None:
    store.write([], [Event(1, "wf1", "a", {"v": 1}), Event(2, "wf1", "b", {})])
    store.write([], [Event(1, "wf1", "a", {"v": 2})])
    assert store.events("wf1") == [Event(1, "wf1", "a", {"v": 2}), Event(2, "wf1", "b", {})]


def test_last_seq_is_the_maximum_and_survives_reopen(
    store: Store, backend: Backend, tmp_path: Path
) -> None:
    assert store.last_seq() == 0
    store.write([], [Event(5, "wf1", "t", {}), Event(7, "wf2", "t", {})])
    store.write([], [Event(6, "wf1", "t", {})])
    store.write([item("wf1", "k")])
    assert store.last_seq() == 7
    store = reopen(store, backend, tmp_path)
    try:
        assert store.last_seq() == 7
    finally:
        store.close()


def test_all_data_survives_reopen(store: Store, backend: Backend, tmp_path: Path) -> None:
    store.write([wf_doc("wf1"), item("wf1", "a", v=None)], [Event(1, "wf1", "t", {"x": [1]})])
    store.write([wf_doc("wf2"), item("wf1", "a", v=2)], [Event(2, "wf2", "t", {})])
    before = (store.load("wf1"), store.load("wf2"), store.events("wf1"), store.events("wf2"))
    store = reopen(store, backend, tmp_path)
    try:
        after = (store.load("wf1"), store.load("wf2"), store.events("wf1"), store.events("wf2"))
        assert after == before
        assert sorted(d["id"] for d in store.workflows()) == ["wf1", "wf2"]
        assert store.last_seq() == 2
    finally:
        store.close()


# -- one owner per directory --------------------------------------------------------

_OPEN_AND_REPORT = """
import sys
from pathlib import Path
from runtime.errors import StoreLockedError
from runtime.store import Backend, open_store
try:
    open_store(sys.argv[1], Path(sys.argv[2]))
except StoreLockedError as exc:
    print(exc)
    sys.exit(3)
"""

_OPEN_WRITE_AND_WAIT = """
import sys, time
from pathlib import Path
from runtime.store import Backend, open_store
from runtime.store.base import Record
store = open_store(sys.argv[1], Path(sys.argv[2]))
store.write([Record("wf-child", "workflow", "", {"by": "child"})])
print("ready", flush=True)
time.sleep(120)
"""


def test_second_store_in_the_same_process_is_refused(
    store: Store, backend: Backend, tmp_path: Path
) -> None:
    with pytest.raises(
        StoreLockedError, match=rf"in use by another orchestrator \(pid {os.getpid()}"
    ):
        open_store(backend, tmp_path)
    store.close()
    open_store(backend, tmp_path).close()


def test_second_store_in_another_process_is_refused(
    store: Store, backend: Backend, tmp_path: Path
) -> None:
    child = run_child(_OPEN_AND_REPORT, backend, str(tmp_path), stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 3, out
    assert f"pid {os.getpid()}" in out
    assert str(tmp_path) in out


def test_lock_is_released_when_the_owner_is_killed(backend: Backend, tmp_path: Path) -> None:
    child = run_child(_OPEN_WRITE_AND_WAIT, backend, str(tmp_path), stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
            open_store(backend, tmp_path)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.wait()
    store = open_store(backend, tmp_path)
    try:
        # Acknowledged before the kill, so it must be there.
        assert store.load("wf-child") == {("workflow", ""): {"by": "child"}}
    finally:
        store.close()


_LOCK_AND_FORK = """
import multiprocessing, sys, time
from pathlib import Path
from runtime.store.lock import DirLock
lock = DirLock(Path(sys.argv[1]))
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
child.start()
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_forked_child_does_not_keep_the_lock_of_a_dead_parent(tmp_path: Path) -> None:
    # A forked worker shares the parent's open lock file; if it kept it, the lock would
    # outlive a kill -9 of the orchestrator for as long as the worker runs.
    parent = run_child(_LOCK_AND_FORK, str(tmp_path), stdout=subprocess.PIPE)
    grandchild = 0
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        with pytest.raises(StoreLockedError):
            DirLock(tmp_path)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        # The grandchild drops its copy right after fork, which may run after the kill.
        eventually(lambda: DirLock(tmp_path).close())
    finally:
        parent.kill()
        parent.wait()
        if grandchild:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)


# -- filesystem backend -------------------------------------------------------------


def _journal(root: Path, workflow_id: str = "wf1") -> Path:
    return root / "journal" / workflow_id / JOURNAL


def _three_groups(tmp_path: Path) -> None:
    s = open_store("filesystem", tmp_path)
    for n in range(3):
        s.write([item("wf1", f"k{n}", n=n)], [Event(n + 1, "wf1", "t", {})])
    s.close()


def test_journal_torn_last_line_is_dropped_and_cut_off(tmp_path: Path) -> None:
    _three_groups(tmp_path)
    path = _journal(tmp_path)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"op":"put","kind":"item","key":"k9","doc":{"n"')
    s = open_store("filesystem", tmp_path)
    try:
        assert path.stat().st_size == size
        assert set(s.load("wf1")) == {("item", "k0"), ("item", "k1"), ("item", "k2")}
        s.write([item("wf1", "k3")])
    finally:
        s.close()
    s = open_store("filesystem", tmp_path)
    try:
        assert len(s.load("wf1")) == 4
    finally:
        s.close()


def test_journal_group_without_commit_is_not_applied(tmp_path: Path) -> None:
    _three_groups(tmp_path)
    with open(_journal(tmp_path), "ab") as f:
        f.write(b'{"op":"put","kind":"item","key":"k9","doc":{}}\n')
    s = open_store("filesystem", tmp_path)
    try:
        assert ("item", "k9") not in s.load("wf1")
    finally:
        s.close()


def test_journal_corrupt_middle_line_names_file_and_line(tmp_path: Path) -> None:
    _three_groups(tmp_path)
    path = _journal(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b'{"op":"put","kind":"item"\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(StoreCorruptError, match=rf"{path}:4\b"):
        open_store("filesystem", tmp_path)
    # A refused open must not leave the directory locked.
    with pytest.raises(StoreCorruptError):
        open_store("filesystem", tmp_path)


def test_journal_corrupt_snapshot_is_reported(tmp_path: Path) -> None:
    _three_groups(tmp_path)
    s = JournalStore(tmp_path / "journal")
    s.compact("wf1")
    s.close()
    snapshot = tmp_path / "journal" / "wf1" / SNAPSHOT
    snapshot.write_text('{"version":1,"ops":[{"op":"put"')
    with pytest.raises(StoreCorruptError, match=str(snapshot)):
        JournalStore(tmp_path / "journal")


def test_journal_compaction_keeps_data_and_shrinks_the_journal(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    s = JournalStore(root, compact_after_lines=50)
    for n in range(20):  # 20 groups of 11 lines: compacts 4 times
        s.write([item("wf1", f"k{n}", n=n, pad="x" * 100)] * 10, [Event(n + 1, "wf1", "t", {})])
    before = (s.load("wf1"), s.events("wf1"))
    s.close()
    assert (root / "wf1" / SNAPSHOT).exists()
    assert len(_journal(tmp_path).read_bytes().splitlines()) < 50
    s = JournalStore(root)
    try:
        assert (s.load("wf1"), s.events("wf1")) == before
        assert len(before[0]) == 20
        assert s.last_seq() == 20
    finally:
        s.close()


def test_journal_replayed_over_its_own_snapshot_changes_nothing(tmp_path: Path) -> None:
    # A crash after the snapshot rename but before the journal truncation.
    _three_groups(tmp_path)
    journal = _journal(tmp_path).read_bytes()
    s = JournalStore(tmp_path / "journal")
    before = (s.load("wf1"), s.events("wf1"))
    s.compact("wf1")
    s.close()
    assert _journal(tmp_path).read_bytes() == b""
    _journal(tmp_path).write_bytes(journal)
    s = JournalStore(tmp_path / "journal")
    try:
        assert (s.load("wf1"), s.events("wf1")) == before
    finally:
        s.close()


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "", "LOCK", "a..b", "wf 1"])
def test_journal_rejects_unsafe_workflow_ids(tmp_path: Path, bad: str) -> None:
    s = JournalStore(tmp_path)
    try:
        with pytest.raises(ValueError, match="invalid workflow id"):
            s.write([item(bad, "k")])
        with pytest.raises(ValueError, match="invalid workflow id"):
            s.load(bad)
    finally:
        s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]


# -- surrealdb backend --------------------------------------------------------------


def test_surreal_turns_on_fsync_before_opening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SURREAL_SYNC_DATA", "false")
    seen: list[str | None] = []
    real = Surreal

    def spy(url: str) -> Any:
        seen.append(os.environ.get("SURREAL_SYNC_DATA"))
        return real(url)

    monkeypatch.setattr(surreal_module, "Surreal", spy)
    SurrealStore(tmp_path / "db").close()
    assert seen == ["true"]


def test_surreal_ids_are_not_parsed_as_surrealql(tmp_path: Path) -> None:
    hostile = "x']; REMOVE TABLE doc; --"
    s = SurrealStore(tmp_path / "db")
    try:
        s.write([wf_doc("safe"), wf_doc(hostile), item(hostile, "⟩; DELETE doc;")])
        s.write([], [Event(1, hostile, "t", {})])
        assert set(s.load(hostile)) == {("workflow", ""), ("item", "⟩; DELETE doc;")}
        assert s.load("safe") == {("workflow", ""): {"id": "safe"}}
        assert s.events(hostile) == [Event(1, hostile, "t", {})]
    finally:
        s.close()


def test_surreal_needs_exactly_one_of_path_and_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SurrealStore()
    with pytest.raises(ValueError):
        SurrealStore(tmp_path, url="ws://localhost:8000")
