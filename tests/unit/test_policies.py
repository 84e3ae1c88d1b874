"""Retry decisions, backoff bounds and failure budgets."""

from __future__ import annotations

import asyncio
import random

import pytest

from runtime.errors import (
    AuthError,
    IllegalTransitionError,
    PermanentError,
    PlanError,
    ProviderError,
    ScriptError,
    StoreError,
    ThrottledError,
    TransientError,
    TransportError,
)
from runtime.policies import (
    FailureBudget,
    backoff_delay,
    is_retryable,
    retry_delay,
    should_retry,
)
from schemas.models import OperationSpec, OperationType, RetrySpec

SAMPLES = 2000


# ---- backoff_delay -----------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6, 10, 50, 1000, 10**6])
def test_backoff_within_exponential_cap(attempt: int) -> None:
    retry = RetrySpec(attempts=5, initial_backoff=1.0, max_backoff=30.0)
    cap = min(30.0, 1.0 * 2 ** min(attempt - 1, 100))
    rng = random.Random(1234)
    delays = [backoff_delay(retry, attempt, rng) for _ in range(SAMPLES)]
    assert all(0.0 <= d <= cap for d in delays)
    assert all(d <= retry.max_backoff for d in delays)
    # Full jitter: the samples cover the whole range [0, cap], not just its top half.
    assert min(delays) < 0.05 * cap
    assert max(delays) > 0.95 * cap
    assert sum(delays) / SAMPLES == pytest.approx(cap / 2, rel=0.05)


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    retry = RetrySpec()
    a = [backoff_delay(retry, n, random.Random(7)) for n in range(1, 8)]
    b = [backoff_delay(retry, n, random.Random(7)) for n in range(1, 8)]
    assert a == b


def test_backoff_grows_until_the_cap() -> None:
    retry = RetrySpec(initial_backoff=0.5, max_backoff=4.0)
    means = []
    for attempt in range(1, 8):
        rng = random.Random(attempt)
        means.append(sum(backoff_delay(retry, attempt, rng) for _ in range(SAMPLES)) / SAMPLES)
    expected = [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]  # half of 0.5 * 2**(n-1), capped at 4
    assert means == pytest.approx(expected, rel=0.06)


def test_backoff_zero_initial_means_no_wait() -> None:
    retry = RetrySpec(initial_backoff=0, max_backoff=0)
    assert backoff_delay(retry, 1) == 0
    assert backoff_delay(retry, 99) == 0


def test_backoff_default_rng_stays_in_bounds() -> None:
    retry = RetrySpec(initial_backoff=2, max_backoff=3)
    assert all(0 <= backoff_delay(retry, 2) <= 3 for _ in range(200))


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_rejects_attempt_below_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(RetrySpec(), attempt)


# ---- should_retry ------------------------------------------------------------------


RETRYABLE: list[BaseException] = [
    ThrottledError(),
    ThrottledError(retry_after=5),
    TransientError("502 bad gateway", status=502),
    TransportError("ssh connection lost"),
    TimeoutError(),
]
NOT_RETRYABLE: list[BaseException] = [
    PermanentError("unknown zone", status=400),
    AuthError("bad token", status=401),
    ProviderError("unclassified"),
    ScriptError("apply", 2, "boom"),
    PlanError("cycle"),
    IllegalTransitionError("item", "Completed", "Running"),
    StoreError("disk full"),
    ValueError("bug"),
    KeyError("bug"),
    ConnectionError("not mapped at a boundary"),
    KeyboardInterrupt(),
    asyncio.CancelledError(),
]


def test_asyncio_timeout_is_the_builtin_timeout() -> None:
    # Since 3.11 they are one class, so counting TimeoutError covers asyncio's too.
    assert asyncio.TimeoutError is TimeoutError


@pytest.mark.parametrize("exc", RETRYABLE, ids=lambda e: type(e).__name__)
def test_retryable_errors_retry_until_attempts_run_out(exc: BaseException) -> None:
    retry = RetrySpec(attempts=3)
    assert is_retryable(exc)
    assert should_retry(exc, 1, retry)
    assert should_retry(exc, 2, retry)
    assert not should_retry(exc, 3, retry)
    assert not should_retry(exc, 4, retry)


