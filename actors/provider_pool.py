"""The provider-pool actor: one throttle per provider, shared by every workflow.

Operation actors ask for permits in batches (``acquire(key, want)``), so the pool
costs one Ray call per batch of cloud calls, not one per call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import ray

from actors import metrics
from runtime.throttle import _DEFAULT_PAUSE, DEFAULT_LIMITS, ProviderThrottle, RateLimit


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ProviderPoolActor:
    def __init__(self, limits: Mapping[str, RateLimit] | None = None) -> None:
        self._limits = dict(DEFAULT_LIMITS if limits is None else limits)
        self._throttles: dict[str, ProviderThrottle] = {}
        self._calm_until: dict[str, float] = {}  # per key: end of the last report's pause

    def _throttle(self, key: str) -> ProviderThrottle:
        if key not in self._throttles:
            base = self._limits.get(key) or self._limits.get(key.split(":")[0])
            self._throttles[key] = ProviderThrottle(base or DEFAULT_LIMITS["upcloud"])
        return self._throttles[key]

    def unlimited(self, key: str) -> bool:
        limit = self._throttle(key).limit
        return limit.rate == float("inf") and limit.concurrency is None

    def acquire(self, key: str, want: int) -> tuple[int, float]:
        grant = self._throttle(key).acquire(max(1, want))
        # Once per batch of permits, never per cloud call.
        if grant.granted:
            metrics.provider_calls(key, grant.granted)
        else:
            metrics.throttle_wait(key, grant.retry_in)
        return grant.granted, grant.retry_in

    def release(self, key: str, n: int, succeeded: int = 0) -> None:
        throttle = self._throttle(key)
        throttle.release(n)
        if succeeded:
            throttle.on_success(succeeded)

    def throttled(self, key: str, retry_after: float | None) -> None:
        # While the throttle is paused by a report, it grants nothing: a report arriving
        # meanwhile is from a call granted before that pause, i.e. the same push-back
        # (all the calls already in flight meet the provider's empty bucket). Halving the
        # rate once per call in flight would collapse it; one decrease per event, as TCP
        # cuts its window once per loss event.
        now = time.monotonic()
        if now >= self._calm_until.get(key, -math.inf):
            self._throttle(key).on_throttled(retry_after)
            pause = _DEFAULT_PAUSE if retry_after is None else max(0.0, retry_after)
            self._calm_until[key] = now + pause
        metrics.throttled(key)

    def stats(self) -> dict[str, Any]:
        return {key: t.stats() for key, t in self._throttles.items()}
