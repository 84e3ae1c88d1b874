"""The taskserv catalog: one ``<name>.ncl`` file per entry, found along a search path.

Directories from ``PROVISIONING_TASKSERV_PATH`` (colon-separated) come first, the
built-in ``taskservs/`` last, so a platform team can shadow a built-in entry or add
its own without forking. Each file is evaluated with Nickel, checked by the
``Taskserv`` contract of ``schemas/taskservs.ncl``, then validated into a
``TaskservSpec``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import nickel
from pydantic import ValidationError

from schemas.errors import InputError
from schemas.models import TaskservSpec

__all__ = [
    "ENV_VAR",
    "builtin_catalog_dir",
    "catalog_dirs",
    "load_catalog",
    "load_entry",
    "schemas_dir",
]

ENV_VAR = "PROVISIONING_TASKSERV_PATH"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# (file path, mtime_ns, size, contract mtime_ns) -> spec. Evaluating an entry costs a few
# milliseconds and the planner and every operation load the catalog; files rarely change.
_cache: dict[tuple[str, int, int, int], TaskservSpec] = {}


def schemas_dir() -> Path:
    """Where ``taskservs.ncl`` lives; catalog files import it by bare name."""
    return Path(__file__).resolve().parent


def builtin_catalog_dir() -> Path:
    """The repository's ``taskservs/`` directory, next to ``schemas/``."""
    return Path(__file__).resolve().parent.parent / "taskservs"


def catalog_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """The search path: ``$PROVISIONING_TASKSERV_PATH`` entries, then the built-in dir."""
    env = os.environ if env is None else env
    dirs = [Path(p).expanduser() for p in env.get(ENV_VAR, "").split(":") if p.strip()]
    builtin = builtin_catalog_dir()
    if builtin not in dirs:
        dirs.append(builtin)
    return dirs


def load_catalog(dirs: list[Path] | None = None) -> dict[str, TaskservSpec]:
    """Every entry along ``dirs`` (default: ``catalog_dirs()``); the first dir wins a name.

    Missing directories are skipped (a stale path entry is not an error); a broken
    file is, even when an earlier directory shadows its name, because a typo in a
    catalog should surface the day it is made.
    """
    catalog: dict[str, TaskservSpec] = {}
    for directory in catalog_dirs() if dirs is None else dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.ncl")):
            spec = load_entry(path)
            catalog.setdefault(spec.name, spec)
    return catalog


def load_entry(path: Path) -> TaskservSpec:
    """Evaluate one catalog file; raise ``InputError`` naming the file on any problem."""
    path = path.resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read taskserv entry: {exc.strerror}") from exc
    contract = schemas_dir() / "taskservs.ncl"
    key = (str(path), stat.st_mtime_ns, stat.st_size, contract.stat().st_mtime_ns)
    cached = _cache.get(key)
    if cached is not None:
        return cached

    # Importing the file (rather than passing its text) makes Nickel's error positions
    # name the real file instead of "python:1:1".
    source = f"import {json.dumps(str(path))}"
    try:
        text = nickel.run(source, [str(schemas_dir()), str(path.parent)])
    except nickel.NickelException as exc:
        message = _ANSI.sub("", str(exc)).strip()
        raise InputError(f"{path}: invalid taskserv entry:\n{message}") from exc

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # the binding always returns JSON; be explicit
        raise InputError(f"{path}: Nickel did not return JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: a taskserv entry must be a record, got {type(data).__name__}")
    try:
        spec = TaskservSpec.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{path}: invalid taskserv entry: {exc}") from exc
    if spec.name != path.stem:
        raise InputError(f"{path}: entry name {spec.name!r} must equal the file name {path.stem!r}")
    _cache[key] = spec
    return spec
