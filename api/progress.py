"""Live progress bars per operation, fed with status documents."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

DONE_STATES = ("Completed", "RolledBack")


class WorkflowProgress:
    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<24}"),
            TextColumn("{task.fields[status]:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed[/]"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            refresh_per_second=4,
        )
        self._tasks: dict[str, TaskID] = {}
        self._first: dict[str, tuple[float, int]] = {}

    def __enter__(self) -> WorkflowProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, doc: dict[str, Any]) -> None:
        for op in doc.get("operations", []):
            counts = op.get("counts") or {}
            done = sum(counts.get(s, 0) for s in DONE_STATES)
            finished = done + sum(counts.get(s, 0) for s in ("Failed", "Skipped", "Cancelled"))
            op_id = op["id"]
            if op_id not in self._tasks:
                self._tasks[op_id] = self.progress.add_task(
                    op_id, total=op.get("total") or None, status="", failed=0, rate=""
                )
            task = self._tasks[op_id]
            elapsed = self.progress.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed:.1f}/s" if elapsed > 0 and done else ""
            self.progress.update(
                task,
                completed=finished,
                total=op.get("total") or None,
                status=op["status"],
                failed=counts.get("Failed", 0),
                rate=rate,
            )
            if op["status"] in ("Pending",):
                self.progress.reset(task, start=False, total=op.get("total") or None)
            elif not self.progress.tasks[task].started:
                self.progress.start_task(task)
