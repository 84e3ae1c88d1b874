"""Load a workflow file (Nickel or JSON) into a ``WorkflowSpec``.

Nickel files are evaluated with the official binding with the ``WorkflowFile``
contract applied, so contract errors come with Nickel's own message and the file and
line of the bad value; the result is then validated again into the frozen models.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nickel
from pydantic import ValidationError

from schemas.errors import InputError
from schemas.models import WorkflowFile, WorkflowSpec

SCHEMAS_DIR = Path(__file__).resolve().parent
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_IMPORT_WORD = re.compile(r"\bimport\b")
_SAFE_IMPORT = re.compile(r'\bimport\s*"([A-Za-z0-9_-]+\.ncl)"(?!\s*as\b)')


class WorkflowLoadError(InputError):
    """A workflow file could not be loaded. The message names the file and place."""


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def load_workflow(path: Path | str) -> WorkflowSpec:
    """Load a ``.ncl`` or ``.json`` workflow file from disk (a trusted, local file)."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowLoadError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WorkflowLoadError(f"{path}: not valid JSON: {exc}") from exc
        return workflow_from_data(data, str(path))
    return _load_nickel(path.resolve(), str(path))


def _load_nickel(path: Path, display_name: str, import_paths: Iterable[Path] = ()) -> WorkflowSpec:
    """Evaluate without the contract first: on a 10,000-operation file the contract costs
    five times the evaluation. The models check the same rules; only when they reject
    the file is it evaluated again with the contract, for Nickel's message with the
    file and line of the bad value."""
    dirs = list(import_paths)
    data = evaluate_nickel_file(path, display_name=display_name, import_paths=dirs, contract=False)
    try:
        return workflow_from_data(data, display_name)
    except WorkflowLoadError:
        data = evaluate_nickel_file(path, display_name=display_name, import_paths=dirs)
        return workflow_from_data(data, display_name)


def evaluate_nickel_file(
    path: Path,
    *,
    display_name: str | None = None,
    import_paths: Iterable[Path] = (),
    contract: bool = True,
) -> Any:
    """Evaluate ``path`` (with the workflow contract applied); return the JSON value."""
    expr = f"import {json.dumps(str(path))}"
    if contract:
        expr = f'({expr}) | (import "workflows.ncl").WorkflowFile'
    paths = [str(SCHEMAS_DIR), *(str(p) for p in import_paths)]
    try:
        out = nickel.run(expr, import_paths=paths)
    except nickel.NickelException as exc:
        message = strip_ansi(str(exc)).strip()
        if display_name:
            message = message.replace(str(path), display_name)
        raise WorkflowLoadError(f"{display_name or path}: invalid workflow\n{message}") from exc
    return json.loads(out)


def check_imports(source: str, filename: str, allowed: Iterable[str]) -> None:
    """Refuse any ``import`` that is not one of ``allowed`` bare file names.

    ``nickel.run`` opens any absolute path it is given, whatever the import paths say,
    and its error messages quote the file: an untrusted source must be refused before
    it is evaluated, never after.
    """
    allowed_set = set(allowed)
    safe = {m.start(): m.group(1) for m in _SAFE_IMPORT.finditer(source)}
    for m in _IMPORT_WORD.finditer(source):
        line = source.count("\n", 0, m.start()) + 1
        name = safe.get(m.start())
        if name is None or name not in allowed_set:
            raise WorkflowLoadError(
                f"{filename}:{line}: import refused: a submitted workflow may import only "
                f"{', '.join(sorted(allowed_set))}"
            )


def load_workflow_source(
    source: str,
    filename: str = "workflow.ncl",
    *,
    import_dirs: Iterable[Path] = (),
) -> WorkflowSpec:
    """Evaluate Nickel text from an untrusted submitter.

    Only files from the schemas directory and ``import_dirs`` (the taskserv catalog)
    may be imported, by bare name. The source is evaluated from a private empty
    directory so that relative imports cannot reach anything else.
    """
    dirs = [SCHEMAS_DIR, *import_dirs]
    allowed = sorted({p.name for d in dirs if d.is_dir() for p in d.glob("*.ncl")})
    check_imports(source, filename, allowed)
    with tempfile.TemporaryDirectory(prefix="prov-submit-") as tmp:
        path = Path(tmp) / "submitted.ncl"
        path.write_text(source, encoding="utf-8")
        try:
            return _load_nickel(path, filename, import_dirs)
        except WorkflowLoadError as exc:
            # Nickel names the schema and catalog files by their absolute paths: show the
            # submitter the bare names it imports them by, not the server's file system.
            raise WorkflowLoadError(_hide_dirs(str(exc), [*dirs, Path(tmp)])) from exc


def _hide_dirs(message: str, dirs: Iterable[Path]) -> str:
    prefixes = {f"{form}/" for d in dirs for form in (d, d.resolve())}
    for prefix in sorted(prefixes, key=len, reverse=True):
        message = message.replace(prefix, "")
    return message


def workflow_from_data(data: Any, source_name: str = "<workflow>") -> WorkflowSpec:
    """Validate a decoded workflow (``{"batch_workflow": {...}}`` or the inner record)."""
    if isinstance(data, Mapping) and "batch_workflow" not in data and "operations" in data:
        data = {"batch_workflow": data}
    try:
        return WorkflowFile.model_validate(data).batch_workflow
    except ValidationError as exc:
        raise WorkflowLoadError(format_validation_error(exc, data, source_name)) from exc


def format_validation_error(exc: ValidationError, data: Any, source_name: str) -> str:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    ops_loc = ("batch_workflow", "operations")
    if any(e["loc"][:2] == ops_loc and len(e["loc"]) > 2 for e in errors):
        # pydantic checks the list's length again on what is left after the bad
        # operations are dropped: "at least 1 item" would be false for this file.
        errors = [e for e in errors if not (e["loc"] == ops_loc and e["type"] == "too_short")]
    lines = [f"{source_name}: invalid workflow ({len(errors)} error(s))"]
    for err in errors[:20]:
        loc = [str(part) for part in err["loc"]]
        where = ".".join(loc) or "(top level)"
        op_id = _operation_id(data, err["loc"])
        if op_id:
            where += f" (operation {op_id!r})"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def _operation_id(data: Any, loc: tuple[int | str, ...]) -> str | None:
    if len(loc) >= 3 and loc[:2] == ("batch_workflow", "operations") and isinstance(loc[2], int):
        try:
            op = data["batch_workflow"]["operations"][loc[2]]
        except (KeyError, IndexError, TypeError):
            return None
        if isinstance(op, Mapping) and isinstance(op.get("id"), str):
            return str(op["id"])
    return None
