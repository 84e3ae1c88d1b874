"""Retry and failure-budget policies: pure functions over the workflow's specs.

Whether an error is worth retrying is read from its class (``retryable``,
``retry_after``), never from its message.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from runtime.errors import ProviderError, TransportError
from schemas.models import OperationSpec, RetrySpec

__all__ = [
    "FailureBudget",
    "backoff_delay",
    "is_retryable",
    "retry_delay",
    "should_retry",
]

_RNG = random.Random()
# 2**64 times any sane initial backoff is far past any max_backoff; capping the exponent
# keeps a huge attempt number from overflowing a float.
_MAX_EXPONENT = 64


def backoff_delay(retry: RetrySpec, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = the first retry).

    Exponential, ``initial_backoff * 2**(attempt-1)`` capped at ``max_backoff``, with
    *full jitter*: uniform in ``[0, cap]``. Many items of one batch tend to fail together
    (a provider hiccup hits all of them); full jitter spreads their retries the most
    and, per AWS's analysis of backoff schemes, costs the fewest calls under contention.
    The cost, a retry that may come almost at once, is covered by the provider throttle,
    which every call still goes through.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1 (1 = first retry), got {attempt}")
    cap = min(retry.max_backoff, retry.initial_backoff * 2 ** min(attempt - 1, _MAX_EXPONENT))
    return (rng or _RNG).uniform(0.0, cap)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ProviderError | TransportError):
        return exc.retryable
    # asyncio.TimeoutError is TimeoutError since 3.11: a call that timed out may succeed.
    return isinstance(exc, TimeoutError)


def should_retry(exc: BaseException, attempt: int, retry: RetrySpec) -> bool:
    """``attempt`` = attempts already made; ``retry.attempts`` counts the first one too."""
    return attempt < retry.attempts and is_retryable(exc)


def retry_delay(
    exc: BaseException, attempt: int, retry: RetrySpec, rng: random.Random | None = None
) -> float:
    """The backoff, but never sooner than the provider's own ``Retry-After``.

    Read from any ``ProviderError`` (a 503 may carry Retry-After too), though in practice
    ``ThrottledError`` is the one that sets it. It may exceed ``max_backoff``: the
    provider knows better than our cap.
    """
    delay = backoff_delay(retry, attempt, rng)
    if isinstance(exc, ProviderError) and exc.retry_after is not None:
        return max(max(0.0, exc.retry_after), delay)
    return delay


@dataclass(frozen=True)
class FailureBudget:
    """How many of an operation's ``total`` items may fail before it counts as Failed."""

    total: int
    tolerated: int

    def __post_init__(self) -> None:
        if self.total < 0 or self.tolerated < 0:
            raise ValueError(
                f"total and tolerated must be >= 0, got {self.total}, {self.tolerated}"
            )

    @classmethod
    def from_operation(cls, op: OperationSpec, total: int) -> FailureBudget:
        return cls(total=total, tolerated=op.tolerated_count(total))

    def exceeded(self, failed: int) -> bool:
        return failed > self.tolerated
