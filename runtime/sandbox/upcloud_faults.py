"""Fault injection for the UpCloud emulator: latency, a token bucket, 5xx and lost replies.

``FaultInjector`` holds the switchable settings, the seeded random streams and the
counters; ``FaultMiddleware`` applies them to every ``/1.3`` call in this order:
latency, authentication, rate limit (mutating calls only), injected 5xx, the real
handler, and finally a lost reply for creates and deletes that succeeded.

Each random decision draws from its own stream seeded from ``seed``, so turning one
fault on does not shift the sequence of another and a sequential client sees the same
faults on every run.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_UUID_SEGMENT = re.compile(r"/[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}(?=/|$)")


class RateLimitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(gt=0, description="tokens added per second")
    burst: int = Field(ge=1, description="bucket capacity")


class FaultConfig(BaseModel):
    """The JSON of ``PUT /_admin/faults``; fields left out keep their current value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency: float = Field(default=0.0, ge=0, description="seconds added to every API call")
    ready_delay: float = Field(default=0.5, ge=0, description="seconds from create to started")
    stop_delay: float = Field(default=0.1, ge=0, description="seconds from stop to stopped")
    rate_limit: RateLimitSpec | None = None
    error_rate: float = Field(default=0.0, ge=0, le=1, description="share of calls answered 5xx")
    lost_response_rate: float = Field(
        default=0.0, ge=0, le=1, description="share of successful creates/deletes with a lost reply"
    )
    lost_response_mode: Literal["reset", "error"] = "reset"
    seed: int = 0


