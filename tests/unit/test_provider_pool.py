"""The provider-pool actor's own logic, run in-process (its class without Ray)."""

from __future__ import annotations

import time

from actors.provider_pool import ProviderPoolActor
from runtime.throttle import RateLimit

Pool = ProviderPoolActor.__ray_metadata__.modified_class  # type: ignore[attr-defined]


def test_reports_of_one_push_back_decrease_the_rate_once() -> None:
    pool = Pool({"upcloud": RateLimit(rate=10, burst=20)})
    # Calls already in flight when the provider's bucket ran dry all come back 429.
    for _ in range(3):
        pool.throttled("upcloud", 0.05)
    assert pool.stats()["upcloud"]["current_rate"] == 5
    assert pool.acquire("upcloud", 1)[0] == 0  # paused, and the bucket emptied
    time.sleep(0.06)
    # After the pause a report is news: calls granted since then were throttled too.
    pool.throttled("upcloud", 0.05)
    assert pool.stats()["upcloud"]["current_rate"] == 2.5
