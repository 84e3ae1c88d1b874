"""Create coalescing: identical server configs of one operation that reach their create
step close together are launched by ONE provider call.

Only providers with ``max_batch > 1`` take part (AWS, with coalescing switched on: see
``runtime.providers.aws``); for the others the engine makes no coalescer and every item
makes its own call, as before.

How an item goes through it (``runtime.lifecycle.create_server_item`` drives it):

1. ``join(spec, key)``: the item waits in the open batch of its config's *shape*
   (everything but the name: plan, zone, image, user_data, labels). A batch is sealed
   when ``window`` seconds have passed since its first member joined or when it holds
   ``max_batch`` members. Sealing numbers the members 0..n-1. A member alone in its
   batch gets ``None`` and makes the ordinary per-item call (with its key tag).
2. The item stores its own intent, now naming the batch id and its index
   (``Seat.intent``), through the same ``_store_intent`` as every other step: the same
   group commit, the same crash points.
3. ``Seat.ready()``: once every member's intent is durable the batch makes its one
   call, ``provider.create_batch(specs, keys, batch_id)`` under ONE provider-pool
   permit, and hands each member its own server (member ``i`` is the server the
   provider knows as ``(batch_id, i)``) or the call's error.

The durability protocol holds per item: no member's server can exist before that
member's intent is durable, and the intent says where to find it
(``provider.find_batch_member(batch, index)``), so a crash or a lost reply after the
call is reconciled item by item and never launches a second server for an item. A
member that fails to store its intent (or is cancelled) before the call *withdraws*:
the batch is abandoned before it launched (indexes are already durable, so it cannot
launch with fewer members), and the other members join a new batch within the same
attempt (nothing was created, nothing to reconcile).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.errors import TransientError
from runtime.providers.base import Provider, ServerRef
from schemas.models import ServerConfigSpec

__all__ = [
    "DEFAULT_WINDOW",
    "BatchAbandoned",
    "CoalesceStats",
    "CreateCoalescer",
    "Seat",
    "config_shape",
    "new_batch_id",
]

DEFAULT_WINDOW = 0.02  # seconds a batch stays open after its first member joined

Shape = tuple[Any, ...]


class PermitHost(Protocol):
    def permit(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A provider-pool permit for one cloud call."""


class BatchAbandoned(Exception):
    """The batch never launched (a member withdrew before the call): join another."""


def config_shape(spec: ServerConfigSpec) -> Shape:
    """What members of one batch share: everything but the name."""
    return (spec.plan, spec.zone, spec.image, spec.user_data, tuple(sorted(spec.labels.items())))


def new_batch_id() -> str:
    """Unique per launch (it is also EC2's ClientToken, at most 64 characters)."""
    return f"pb-{secrets.token_hex(12)}"


@dataclass
class CoalesceStats:
    """What coalescing saved: ``calls`` shared creates made for ``coalesced`` items;
    ``alone`` items made their own call; ``abandoned`` batches never launched."""

    coalesced: int = 0
    calls: int = 0
    alone: int = 0
    abandoned: int = 0
    largest: int = 0

    @property
    def saved(self) -> int:
        """Create calls not made, compared with one call per item."""
        return self.coalesced - self.calls

    def to_dict(self) -> dict[str, int]:
        return {
            "coalesced_items": self.coalesced,
            "batch_calls": self.calls,
            "single_calls": self.alone,
            "abandoned_batches": self.abandoned,
            "largest_batch": self.largest,
            "calls_saved": self.saved,
        }


@dataclass(eq=False)
class _Member:
    spec: ServerConfigSpec
    key: str
    result: asyncio.Future[ServerRef]
    ready: bool = False


@dataclass(eq=False)
class _Batch:
    id: str
    shape: Shape
    members: list[_Member] = field(default_factory=list)
    sealed: asyncio.Event = field(default_factory=asyncio.Event)
    state: str = "open"  # open -> sealed -> launched | abandoned
    timer: asyncio.TimerHandle | None = None


class Seat:
    """A member's place in a sealed batch of two or more."""

    def __init__(self, coalescer: CreateCoalescer, batch: _Batch, member: _Member) -> None:
        self._coalescer, self._batch, self._member = coalescer, batch, member
        self.index = batch.members.index(member)

    @property
    def batch_id(self) -> str:
        return self._batch.id

    @property
    def size(self) -> int:
        return len(self._batch.members)

    @property
    def intent(self) -> dict[str, Any]:
        """What the item's intent records to find its own server again."""
        return {"batch": self._batch.id, "index": self.index}

    def ready(self) -> asyncio.Future[ServerRef]:
        """This member's intent is durable. Returns the future of its server: the shared
        call's result for this member, its error, or ``BatchAbandoned``."""
        self._member.ready = True
        self._coalescer._maybe_launch(self._batch)
        return self._member.result

    def withdraw(self) -> None:
        """This member will not become ready: abandon the batch if it has not launched."""
        self._coalescer._abandon(self._batch)


