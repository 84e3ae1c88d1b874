"""Errors of the runtime, and whether each is worth retrying.

The whole tree::

    ProvisioningError
    ├── InputError                 bad input from a user (re-exported from schemas)
    │   └── PlanError              the workflow loads but cannot be planned
    ├── IllegalTransitionError     a state machine was asked for a move it does not allow
    ├── ProviderError              raised by a provider adapter, mapped at its boundary
    │   ├── ThrottledError         the provider said "slow down" (429, RequestLimitExceeded)
    │   ├── TransientError         worth retrying: 5xx, timeouts, lost connections
    │   └── PermanentError         not worth retrying: bad plan, unknown zone, 4xx
    │       └── AuthError          wrong or missing credentials
    ├── TransportError             a taskserv script could not be run or failed
    │   └── ScriptError            the script ran and exited non-zero
    └── StoreError                 the store cannot be opened or written
        ├── StoreLockedError       another process owns the store
        └── StoreCorruptError      the stored data cannot be read back

The retry loop reads the class (and ``retryable`` / ``retry_after``), never the message.
"""

from __future__ import annotations

from schemas.errors import InputError, ProvisioningError

__all__ = [
    "AuthError",
    "IllegalTransitionError",
    "InputError",
    "PermanentError",
    "PlanError",
    "ProviderError",
    "ProvisioningError",
    "ScriptError",
    "StoreCorruptError",
    "StoreError",
    "StoreLockedError",
    "ThrottledError",
    "TransientError",
    "TransportError",
    "error_class_name",
]


class PlanError(InputError):
    """The workflow is well-formed but cannot be planned (cycle, unknown id, ...)."""


class IllegalTransitionError(ProvisioningError):
    def __init__(self, level: str, current: str, target: str) -> None:
        super().__init__(f"illegal {level} transition: {current} -> {target}")
        self.level = level
        self.current = current
        self.target = target


class ProviderError(ProvisioningError):
    """Raised by provider adapters only; the cloud library's errors never leak past them."""

    retryable: bool = False
    retry_after: float | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ThrottledError(ProviderError):
    retryable = True

    def __init__(
        self,
        message: str = "throttled by provider",
        *,
        retry_after: float | None = None,
        status: int | None = 429,
        code: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class TransientError(ProviderError):
    retryable = True


class PermanentError(ProviderError):
    retryable = False


class AuthError(PermanentError):
    pass


class TransportError(ProvisioningError):
    retryable: bool = True


class ScriptError(TransportError):
    """A catalog step exited non-zero. Carries the tail of stderr for the operator."""

    retryable = False

    def __init__(self, step: str, exit_code: int, stderr_tail: str) -> None:
        msg = f"{step} exited {exit_code}"
        if stderr_tail:
            msg += f": {stderr_tail}"
        super().__init__(msg)
        self.step = step
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class StoreError(ProvisioningError):
    pass


class StoreLockedError(StoreError):
    pass


class StoreCorruptError(StoreError):
    pass


def error_class_name(exc: BaseException) -> str:
    """The name stored with an item's failure; stable across versions."""
    return type(exc).__name__
