"""Rich renderings shared by CLI commands: plans, status tables, summaries."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from runtime.planner import Plan


def print_plan(console: Console, plan: Plan) -> None:
    wf = plan.workflow
    console.print(
        f"[bold]{wf.name}[/] v{wf.version}: {len(plan.operations)} operations, "
        f"{plan.item_count} items, {len(plan.waves)} waves, "
        f"parallel_limit {wf.parallel_limit}, storage {wf.storage_backend}"
    )
    table = Table("wave", "operation", "type", "items by provider", "depends on", "taskserv order")
    for i, wave in enumerate(plan.waves):
        for op_id in wave:
            op = plan.operations[op_id]
            deps = ", ".join(
                d.on if d.kind.value == "hard" else f"{d.on} (soft)" for d in op.spec.dependencies
            )
            by_provider = ", ".join(f"{p}: {n}" for p, n in plan.items_by_provider(op_id).items())
            order = " -> ".join(op.taskserv_order)
            table.add_row(str(i), op_id, op.spec.type.value, by_provider, deps or "-", order or "-")
    console.print(table)
    if plan.api_calls_by_provider:
        per = ", ".join(f"{p}: {n}" for p, n in sorted(plan.api_calls_by_provider.items()))
        console.print(
            f"expected cloud API calls: at least {plan.api_calls} ({per}); "
            "status polls while servers boot add more"
        )
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def status_table(doc: dict[str, Any]) -> Table:
    """One row per operation from a workflow status document."""
    table = Table(
        "operation",
        "status",
        "done",
        "failed",
        "skipped",
        "total",
        "error",
        title=f"{doc.get('name', '')} {doc.get('id', '')}: {doc.get('status', '')}",
    )
    for op in doc.get("operations", []):
        counts = op.get("counts", {})
        table.add_row(
            op["id"],
            _colour(op["status"]),
            str(counts.get("Completed", 0)),
            str(counts.get("Failed", 0)),
            str(counts.get("Skipped", 0)),
            str(op.get("total", 0)),
            (op.get("error") or "")[:200],
        )
    return table


def _colour(status: str) -> str:
    colour = {
        "Completed": "green",
        "Failed": "red",
        "Skipped": "yellow",
        "Cancelled": "yellow",
        "Running": "cyan",
        "RolledBack": "magenta",
    }.get(status)
    return f"[{colour}]{status}[/]" if colour else status