class CreateCoalescer:
    """Batches the creates of one operation (one event loop, no locking needed)."""

    def __init__(
        self,
        provider: Provider,
        host: PermitHost,
        *,
        window: float = DEFAULT_WINDOW,
        max_batch: int | None = None,
        batch_ids: Callable[[], str] = new_batch_id,
    ) -> None:
        self.provider = provider
        self.host = host
        self.window = window
        self.max_batch = max(1, min(max_batch or provider.max_batch, provider.max_batch))
        self.stats = CoalesceStats()
        self._batch_ids = batch_ids
        self._open: dict[Shape, _Batch] = {}
        self._launches: set[asyncio.Task[None]] = set()

    async def join(self, spec: ServerConfigSpec, key: str) -> Seat | None:
        """Wait for this item's batch to be sealed; None if the item is alone in it."""
        loop = asyncio.get_running_loop()
        shape = config_shape(spec)
        batch = self._open.get(shape)
        if batch is None:
            batch = _Batch(self._batch_ids(), shape)
            self._open[shape] = batch
            batch.timer = loop.call_later(self.window, self._seal, batch)
        member = _Member(spec, key, loop.create_future())
        member.result.add_done_callback(_retrieve)
        batch.members.append(member)
        if len(batch.members) >= self.max_batch:
            self._seal(batch)
        try:
            await batch.sealed.wait()
        except asyncio.CancelledError:
            self._leave(batch, member)
            raise
        if batch.state == "abandoned":  # a member withdrew between the seal and now
            raise BatchAbandoned(batch.id)
        if len(batch.members) == 1:
            self.stats.alone += 1
            return None
        return Seat(self, batch, member)

    def _seal(self, batch: _Batch) -> None:
        if batch.state != "open":
            return
        if self._open.get(batch.shape) is batch:
            del self._open[batch.shape]
        if batch.timer is not None:
            batch.timer.cancel()
        batch.state = "sealed"
        batch.sealed.set()

    def _leave(self, batch: _Batch, member: _Member) -> None:
        """A member cancelled while it waited: before the seal it just leaves (indexes
        are given at the seal), after it the batch is abandoned."""
        if batch.state == "open":
            batch.members.remove(member)
            if not batch.members:
                if batch.timer is not None:
                    batch.timer.cancel()
                del self._open[batch.shape]
        else:
            self._abandon(batch)

    def _abandon(self, batch: _Batch) -> None:
        if batch.state != "sealed":
            return  # launched: the call is made, its result stays to be adopted
        batch.state = "abandoned"
        self.stats.abandoned += 1
        for m in batch.members:
            if not m.result.done():
                m.result.set_exception(BatchAbandoned(batch.id))

    def _maybe_launch(self, batch: _Batch) -> None:
        if batch.state != "sealed" or not all(m.ready for m in batch.members):
            return
        batch.state = "launched"
        task = asyncio.create_task(self._launch(batch))
        self._launches.add(task)
        task.add_done_callback(self._launches.discard)

    async def _launch(self, batch: _Batch) -> None:
        members = batch.members
        self.stats.calls += 1
        self.stats.coalesced += len(members)
        self.stats.largest = max(self.stats.largest, len(members))
        try:
            async with self.host.permit():
                refs = await self.provider.create_batch(
                    [m.spec for m in members], [m.key for m in members], batch.id
                )
            if len(refs) != len(members):
                raise RuntimeError(f"create_batch returned {len(refs)} of {len(members)}")
        except BaseException as exc:
            for m in members:
                if not m.result.done():
                    m.result.set_exception(_copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for m, ref in zip(members, refs, strict=True):
            if not m.result.done():
                m.result.set_result(ref)


def _copy(exc: BaseException) -> BaseException:
    """Each member raises its own exception object (tracebacks are per raise)."""
    if isinstance(exc, asyncio.CancelledError):
        # The loop is going away; members see a retryable error, not a cancellation.
        return TransientError("coalesced create cancelled before it returned")
    try:
        return copy.copy(exc)
    except Exception:
        return exc


def _retrieve(fut: asyncio.Future[ServerRef]) -> None:
    # A member that timed out may never read its result; do not log it as lost.
    if not fut.cancelled():
        fut.exception()
