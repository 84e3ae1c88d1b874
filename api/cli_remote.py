"""The CLI's commands that drive a running orchestrator through the REST API:
``batch submit | monitor | list | status | rollback | cancel | resume | stats``.

Registered on the ``batch`` Typer app by ``api.cli``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from api.client import PREFIX, ApiClient
from api.progress import WorkflowProgress
from api.render import status_table
from api.terminal import EXIT_FAILED, EXIT_OK, err, out
from runtime.settings import Settings

Doc = dict[str, Any]
TERMINAL = {"Completed", "Failed", "Cancelled", "RolledBack", "RollbackFailed"}
IdArg = Annotated[str, typer.Argument(help="Workflow id (wf-...).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow live progress until it ends.")]


def client() -> ApiClient:
    return ApiClient.from_settings(Settings.from_env())


def follow(api: ApiClient, wid: str, *, quiet: bool = False) -> Doc:
    """Follow the progress stream until the workflow is terminal; the last status doc."""
    doc: Doc = {}
    if quiet:
        for event in api.events(wid):
            if event.event == "status":
                doc = json.loads(event.data)
    else:
        with WorkflowProgress(out) as bars:
            for event in api.events(wid):
                if event.event == "status":
                    doc = json.loads(event.data)
                    bars.update(doc)
    return doc or api.get(wid)


def show(doc: Doc, as_json: bool) -> None:
    """A status document: as JSON, or as the table with its error below."""
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        out.print(status_table(doc))
        if doc.get("error"):
            err.print(f"[red]{escape(str(doc['error']))}[/]")


def finish(doc: Doc, as_json: bool, success: str = "Completed") -> None:
    """Show ``doc``, then exit 0 if the workflow reached ``success``, else 1."""
    show(doc, as_json)
    raise typer.Exit(EXIT_OK if doc.get("status") == success else EXIT_FAILED)


def submit(
    file: Annotated[
        Path, typer.Argument(help="Workflow file (.ncl or .json).", show_default=False)
    ],
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Resubmitting with it returns the same workflow."),
    ] = None,
) -> None:
    """Submit a workflow to the orchestrator (`provisioning up`); print its id."""
    if not file.is_file():
        from runtime.errors import InputError

        raise InputError(f"{file}: no such file")
    with client() as api:
        created = api.submit_file(file, idempotency_key)
        wid = created["id"]
        if not wait:
            if as_json:
                print(json.dumps(created, indent=2))
            else:
                out.print(
                    f"submitted [bold]{wid}[/] ({escape(created['name'])}): {created['status']}"
                )
                out.print(f"follow it with: provisioning batch monitor {wid}", highlight=False)
            return
        err.print(f"workflow {wid} submitted; following its progress", highlight=False)
        finish(follow(api, wid, quiet=as_json), as_json)


def monitor(wid: IdArg, as_json: JsonOpt = False) -> None:
    """Live progress bars per operation until the workflow ends; exit 0 if Completed."""
    with client() as api:
        finish(follow(api, wid, quiet=as_json), as_json)


def list_workflows(
    status: Annotated[
        str | None, typer.Option("--status", help="Only this state (e.g. Running, Failed).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Workflows, oldest first."""
    with client() as api:
        docs = api.list(status)
    if as_json:
        print(json.dumps(docs, indent=2))
        return
    table = Table()
    table.add_column("id", no_wrap=True)  # whole: it is what the other commands take
    table.add_column("status", no_wrap=True)
    for column in ("name", "items", "created"):
        table.add_column(column)
    for d in docs:
        table.add_row(
            d["id"],
            d["status"],
            d.get("name") or "",
            str(d.get("items_total") or ""),
            _time(d.get("created_at")),
        )
    out.print(table)
    out.print(f"{len(docs)} workflow(s)")


def status(wid: IdArg, as_json: JsonOpt = False) -> None:
    """A workflow and its operations with item counts by state."""
    with client() as api:
        doc = api.get(wid)
    show(doc, as_json)