class TokenBucket:
    """Starts full; ``take`` returns 0 if a token was taken, else the wait for the next one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class FaultStats:
    calls: dict[str, int] = field(default_factory=dict)
    responses_429: int = 0
    responses_5xx: int = 0
    lost_responses: int = 0
    creates: int = 0
    deletes: int = 0
    max_mutating_in_1s: int = 0
    # Every mutating call the rate limit saw, admitted or answered 429: the pace the
    # client offered, which the emulator's own bucket cannot cap.
    max_mutating_attempts_in_1s: int = 0
    # Emulator clock (time.monotonic, comparable across processes on one machine) of the
    # first and last create that succeeded.
    first_create_at: float | None = None
    last_create_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": dict(sorted(self.calls.items())),
            "responses_429": self.responses_429,
            "responses_5xx": self.responses_5xx,
            "lost_responses": self.lost_responses,
            "creates": self.creates,
            "deletes": self.deletes,
            "max_mutating_in_1s": self.max_mutating_in_1s,
            "max_mutating_attempts_in_1s": self.max_mutating_attempts_in_1s,
            "first_create_at": self.first_create_at,
            "last_create_at": self.last_create_at,
        }


class FaultInjector:
    """Switchable faults plus counters. Used from the event loop only, so no locks."""

    def __init__(self, config: FaultConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.initial = config
        self.clock = clock
        self.stats = FaultStats()
        self._window: deque[float] = deque()
        self._attempts: deque[float] = deque()
        self.configure(config)

    def configure(self, config: FaultConfig) -> None:
        self.config = config
        self._error_rng = random.Random(f"{config.seed}/error")
        self._lost_rng = random.Random(f"{config.seed}/lost")
        rl = config.rate_limit
        self.bucket = TokenBucket(rl.rate, rl.burst, self.clock()) if rl else None

    def update(self, changes: dict[str, Any]) -> FaultConfig:
        """Merge ``changes`` into the current settings (validated as a whole)."""
        merged = self.config.model_dump() | changes
        self.configure(FaultConfig.model_validate(merged))
        return self.config

    def reset(self) -> None:
        self.stats = FaultStats()
        self._window.clear()
        self._attempts.clear()
        self.configure(self.initial)

    def count_call(self, route: str) -> None:
        self.stats.calls[route] = self.stats.calls.get(route, 0) + 1

    def admit_mutating(self) -> float | None:
        """None if the call may go on; otherwise seconds until the bucket has a token."""
        now = self.clock()
        _slide(self._attempts, now)
        self.stats.max_mutating_attempts_in_1s = max(
            self.stats.max_mutating_attempts_in_1s, len(self._attempts)
        )
        if self.bucket is not None:
            wait = self.bucket.take(now)
            if wait > 0:
                self.stats.responses_429 += 1
                return wait
        _slide(self._window, now)
        self.stats.max_mutating_in_1s = max(self.stats.max_mutating_in_1s, len(self._window))
        return None

    def count_create(self) -> None:
        now = self.clock()
        self.stats.creates += 1
        if self.stats.first_create_at is None:
            self.stats.first_create_at = now
        self.stats.last_create_at = now

    def draw_error(self) -> int | None:
        """A 5xx status to answer instead of running the call, or None."""
        roll = self._error_rng.random()
        if roll >= self.config.error_rate:
            return None
        self.stats.responses_5xx += 1
        return (500, 502, 503)[self._error_rng.randrange(3)]

    def draw_lost(self) -> bool:
        return self._lost_rng.random() < self.config.lost_response_rate


def _slide(window: deque[float], now: float) -> None:
    """Add ``now`` and drop what is 1 s or more older: ``len(window)`` is then the calls
    in the last second."""
    window.append(now)
    while window and window[0] <= now - 1.0:
        window.popleft()


def route_key(method: str, path: str) -> str:
    """``POST /1.3/server/{uuid}/stop`` style name for the per-route counters."""
    return f"{method} {_UUID_SEGMENT.sub('/{uuid}', path.rstrip('/') or '/')}"


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"error_code": code, "error_message": message}}).encode()


async def send_bytes(
    send: Send, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})


_INJECTED = {
    500: ("application/json", error_body("INTERNAL_ERROR", "Injected internal error.")),
    # A load balancer in front of the API answers with HTML, not the API's JSON.
    502: ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    503: ("application/json", error_body("SERVICE_UNAVAILABLE", "Injected: try again later.")),
}


class FaultMiddleware:
    """Pure ASGI so a lost reply can also be a connection cut mid-response."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        injector: FaultInjector,
        authorize: Callable[[str | None], bool],
        prefix: str = "/1.3",
    ) -> None:
        self.app = app
        self.injector = injector
        self.authorize = authorize
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        inj = self.injector
        method: str = scope["method"]
        route = route_key(method, path)
        inj.count_call(route)
        if inj.config.latency > 0:
            await asyncio.sleep(inj.config.latency)

        auth = dict(scope["headers"]).get(b"authorization")
        if not self.authorize(auth.decode("latin-1") if auth else None):
            body = error_body("AUTHENTICATION_FAILED", "Authentication failed.")
            await send_bytes(send, 401, body, "application/json", [])
            return
        if method in MUTATING:
            wait = inj.admit_mutating()
            if wait is not None:
                retry_after = str(max(1, math.ceil(wait))).encode()
                body = error_body("TOO_MANY_REQUESTS", "Too many requests; slow down.")
                headers = [(b"retry-after", retry_after)]
                await send_bytes(send, 429, body, "application/json", headers)
                return
        status = inj.draw_error()
        if status is not None:
            content_type, body = _INJECTED[status]
            await send_bytes(send, status, body, content_type, [])
            return

        kind = _lossy_kind(method, route)
        if kind is None:
            await self.app(scope, receive, send)
            return
        await self._lossy_call(scope, receive, send, kind)

    async def _lossy_call(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        """Run a create/delete; on success count it and maybe lose the reply on the way back."""
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        status = next((m["status"] for m in held if m["type"] == "http.response.start"), 500)
        if 200 <= status < 300:
            if kind == "create":
                self.injector.count_create()
            else:
                self.injector.stats.deletes += 1
            if self.injector.draw_lost():
                self.injector.stats.lost_responses += 1
                await self._lose(send)
                return
        for message in held:
            await send(message)

    async def _lose(self, send: Send) -> None:
        if self.injector.config.lost_response_mode == "error":
            self.injector.stats.responses_5xx += 1
            await send_bytes(send, 500, b"Internal Server Error", "text/plain", [])
            return
        # Promise more body than we send and return: the server closes the connection, and
        # the client sees a reply cut short after the action already happened.
        start = {
            "type": "http.response.start",
            "status": 202,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
        }
        await send(start)
        await send({"type": "http.response.body", "body": b'{"server": {', "more_body": True})


def _lossy_kind(method: str, route: str) -> str | None:
    if method == "POST" and route.endswith("/server"):
        return "create"
    if method == "DELETE" and route.endswith("/server/{uuid}"):
        return "delete"
    return None
