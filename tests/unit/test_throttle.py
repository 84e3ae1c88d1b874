"""The throttle over simulated time: a fake clock, no sleeping."""

from __future__ import annotations

import itertools
import math

import pytest

from runtime.throttle import (
    DEFAULT_LIMITS,
    Grant,
    ProviderThrottle,
    RateLimit,
    TokenBucket,
    limits_from_env,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- RateLimit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0, "burst": 1}, "rate"),
        ({"rate": -1, "burst": 1}, "rate"),
        ({"rate": math.nan, "burst": 1}, "rate"),
        ({"rate": 1, "burst": 0}, "burst"),
        ({"rate": 1, "burst": 2.5}, "burst"),
        ({"rate": 1, "burst": True}, "burst"),
        ({"rate": 1, "burst": 1, "concurrency": 0}, "concurrency"),
        ({"rate": 1, "burst": 1, "concurrency": -3}, "concurrency"),
    ],
)
def test_rate_limit_rejects(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_rate_limit_accepts() -> None:
    assert RateLimit(rate=math.inf, burst=1).concurrency is None
    assert RateLimit(rate=0.01, burst=1, concurrency=1).rate == 0.01


def test_default_limits() -> None:
    assert DEFAULT_LIMITS["aws"] == RateLimit(rate=5, burst=50, concurrency=100)
    assert DEFAULT_LIMITS["upcloud"] == RateLimit(rate=10, burst=20, concurrency=50)
    assert math.isinf(DEFAULT_LIMITS["local"].rate)
    assert DEFAULT_LIMITS["local"].concurrency is None


# ---- TokenBucket -------------------------------------------------------------------


def test_bucket_starts_full_then_refills_at_rate(clock: FakeClock) -> None:
    b = TokenBucket(rate=5, burst=50, clock=clock)
    assert b.take(60) == 50  # never more than available
    assert b.take(1) == 0
    assert b.wait_time(1) == pytest.approx(0.2)
    assert b.wait_time(5) == pytest.approx(1.0)
    clock.advance(0.1)
    assert b.take(1) == 0
    clock.advance(0.1)
    assert b.take(10) == 1
    clock.advance(1.0)
    assert b.take(10) == 5
    clock.advance(3600)
    assert b.take(1000) == 50  # accrual stops at burst


def test_bucket_exact_grants_over_simulated_seconds(clock: FakeClock) -> None:
    b = TokenBucket(rate=5, burst=50, clock=clock)
    start, remaining, last_grant_at = clock.now, 500, None
    while remaining:
        got = b.take(remaining)
        assert got == (50 if clock.now == start else 5)
        remaining -= got
        last_grant_at = clock.now - start
        clock.advance(1.0)
    assert last_grant_at == 90.0  # (500 - 50) / 5


def test_bucket_driven_by_wait_time_finishes_at_90s(clock: FakeClock) -> None:
    b = TokenBucket(rate=5, burst=50, clock=clock)
    start, remaining = clock.now, 500
    while True:
        remaining -= b.take(remaining)
        if not remaining:
            break
        wait = b.wait_time(1)
        assert wait > 0
        clock.advance(wait)
    assert clock.now - start == pytest.approx(90.0, abs=1e-6)


def test_bucket_fractional_accrual(clock: FakeClock) -> None:
    b = TokenBucket(rate=2, burst=1, clock=clock)
    assert b.take(1) == 1
    clock.advance(0.25)
    assert b.take(1) == 0
    assert b.wait_time() == pytest.approx(0.25)
    clock.advance(0.25)
    assert b.wait_time() == 0
    assert b.take(1) == 1


def test_bucket_wait_time_caps_at_burst(clock: FakeClock) -> None:
    b = TokenBucket(rate=1, burst=3, clock=clock)
    b.take(3)
    assert b.wait_time(100) == pytest.approx(3.0)


def test_bucket_take_zero_and_negative(clock: FakeClock) -> None:
    b = TokenBucket(rate=1, burst=3, clock=clock)
    assert b.take(0) == 0
    with pytest.raises(ValueError):
        b.take(-1)
    assert b.take(3) == 3


def test_bucket_validates(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1, clock=clock)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1, burst=0, clock=clock)
    b = TokenBucket(rate=1, burst=1, clock=clock)
    with pytest.raises(ValueError, match="rate"):
        b.rate = 0


def test_bucket_pause_until(clock: FakeClock) -> None:
    b = TokenBucket(rate=5, burst=50, clock=clock)
    t0 = clock.now
    b.pause_until(t0 + 4)
    assert b.take(1) == 0  # the bucket was full, but the provider said no
    assert b.wait_time(1) == 4.0
    clock.advance(3.75)
    assert b.take(1) == 0
    assert b.wait_time(1) == 0.25
    clock.advance(0.25)
    assert b.wait_time(1) == 0
    assert b.take(100) == 20  # emptied at t0, refilled at 5/s during the 4 s pause
    b.pause_until(clock.now + 100)
    clock.advance(100)
    assert b.take(1000) == 50  # but never beyond burst


