"""How boto3 and botocore errors become the runtime's error classes, in one place.

EC2 error codes are sorted by what the retry loop should do with them; any other 4xx
is permanent. Messages keep only their first line: some AWS messages append the
canonical request, which can carry a session token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoAuthTokenError,
    NoCredentialsError,
    PartialCredentialsError,
    SSOError,
    TokenRetrievalError,
)
from botocore.parsers import ResponseParserError

from runtime.errors import AuthError, PermanentError, ProviderError, ThrottledError, TransientError

__all__ = ["aws_errors", "map_aws_error"]

# EC2 error codes by what the retry loop should do; any other 4xx is permanent.
_THROTTLE_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "SlowDown"}
_AUTH_CODES = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "Blocked"}
_AUTH_CODES |= {"SignatureDoesNotMatch", "IncompleteSignature", "MissingAuthenticationToken"}
_AUTH_CODES |= {"ExpiredToken", "RequestExpired", "AccessDenied", "OptInRequired"}
_TRANSIENT_CODES = {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"}
_TRANSIENT_CODES |= {"RequestTimeout", "RequestTimeoutException"}
# Capacity shortages are 4xx on EC2 but come back: worth retrying later.
_TRANSIENT_CODES |= {"InsufficientInstanceCapacity", "InsufficientHostCapacity"}
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
_TOKEN_ERRORS = (TokenRetrievalError, NoAuthTokenError, SSOError)
_NETWORK_ERRORS: tuple[type[Exception], ...] = (ConnectionError, HTTPClientError)
# OSError: raw socket errors that botocore did not wrap.
_NETWORK_ERRORS += (IncompleteReadError, ResponseParserError, OSError)


def _first_line(text: str) -> str:
    # Some AWS messages append the canonical request, which can carry a session token.
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def map_aws_error(exc: BaseException) -> ProviderError:
    """The one translation of boto3/botocore errors into the runtime's error classes."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(err.get("Code", "Unknown"))
        status = meta.get("HTTPStatusCode")
        msg = f"{exc.operation_name}: {code}: {_first_line(str(err.get('Message', '')))}"
        if code in _THROTTLE_CODES or status == 429:
            return ThrottledError(msg, retry_after=_retry_after(meta), status=status, code=code)
        if code in _AUTH_CODES or status in (401, 403):
            return AuthError(msg, status=status, code=code)
        if code in _TRANSIENT_CODES or (status is not None and status >= 500):
            return TransientError(msg, status=status, code=code)
        return PermanentError(msg, status=status, code=code)
    name = type(exc).__name__
    if isinstance(exc, _CREDENTIAL_ERRORS + _TOKEN_ERRORS):
        return AuthError(f"AWS credentials: {name}", code=name)  # the text may name a profile
    detail = f"{name}: {_first_line(str(exc))}"
    if isinstance(exc, _NETWORK_ERRORS):
        return TransientError(f"AWS connection: {detail}", code=name)
    return PermanentError(f"AWS client: {detail}", code=name)


def _retry_after(meta: Mapping[str, Any]) -> float | None:
    headers = {str(k).lower(): v for k, v in (meta.get("HTTPHeaders") or {}).items()}
    try:
        return max(0.0, float(headers["retry-after"]))
    except (KeyError, TypeError, ValueError):
        return None  # EC2 sends none; an HTTP date is not worth parsing here


@contextmanager
def aws_errors() -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError, ResponseParserError, OSError) as exc:
        raise map_aws_error(exc) from exc
