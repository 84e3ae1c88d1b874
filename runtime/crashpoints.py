"""Crash points: a fault test kills the whole orchestrator at one boundary of the
durability protocol, as a power cut or ``kill -9`` would.

Off unless asked for: ``PROVISIONING_CRASH_AT=<name>:<n>[:<action>]`` is read into
``Settings.crash_at``; each actor that holds a crash point calls ``configure`` with it,
and the n-th time this process reaches ``crash_point(name)`` it sends SIGKILL to the
whole orchestrator: the process group of the driver that started the local Ray
instance (the raylet and GCS are in it) and every Ray worker (each has a group of its
own, with the raylet as parent). For ``provisioning batch run`` that is the driver,
Ray and all actors: nothing survives to finish the step cleanly.

Points (see ``runtime.lifecycle`` and ``actors.checkpoint``), for every action
(create, apply, delete, uninstall):

- ``before_intent``: the item is about to store its intent;
- ``after_intent``: the intent is durable, the provider call not yet made;
- ``after_call``: the provider call returned, its result not yet stored;
- ``during_commit``: inside a group commit, the records written, the writers not yet
  told (in the checkpoint actor).

Hits are counted per process (one operation actor runs one operation), and only for
``<action>`` (``create``, ``apply``, ``delete``, ``uninstall``) when it is given.

Hold mode, for a test that kills the orchestrator itself (e.g. by the pids
``provisioning up`` records): ``<name>:<n>[:<action>]:hold=<marker file>``. Reaching
the point then writes ``<marker file>`` (JSON: point, action, hit, pid) and blocks the
calling thread for good, so nothing of that process gets past the boundary; the
test, seeing the marker, does the killing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter

__all__ = ["ACTIONS", "NAMES", "configure", "crash_point", "parse"]

NAMES = frozenset({"before_intent", "after_intent", "after_call", "during_commit"})

ACTIONS = frozenset({"create", "apply", "delete", "uninstall"})

HOLD = ":hold="

_target: tuple[str, int, str | None] | None = None
_hold: str | None = None  # the marker file, in hold mode
_hits: Counter[str] = Counter()


def split_hold(spec: str | None) -> tuple[str | None, str | None]:
    """``"after_call:3:hold=/x/crashpoint"`` -> ``("after_call:3", "/x/crashpoint")``."""
    if not spec or HOLD not in spec:
        return spec, None
    spec, _, marker = spec.partition(HOLD)
    if not os.path.isabs(marker):
        raise ValueError(f"crash point hold marker must be an absolute path: {marker!r}")
    return spec, marker


def parse(spec: str | None) -> tuple[str, int, str | None] | None:
    """``"after_call:3:delete"`` -> ``("after_call", 3, "delete")``; the count defaults
    to 1 and the action to any. A ``:hold=<marker>`` suffix is accepted and left out."""
    spec, _ = split_hold(spec)
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown crash point {name!r}: use one of {', '.join(sorted(NAMES))}")
    if action and action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: use one of {', '.join(sorted(ACTIONS))}")
    try:
        n = int(count or "1")
    except ValueError:
        raise ValueError(f"crash point count must be an integer: {spec!r}") from None
    if n < 1:
        raise ValueError(f"crash point count must be >= 1: {spec!r}")
    return name, n, action or None


def configure(spec: str | None) -> None:
    """Arm (or, with None, disarm) this process's crash point."""
    global _target, _hold
    _target = parse(spec)
    _hold = split_hold(spec)[1]
    _hits.clear()


def crash_point(name: str, action: str | None = None) -> None:
    if _target is None or _target[0] != name or _target[2] not in (None, action):
        return
    _hits[name] += 1
    if _hits[name] == _target[1]:
        if _hold is not None:
            _hold_here(_hold, name, action)
        _kill()


def _hold_here(marker: str, name: str, action: str | None) -> None:
    """Tell the test (atomically: the marker is whole or absent), then never return."""
    print(f"crash point {_target} reached: holding", file=sys.stderr, flush=True)
    info = {"point": name, "action": action, "hit": _hits[name], "pid": os.getpid()}
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, marker)
    while True:  # the test SIGKILLs this process
        time.sleep(3600)


def _kill() -> None:
    print(f"crash point {_target} reached: SIGKILL", file=sys.stderr, flush=True)
    try:
        for pid in victims():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def victims() -> list[int]:
    """Everything of this orchestrator but the caller: the process group of our parent
    (the raylet, in the group of the driver that started Ray) and the parent's other
    children (Ray gives each worker a process group of its own)."""
    me, parent = os.getpid(), os.getppid()
    group = os.getpgid(parent)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, pgid = int(fields[1]), int(fields[2])
        if pgid == group or ppid == parent:
            found.append(int(entry))
    return found
