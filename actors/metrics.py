"""Custom metrics for the Ray dashboard (Prometheus names ``ray_provisioning_*``).

Called at low frequency only: per group commit, per permit batch, per status sweep,
never per item. A metric that cannot be recorded (no Ray, an exporter problem) is
dropped: metrics must never break the actor that records them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)
_metrics: dict[str, Any] = {}


def _get(kind: str, name: str, description: str, tags: tuple[str, ...], **kw: Any) -> Any:
    if name not in _metrics:
        from ray.util import metrics

        cls = {"gauge": metrics.Gauge, "counter": metrics.Counter, "histogram": metrics.Histogram}
        _metrics[name] = cls[kind](name, description=description, tag_keys=tags, **kw)
    return _metrics[name]


def _safe(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.debug("metric %s not recorded: %s", fn.__name__, exc)

    return wrapper


@_safe
def items_by_state(counts: Mapping[str, int]) -> None:
    """Items of the live workflows by state (set by the orchestrator's status sweep)."""
    gauge = _get("gauge", "provisioning_items", "Items of live workflows by state", ("state",))
    for state in (
        "Pending",
        "Running",
        "Completed",
        "Failed",
        "Skipped",
        "Cancelled",
        "RolledBack",
    ):
        gauge.set(float(counts.get(state, 0)), tags={"state": state})


@_safe
def workflows_by_status(counts: Mapping[str, int]) -> None:
    gauge = _get("gauge", "provisioning_workflows", "Workflows by status", ("status",))
    for status, n in counts.items():
        gauge.set(float(n), tags={"status": status})


@_safe
def provider_calls(provider: str, granted: int) -> None:
    """Permits handed out by the provider pool: one per cloud API call."""
    if granted:
        counter = _get(
            "counter", "provisioning_provider_calls", "Provider API calls permitted", ("provider",)
        )
        counter.inc(float(granted), tags={"provider": provider})


@_safe
def throttle_wait(provider: str, seconds: float) -> None:
    """A permit request that had to wait (the bucket was empty or the cap reached)."""
    counter = _get(
        "counter", "provisioning_throttle_waits", "Permit requests told to wait", ("provider",)
    )
    counter.inc(1.0, tags={"provider": provider})
    wait = _get(
        "counter",
        "provisioning_throttle_wait_seconds",
        "Seconds permit requests were told to wait",
        ("provider",),
    )
    wait.inc(max(0.0, seconds), tags={"provider": provider})


@_safe
def throttled(provider: str) -> None:
    """The provider itself said "slow down" (429, RequestLimitExceeded)."""
    counter = _get(
        "counter",
        "provisioning_provider_throttled",
        "Throttling responses from providers",
        ("provider",),
    )
    counter.inc(1.0, tags={"provider": provider})


@_safe
def checkpoint_write(seconds: float, records: int) -> None:
    """One group commit: its latency and how many records it carried."""
    hist = _get(
        "histogram",
        "provisioning_checkpoint_write_seconds",
        "Latency of one checkpoint group commit",
        (),
        boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
    )
    hist.observe(seconds)
    counter = _get(
        "counter", "provisioning_checkpoint_records", "Records written by the checkpoint", ()
    )
    counter.inc(float(records))
