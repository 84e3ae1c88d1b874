"""Provider throttling: a token bucket, a concurrency cap and AIMD, with an injected clock.

Pure logic, no Ray and no sleeping: the ``provider-pool`` actor owns one
``ProviderThrottle`` per provider key ("upcloud", "aws:eu-west-1", ...) and hands out
permits in batches; callers told ``retry_in`` ask again later. Tests drive a fake clock.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_LIMITS",
    "ENV_PREFIX",
    "Grant",
    "ProviderThrottle",
    "RateLimit",
    "TokenBucket",
    "limits_from_env",
]

Clock = Callable[[], float]

# Tolerates float drift when time advances in steps like 0.2 s (0.2 * 5 may be 0.9999...).
_EPS = 1e-9
# When every concurrency slot is taken we cannot know when one frees; ask again soon.
_SLOT_POLL = 0.05
# Pause after a throttle that came without Retry-After.
_DEFAULT_PAUSE = 1.0


@dataclass(frozen=True)
class RateLimit:
    """Tokens per second (``math.inf`` = unlimited), bucket size, and calls in flight."""

    rate: float
    burst: int
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, int | float) and self.rate > 0):  # also rejects NaN
            raise ValueError(f"rate must be > 0 tokens/s (or inf), got {self.rate!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")
        c = self.concurrency
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"concurrency must be an integer >= 1 or None, got {c!r}")


@dataclass(frozen=True)
class Grant:
    granted: int
    retry_in: float  # > 0 when granted == 0: when asking again may succeed


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        RateLimit(rate, burst)  # same validation, same messages
        self._rate = float(rate)
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)  # start full: a fresh process may use its burst
        self._last = clock()
        self._paused_until = -math.inf

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"rate must be > 0 tokens/s (or inf), got {value!r}")
        self._refill()  # tokens earned so far were earned at the old rate
        self._rate = float(value)

    @property
    def burst(self) -> int:
        return self._burst

    def _refill(self) -> float:
        now = self._clock()
        if math.isinf(self._rate):
            self._tokens = float(self._burst)
        else:
            self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
        self._last = max(self._last, now)
        return now

    def take(self, n: int) -> int:
        """Grant up to ``n`` tokens available now (possibly 0)."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens: {n}")
        now = self._refill()
        if now < self._paused_until:
            return 0
        if math.isinf(self._rate):
            return n  # refill is instant, so the bucket size does not bound a batch
        granted = min(n, int(self._tokens + _EPS))
        self._tokens = max(0.0, self._tokens - granted)
        return granted

    def wait_time(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens are available; more than ``burst`` counts as ``burst``,
        since the bucket never holds more."""
        now = self._refill()
        pause = max(0.0, self._paused_until - now)
        if math.isinf(self._rate):
            return pause
        missing = min(n, self._burst) - self._tokens
        accrue = 0.0 if missing <= _EPS else missing / self._rate
        # Tokens keep accruing during a pause, so the two waits overlap.
        return max(pause, accrue)

    def pause_until(self, t: float) -> None:
        """No tokens before clock time ``t`` (the provider's Retry-After).

        The provider just told us we have nothing left, so the bucket is emptied; it
        refills at the current rate meanwhile (never beyond ``burst``), mirroring the
        provider's own bucket refilling while we wait.
        """
        self._refill()
        self._tokens = 0.0
        self._paused_until = max(self._paused_until, t)


class ProviderThrottle:
    """One per provider key (e.g. "upcloud", "aws:eu-west-1"): token bucket + concurrency cap
    + AIMD (multiplicative decrease on throttling, additive increase on success)."""

    def __init__(
        self,
        limit: RateLimit,
        clock: Clock = time.monotonic,
        *,
        decrease_factor: float = 0.5,
        increase_step: float | None = None,
        min_rate: float = 0.1,
    ) -> None:
        if not 0 < decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {decrease_factor!r}")
        step = limit.rate / 10 if increase_step is None else increase_step
        if not step > 0:
            raise ValueError(f"increase_step must be > 0, got {increase_step!r}")
        if not min_rate > 0:
            raise ValueError(f"min_rate must be > 0, got {min_rate!r}")
        self.limit = limit
        self._clock = clock
        self._bucket = TokenBucket(limit.rate, limit.burst, clock)
        self._decrease = decrease_factor
        self._step = step
        self._min_rate = min(min_rate, limit.rate)  # a slow limit stays reachable
        self._in_flight = 0
        self._successes = 0  # since the last increase
        self._granted_total = 0
        self._throttled_events = 0
        self._waits = 0

    @property
    def current_rate(self) -> float:
        return self._bucket.rate

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self, want: int) -> Grant:
        """Up to ``want`` permits, limited by tokens and free concurrency slots."""
        if want < 1:
            raise ValueError(f"want must be >= 1, got {want}")
        cap = self.limit.concurrency
        free = want if cap is None else min(want, cap - self._in_flight)
        if free <= 0:
            self._waits += 1
            return Grant(0, max(_SLOT_POLL, self._bucket.wait_time(1)))
        granted = self._bucket.take(free)
        if granted == 0:
            self._waits += 1
            return Grant(0, max(_EPS, self._bucket.wait_time(1)))
        self._in_flight += granted
        self._granted_total += granted
        return Grant(granted, 0.0)

    def release(self, n: int) -> None:
        """``n`` calls finished. Clamped at zero: after a pool actor restart, calls granted
        by the previous incarnation still report back."""
        if n < 0:
            raise ValueError(f"cannot release a negative number of calls: {n}")
        self._in_flight = max(0, self._in_flight - n)

    def on_throttled(self, retry_after: float | None) -> None:
        self._throttled_events += 1
        self._successes = 0
        # An infinite rate stays infinite (inf * factor); the pause still applies.
        self._bucket.rate = max(self._min_rate, self._bucket.rate * self._decrease)
        pause = _DEFAULT_PAUSE if retry_after is None else max(0.0, retry_after)
        self._bucket.pause_until(self._clock() + pause)

    def on_success(self, n: int = 1) -> None:
        """Additive increase, once per window of about one second's worth of calls at the
        current rate (as TCP grows by one segment per round trip), up to ``limit.rate``."""
        rate = self._bucket.rate
        if rate >= self.limit.rate:
            self._successes = 0
            return
        self._successes += n
        window = max(1, math.ceil(rate))
        if self._successes >= window:
            self._successes = 0
            self._bucket.rate = min(self.limit.rate, rate + self._step)

    def stats(self) -> dict[str, float | int]:
        return {
            "granted_total": self._granted_total,
            "throttled_events": self._throttled_events,
            "current_rate": self._bucket.rate,
            "in_flight": self._in_flight,
            "waits": self._waits,
        }


# Modest defaults, below what the providers publish, because other tools may share the
# same account. AWS EC2 throttles mutating calls (RunInstances, ...) with a token bucket
# of 50 and a refill of 5/s per account and region. UpCloud documents an API request
# limit per account; 10/s with a burst of 20 stays well inside it. The local sandbox
# has no limit worth modelling.
DEFAULT_LIMITS: dict[str, RateLimit] = {
    "upcloud": RateLimit(rate=10, burst=20, concurrency=50),
    "aws": RateLimit(rate=5, burst=50, concurrency=100),
    "local": RateLimit(rate=math.inf, burst=1_000_000, concurrency=None),
}

ENV_PREFIX = "PROVISIONING_RATE_"
_FIELD = re.compile(r"^\s*(rate|burst|concurrency)\s*=\s*(\S+)\s*$")


def _key_from_env(suffix: str) -> str:
    # Variable names cannot hold ':' or '-': "__" stands for ':' and "_" for '-', so
    # PROVISIONING_RATE_AWS__EU_WEST_1 overrides "aws:eu-west-1".
    return suffix.lower().replace("__", ":").replace("_", "-")


def _parse(var: str, text: str, base: RateLimit | None) -> RateLimit:
    fields: dict[str, str] = {}
    for part in text.split(","):
        m = _FIELD.match(part)
        if m is None:
            raise ValueError(
                f"{var}: cannot read {part.strip()!r}; "
                "expected e.g. 'rate=5,burst=10,concurrency=20'"
            )
        if m.group(1) in fields:
            raise ValueError(f"{var}: {m.group(1)} given twice")
        fields[m.group(1)] = m.group(2)
    try:
        rate = float(fields["rate"]) if "rate" in fields else None
        burst = int(fields["burst"]) if "burst" in fields else None
        conc = fields.get("concurrency")
        concurrency = None if conc is None or conc.lower() in ("none", "unlimited") else int(conc)
    except ValueError as exc:
        raise ValueError(f"{var}: {exc}") from None
    if base is None:
        if rate is None or burst is None:
            raise ValueError(f"{var}: a new provider key needs both rate and burst")
        base = RateLimit(math.inf, 1)  # placeholder; rate and burst both come from text
    try:
        return RateLimit(
            rate=base.rate if rate is None else rate,
            burst=base.burst if burst is None else burst,
            concurrency=base.concurrency if conc is None else concurrency,
        )
    except ValueError as exc:
        raise ValueError(f"{var}: {exc}") from None


def limits_from_env(
    env: Mapping[str, str], base: Mapping[str, RateLimit] = DEFAULT_LIMITS
) -> dict[str, RateLimit]:
    """``base`` with overrides like ``PROVISIONING_RATE_UPCLOUD="rate=5,burst=10"``.

    Fields left out keep the base value; ``concurrency=none`` lifts the cap.
    """
    limits = dict(base)
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        suffix = var[len(ENV_PREFIX) :]
        if not suffix:
            raise ValueError(f"{var}: needs a provider key, e.g. {ENV_PREFIX}UPCLOUD")
        key = _key_from_env(suffix)
        limits[key] = _parse(var, env[var], limits.get(key))
    return limits
