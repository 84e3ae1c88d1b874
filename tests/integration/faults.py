"""Invariants every fault test ends with, counted on the provider side.

- exactly one provider resource per item key (local: one server directory per key and
  one ``.creations.log`` line per real creation; emulator: servers by label; moto:
  instances by tag);
- the stored state equals the provider's: a Completed server item's key is live with
  the stored id, any other server item's key is not, and nothing is live that the
  store does not know as Completed;
- after a rollback, nothing is left.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.providers.local import CREATIONS_LOG, STATE_FILE

Doc = dict[str, Any]
Docs = Mapping[tuple[str, str], Doc]


def server_items(docs: Docs) -> dict[str, Doc]:
    return {k: d for (kind, k), d in docs.items() if kind == "item" and d["kind"] == "server"}


def local_resources(data_dir: Path) -> dict[str, str]:
    """Live local servers: key -> server name, from each server directory's state file
    (a key found in two directories fails here)."""
    root = data_dir / "local"
    live: dict[str, str] = {}
    if not root.exists():
        return live
    for entry in root.iterdir():
        state = entry / STATE_FILE
        if entry.name.startswith(".") or not state.exists():
            continue
        key = json.loads(state.read_text())["key"]
        assert key not in live, f"key {key} in two server directories: {live[key]}, {entry.name}"
        live[key] = entry.name
    return live


def local_creations(data_dir: Path) -> Counter[str]:
    log = data_dir / "local" / CREATIONS_LOG
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(line.split()[0] for line in lines)


def assert_store_matches(docs: Docs, live: Mapping[str, Any]) -> None:
    """``live``: key -> provider id (or name) of every resource the provider holds."""
    servers = server_items(docs)
    completed = {d["key"]: d for d in servers.values() if d["status"] == "Completed"}
    assert set(live) == set(completed), (
        f"provider holds {sorted(set(live) - set(completed))} unknown to the store as "
        f"Completed; store has {sorted(set(completed) - set(live))} the provider lacks"
    )
    for key, doc in completed.items():
        assert doc["result"] and doc["result"]["id"] == live[key], (key, doc["result"], live[key])


def assert_local_invariants(data_dir: Path, docs: Docs, *, rolled_back: bool = False) -> None:
    made = local_creations(data_dir)
    twice = {k: n for k, n in made.items() if n > 1}
    assert not twice, f"servers created more than once: {twice}"
    live = local_resources(data_dir)
    assert_store_matches(docs, live)
    keys = {d["key"] for d in server_items(docs).values()}
    assert set(made) <= keys, "a creation under a key the store does not know"
    root = data_dir / "local"
    dirs = (
        sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        if root.exists()
        else []
    )
    assert sorted(live.values()) == dirs, (
        f"orphan server directories: {set(dirs) - set(live.values())}"
    )
    if rolled_back:
        assert not live and not dirs, f"left after rollback: {live} {dirs}"
        statuses = {d["status"] for d in server_items(docs).values() if d.get("intent")}
        assert statuses <= {"RolledBack"}, statuses


def assert_no_resource_without_intent(docs: Docs, live: Mapping[str, Any]) -> None:
    """Right after a crash: the provider holds nothing whose intent was not stored first."""
    with_intent = {d["key"] for d in server_items(docs).values() if d.get("intent")}
    orphans = set(live) - with_intent
    assert not orphans, f"resources without a stored intent: {sorted(orphans)}"