def test_bucket_earlier_pause_does_not_shorten(clock: FakeClock) -> None:
    b = TokenBucket(rate=5, burst=50, clock=clock)
    t0 = clock.now
    b.pause_until(t0 + 10)
    b.pause_until(t0 + 1)
    clock.advance(2)
    assert b.take(1) == 0
    assert b.wait_time(1) == 8.0


def test_bucket_pause_longer_than_accrual(clock: FakeClock) -> None:
    b = TokenBucket(rate=1, burst=10, clock=clock)
    b.pause_until(clock.now + 2)
    assert b.wait_time(5) == pytest.approx(5.0)  # tokens accrue during the pause
    assert b.wait_time(1) == pytest.approx(2.0)  # the pause dominates


def test_bucket_rate_change_keeps_tokens_earned(clock: FakeClock) -> None:
    b = TokenBucket(rate=10, burst=100, clock=clock)
    b.take(100)
    clock.advance(1)
    b.rate = 1  # 10 tokens were earned at the old rate
    assert b.rate == 1
    clock.advance(1)
    assert b.take(100) == 11


def test_bucket_infinite_rate(clock: FakeClock) -> None:
    b = TokenBucket(rate=math.inf, burst=1, clock=clock)
    assert b.take(10_000_000) == 10_000_000
    assert b.take(5) == 5
    assert b.wait_time(10**9) == 0
    b.pause_until(clock.now + 2)
    assert b.take(5) == 0
    assert b.wait_time() == pytest.approx(2.0)
    clock.advance(2)
    assert b.take(5) == 5


def test_bucket_clock_going_backwards_grants_nothing_extra(clock: FakeClock) -> None:
    b = TokenBucket(rate=1, burst=5, clock=clock)
    b.take(5)
    clock.advance(-10)
    assert b.take(5) == 0
    clock.advance(10)
    assert b.take(5) == 0
    clock.advance(2)
    assert b.take(5) == 2


# ---- ProviderThrottle --------------------------------------------------------------


def test_throttle_500_permits_last_at_90s(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=5, burst=50), clock)
    start, remaining, grants = clock.now, 500, []
    while True:
        g = t.acquire(remaining)
        if g.granted:
            assert g.retry_in == 0
            grants.append(g.granted)
            t.release(g.granted)
            remaining -= g.granted
            if not remaining:
                break
        else:
            assert g.retry_in > 0
            clock.advance(g.retry_in)
    assert clock.now - start == pytest.approx(90.0, abs=1e-6)
    assert grants[0] == 50 and sum(grants) == 500
    assert t.stats()["granted_total"] == 500
    assert t.stats()["waits"] == 450  # one wait per 0.2 s token


def test_throttle_concurrency_cap(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=math.inf, burst=1, concurrency=3), clock)
    assert t.acquire(10) == Grant(3, 0.0)
    g = t.acquire(1)
    assert g.granted == 0 and g.retry_in > 0
    t.release(2)
    assert t.in_flight == 1
    assert t.acquire(10).granted == 2
    t.release(100)  # more than in flight (a restarted pool): clamps at zero
    assert t.in_flight == 0
    with pytest.raises(ValueError):
        t.release(-1)
    assert t.stats()["waits"] == 1


def test_throttle_grant_is_min_of_tokens_and_slots(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=1, burst=4, concurrency=6), clock)
    assert t.acquire(10).granted == 4  # tokens bind
    clock.advance(10)
    assert t.acquire(10).granted == 2  # slots bind: 4 in flight of 6
    assert t.acquire(1).granted == 0
    t.release(6)
    assert t.acquire(10).granted == 2  # the tokens left over


def test_throttle_acquire_rejects_nonpositive(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=1, burst=1), clock)
    with pytest.raises(ValueError):
        t.acquire(0)


def test_throttle_infinite_rate(clock: FakeClock) -> None:
    t = ProviderThrottle(DEFAULT_LIMITS["local"], clock)
    assert t.acquire(5_000_000) == Grant(5_000_000, 0.0)
    t.on_success(100)
    assert math.isinf(t.current_rate)
    t.on_throttled(1.0)  # only pauses: there is no finite rate to halve
    assert math.isinf(t.current_rate)
    assert t.acquire(1).granted == 0
    clock.advance(1.0)
    assert t.acquire(7).granted == 7


def test_throttle_on_throttled_decreases_and_pauses(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=8, burst=10), clock, min_rate=1)
    t.on_throttled(retry_after=3.0)
    assert t.current_rate == 4
    g = t.acquire(1)
    assert g.granted == 0 and g.retry_in == pytest.approx(3.0)
    clock.advance(3.0)
    assert t.acquire(100).granted == 10  # 3 s at 4/s = 12, capped at burst
    t.on_throttled(None)  # no Retry-After: a default pause
    assert t.current_rate == 2
    g = t.acquire(1)
    assert g.granted == 0 and g.retry_in > 0
    t.on_throttled(0)
    t.on_throttled(0)
    assert t.current_rate == 1  # not below min_rate
    assert t.stats()["throttled_events"] == 4


def test_throttle_min_rate_never_above_limit(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=0.05, burst=1), clock, min_rate=1)
    t.on_throttled(0)
    assert t.current_rate == 0.05


