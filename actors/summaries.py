"""Aggregates over workflow status documents, for ``stats`` and the metrics sweep."""

from __future__ import annotations

from typing import Any

Doc = dict[str, Any]


def operation_stats(docs: list[Doc]) -> Doc:
    """Items by state, and per operation type how many ran and their mean and p95
    durations, from status documents."""
    items: dict[str, int] = {}
    durations: dict[str, list[float]] = {}
    for doc in docs:
        for op in doc.get("operations", []):
            for state, n in (op.get("counts") or {}).items():
                items[state] = items.get(state, 0) + int(n)
            start, end = op.get("started_at"), op.get("finished_at")
            if op.get("type") and start and end and end >= start:
                durations.setdefault(op["type"], []).append(end - start)
    by_type = {}
    for kind, values in durations.items():
        values.sort()
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        by_type[kind] = {
            "count": len(values),
            "mean_s": round(sum(values) / len(values), 3),
            "p95_s": round(p95, 3),
        }
    return {"items_by_state": items, "operations_by_type": by_type}