def rollback(
    wid: IdArg,
    operation: Annotated[
        str | None, typer.Option("--operation", help="Only this operation and what depends on it.")
    ] = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List exactly what would be undone; change nothing.")
    ] = False,
) -> None:
    """Undo what the workflow created (servers it made, taskservs it installed)."""
    with client() as api:
        if dry_run:
            params = {"operation": operation} if operation else None
            preview = api.request("GET", f"{PREFIX}/{wid}/rollback/preview", params=params)
            if as_json:
                print(json.dumps(preview, indent=2))
                return
            table = Table("operation", "item", "action", "server", title=f"rollback of {wid}")
            for step in preview["steps"]:
                table.add_row(step["op"], step["item"], step["action"], step["server"] or "")
            out.print(table)
            out.print(f"{len(preview['steps'])} step(s); nothing was changed")
            return
        doc = api.action(wid, "rollback", {"operation": operation})
        if not wait:
            out.print(f"{wid}: rollback requested ({doc['status']})", highlight=False)
            return
        # The request returns before the workflow actor records RollingBack: wait for it,
        # or the stream would end at once on the old terminal state.
        _until(lambda: api.get(wid)["status"] in ("RollingBack", "RolledBack", "RollbackFailed"))
        finish(follow(api, wid, quiet=as_json), as_json, success="RolledBack")


def cancel(wid: IdArg) -> None:
    """Start nothing new; in-flight provider calls finish and are recorded."""
    with client() as api:
        doc = api.action(wid, "cancel")
    out.print(f"{wid}: cancel requested ({doc['status']})", highlight=False)


def resume(wid: IdArg, wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Continue an interrupted workflow, or redrive a Failed or Cancelled one."""
    with client() as api:
        doc = api.action(wid, "resume")
        if not wait:
            out.print(f"{wid}: resumed ({doc['status']})", highlight=False)
            return
        _until(lambda: api.get(wid)["status"] not in ("Failed", "Cancelled"))
        finish(follow(api, wid, quiet=as_json), as_json)


def stats(as_json: JsonOpt = False) -> None:
    """Workflows by status, items by state, success rate, durations, provider calls."""
    with client() as api:
        doc = api.stats()
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    rate = doc.get("success_rate")
    out.print(
        f"[bold]{doc.get('workflows', 0)}[/] workflows, {doc.get('live', 0)} live, "
        f"{doc.get('queued', 0)} queued; success rate "
        f"{'-' if rate is None else f'{rate:.0%}'}"
    )
    table = Table("workflows by status", "count")
    for s, n in sorted(doc.get("by_status", {}).items()):
        table.add_row(s, str(n))
    items = Table("items by state", "count")
    for s, n in sorted(doc.get("items_by_state", {}).items()):
        items.add_row(s, str(n))
    ops = Table("operation type", "count", "mean s", "p95 s")
    for kind, row in sorted(doc.get("operations_by_type", {}).items()):
        ops.add_row(
            kind, str(row["count"]), _num(row.get("mean_s"), ".2f"), _num(row.get("p95_s"), ".2f")
        )
    prov = Table("provider", "calls", "throttled", "waits", "rate now")
    for key, row in sorted(doc.get("providers", {}).items()):
        prov.add_row(
            key,
            str(row.get("granted_total", 0)),
            str(row.get("throttled_events", 0)),
            str(row.get("waits", 0)),
            _num(row.get("current_rate"), "g"),  # None: a provider without a rate limit
        )
    for t in (table, items, ops, prov):
        out.print(t)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S") if ts else ""


def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.2)


COMMANDS: list[tuple[str, Callable[..., None]]] = [
    ("submit", submit),
    ("monitor", monitor),
    ("list", list_workflows),
    ("status", status),
    ("rollback", rollback),
    ("cancel", cancel),
    ("resume", resume),
    ("stats", stats),
]