def test_throttle_additive_recovery(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=5, burst=50), clock)  # step 0.5 by default
    t.on_throttled(0)
    assert t.current_rate == 2.5
    t.on_success(2)
    assert t.current_rate == 2.5  # window is ceil(2.5) = 3 successes
    t.on_success()
    assert t.current_rate == 3.0
    rates = [t.current_rate]
    while t.current_rate < 5:
        t.on_success()
        rates.append(t.current_rate)
    assert rates[-1] == 5  # reached the limit exactly
    assert all(b - a in (0, 0.5) for a, b in itertools.pairwise(rates))
    t.on_success(1000)
    assert t.current_rate == 5  # never above


def test_throttle_custom_aimd_parameters(clock: FakeClock) -> None:
    t = ProviderThrottle(
        RateLimit(rate=100, burst=10), clock, decrease_factor=0.9, increase_step=7, min_rate=1
    )
    t.on_throttled(0)
    assert t.current_rate == pytest.approx(90)
    t.on_success(90)
    assert t.current_rate == pytest.approx(97)
    t.on_success(97)
    assert t.current_rate == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decrease_factor": 0},
        {"decrease_factor": 1},
        {"increase_step": 0},
        {"min_rate": 0},
    ],
)
def test_throttle_rejects_bad_parameters(clock: FakeClock, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ProviderThrottle(RateLimit(rate=1, burst=1), clock, **kwargs)


def test_throttle_stats(clock: FakeClock) -> None:
    t = ProviderThrottle(RateLimit(rate=1, burst=2, concurrency=5), clock)
    t.acquire(3)
    t.acquire(1)
    assert t.stats() == {
        "granted_total": 2,
        "throttled_events": 0,
        "current_rate": 1.0,
        "in_flight": 2,
        "waits": 1,
    }


def test_throttle_uses_monotonic_by_default() -> None:
    t = ProviderThrottle(RateLimit(rate=1, burst=3))
    assert t.acquire(5).granted == 3


# ---- limits_from_env ---------------------------------------------------------------


def test_env_empty_gives_a_copy_of_the_base() -> None:
    limits = limits_from_env({"PATH": "/bin", "PROVISIONING_OTHER": "x"})
    assert limits == DEFAULT_LIMITS
    assert limits is not DEFAULT_LIMITS


def test_env_full_override() -> None:
    limits = limits_from_env({"PROVISIONING_RATE_UPCLOUD": "rate=5,burst=10,concurrency=20"})
    assert limits["upcloud"] == RateLimit(rate=5, burst=10, concurrency=20)
    assert limits["aws"] == DEFAULT_LIMITS["aws"]
    assert DEFAULT_LIMITS["upcloud"] == RateLimit(rate=10, burst=20, concurrency=50)


def test_env_partial_override_keeps_the_rest() -> None:
    limits = limits_from_env({"PROVISIONING_RATE_AWS": " rate = 2.5 "})
    assert limits["aws"] == RateLimit(rate=2.5, burst=50, concurrency=100)
    limits = limits_from_env({"PROVISIONING_RATE_AWS": "concurrency=none"})
    assert limits["aws"] == RateLimit(rate=5, burst=50, concurrency=None)
    limits = limits_from_env({"PROVISIONING_RATE_UPCLOUD": "rate=inf,concurrency=unlimited"})
    assert limits["upcloud"] == RateLimit(rate=math.inf, burst=20, concurrency=None)


def test_env_new_key_with_region() -> None:
    limits = limits_from_env({"PROVISIONING_RATE_AWS__EU_WEST_1": "rate=2,burst=4"})
    assert limits["aws:eu-west-1"] == RateLimit(rate=2, burst=4, concurrency=None)


def test_env_custom_base() -> None:
    base = {"x": RateLimit(rate=1, burst=1)}
    assert limits_from_env({"PROVISIONING_RATE_X": "burst=9"}, base) == {
        "x": RateLimit(rate=1, burst=9)
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PROVISIONING_RATE_AWS", ""),
        ("PROVISIONING_RATE_AWS", "rate"),
        ("PROVISIONING_RATE_AWS", "rate=fast"),
        ("PROVISIONING_RATE_AWS", "burst=1.5"),
        ("PROVISIONING_RATE_AWS", "burst=0"),
        ("PROVISIONING_RATE_AWS", "rate=0"),
        ("PROVISIONING_RATE_AWS", "rate=nan"),
        ("PROVISIONING_RATE_AWS", "concurrency=0"),
        ("PROVISIONING_RATE_AWS", "concurrency=lots"),
        ("PROVISIONING_RATE_AWS", "rate=1,rate=2"),
        ("PROVISIONING_RATE_AWS", "speed=1"),
        ("PROVISIONING_RATE_AWS", "rate=1;burst=2"),
        ("PROVISIONING_RATE_AWS", "rate=1,"),
        ("PROVISIONING_RATE_NEWCLOUD", "rate=1"),
        ("PROVISIONING_RATE_NEWCLOUD", "rate=0,burst=1"),
        ("PROVISIONING_RATE_", "rate=1,burst=1"),
    ],
)
def test_env_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        limits_from_env({name: value})