@pytest.mark.parametrize("exc", NOT_RETRYABLE, ids=lambda e: type(e).__name__)
def test_non_retryable_errors_never_retry(exc: BaseException) -> None:
    assert not is_retryable(exc)
    assert not should_retry(exc, 1, RetrySpec(attempts=100))


def test_single_attempt_never_retries() -> None:
    assert not should_retry(TransientError("x"), 1, RetrySpec(attempts=1))


def test_retryable_is_read_from_the_class_not_the_message() -> None:
    class FlakyScript(ScriptError):
        retryable = True

    assert should_retry(FlakyScript("apply", 1, "permanent failure"), 1, RetrySpec())
    assert not should_retry(PermanentError("please retry, temporary"), 1, RetrySpec())


# ---- retry_delay -------------------------------------------------------------------


def test_retry_after_is_honoured_even_beyond_max_backoff() -> None:
    retry = RetrySpec(initial_backoff=1, max_backoff=2)
    rng = random.Random(0)
    for _ in range(SAMPLES):
        assert retry_delay(ThrottledError(retry_after=45), 1, retry, rng) == 45


def test_backoff_wins_when_longer_than_retry_after() -> None:
    retry = RetrySpec(initial_backoff=10, max_backoff=10)
    exc = ThrottledError(retry_after=0.001)
    delays = [retry_delay(exc, 5, retry, random.Random(n)) for n in range(SAMPLES)]
    assert all(0.001 <= d <= 10 for d in delays)
    assert max(delays) > 9
    assert retry_delay(exc, 5, retry, random.Random(3)) == max(
        0.001, backoff_delay(retry, 5, random.Random(3))
    )


def test_retry_delay_without_retry_after_is_the_backoff() -> None:
    retry = RetrySpec(initial_backoff=1, max_backoff=8)
    for exc in [ThrottledError(), TransientError("x"), TimeoutError()]:
        assert retry_delay(exc, 3, retry, random.Random(9)) == backoff_delay(
            retry, 3, random.Random(9)
        )


def test_negative_retry_after_counts_as_zero() -> None:
    retry = RetrySpec(initial_backoff=0, max_backoff=0)
    assert retry_delay(ThrottledError(retry_after=-5), 1, retry) == 0


def test_retry_after_on_any_provider_error() -> None:
    exc = TransientError("503", status=503)
    exc.retry_after = 12
    assert retry_delay(exc, 1, RetrySpec(), random.Random(1)) == 12


# ---- FailureBudget -----------------------------------------------------------------


def _op(tolerated: int | str) -> OperationSpec:
    return OperationSpec(
        id="install",
        type=OperationType.TASKSERV_BATCH,
        taskservs=("k8s",),
        tolerated_failures=tolerated,
    )


@pytest.mark.parametrize(
    ("tolerated", "total", "expected"),
    [
        (0, 10, 0),
        (3, 10, 3),
        (3, 0, 3),
        ("10%", 25, 2),
        ("10%", 9, 0),
        ("10%", 10, 1),
        ("50%", 5, 2),
        ("0%", 1000, 0),
        ("100%", 7, 7),
        ("12.5%", 16, 2),
    ],
)
def test_budget_from_operation(tolerated: int | str, total: int, expected: int) -> None:
    budget = FailureBudget.from_operation(_op(tolerated), total)
    assert budget == FailureBudget(total=total, tolerated=expected)
    assert not budget.exceeded(0)
    assert not budget.exceeded(expected)
    assert budget.exceeded(expected + 1)


def test_budget_ten_percent_of_25() -> None:
    budget = FailureBudget.from_operation(_op("10%"), 25)
    assert budget.tolerated == 2
    assert [budget.exceeded(n) for n in range(5)] == [False, False, False, True, True]


def test_budget_validates() -> None:
    with pytest.raises(ValueError):
        FailureBudget(total=-1, tolerated=0)
    with pytest.raises(ValueError):
        FailureBudget(total=1, tolerated=-1)


def test_budget_is_frozen() -> None:
    budget = FailureBudget(total=1, tolerated=0)
    with pytest.raises(AttributeError):
        budget.tolerated = 5  # type: ignore[misc]
