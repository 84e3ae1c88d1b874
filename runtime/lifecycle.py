"""The item lifecycle, written once: intent, call, result, and reconcile.

Every provider and every taskserv goes through these functions:

1. Before any side effect, persist the intent (action, attempt). ``persist`` returns
   only once the group commit holding it is durable.
2. Call the provider with the item's idempotency key.
3. Persist the result.

An item that has an intent but no result (a crash, a lost response, a failed
attempt) is reconciled first: the resource is looked up by its key and adopted if it
exists; only if it does not is it created again. Providers such as moto ignore EC2's
``ClientToken`` and UpCloud has none, so this is what keeps one server per key.

Coalesced creates (``runtime.coalesce``, providers with ``max_batch > 1``): the intent
also names the batch and the item's index in it, stored before the shared call like
any intent; an item whose intent names a batch is reconciled by
``provider.find_batch_member(batch, index)`` instead of by key, and a later intent of
the item (a delete) carries that identity along until the server is found or gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from runtime.coalesce import BatchAbandoned, CreateCoalescer
from runtime.crashpoints import crash_point
from runtime.errors import ScriptError, ThrottledError
from runtime.policies import retry_delay, should_retry
from runtime.providers.base import Provider, ServerRef
from runtime.records import now
from runtime.states import ItemState
from runtime.transports.base import Transport
from schemas.models import RetrySpec, ServerConfigSpec, TaskservSpec

Doc = dict[str, Any]
SETTLE_TIMEOUT = 120.0  # seconds a retry waits for a create left in flight


class ItemHost(Protocol):
    """What an item needs from the operation running it."""

    async def persist(self, item: Doc) -> None:
        """Store the item document durably (group commit)."""

    def permit(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A provider-pool permit for one cloud call (rate limit and concurrency)."""

    def on_throttled(self, retry_after: float | None) -> None:
        """Tell the provider pool the provider pushed back."""


async def with_retries(
    item: Doc,
    host: ItemHost,
    retry: RetrySpec,
    timeout: float | None,
    attempt_fn: Callable[[int], Awaitable[None]],
    settle: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``attempt_fn(attempt)`` until it succeeds or the error is final; before a
    retry, outside the attempt timeout, ``settle()`` waits for what the failed attempt
    left in flight."""
    attempt = int(item.get("attempt") or 0)
    while True:
        attempt += 1
        try:
            if timeout is None:
                await attempt_fn(attempt)
            else:
                async with asyncio.timeout(timeout):
                    await attempt_fn(attempt)
            return
        except Exception as exc:
            if isinstance(exc, ThrottledError):
                host.on_throttled(exc.retry_after)
            if not should_retry(exc, attempt, retry):
                raise
            if settle is not None:
                await settle()
            await asyncio.sleep(retry_delay(exc, attempt, retry))


def _mark_intent(item: Doc, action: str, attempt: int) -> None:
    item["intent"] = {"action": action, "attempt": attempt, "at": now()}
    item["attempt"] = attempt
    item["status"] = ItemState.RUNNING.value
    item["started_at"] = item.get("started_at") or now()


async def _store_intent(
    item: Doc,
    action: str,
    attempt: int,
    host: ItemHost,
    *,
    running: bool = True,
    where: Doc | None = None,
) -> None:
    """Step 1 of the protocol: the intent is durable before the side effect starts.
    Rollback steps keep the item's status; forward steps mark it Running. ``where``
    (a coalesced create's batch and index) goes into the intent."""
    crash_point("before_intent", action)
    if running:
        _mark_intent(item, action, attempt)
    else:
        item["intent"] = {"action": action, "attempt": attempt, "at": now()}
        item["attempt"] = attempt
    if where:
        item["intent"].update(where)
    await host.persist(item)
    crash_point("after_intent", action)


def _batch_identity(item: Doc) -> Doc | None:
    """The batch and index the item's last intent names (a coalesced create), if any."""
    intent = item.get("intent") or {}
    if intent.get("batch") is None:
        return None
    return {"batch": str(intent["batch"]), "index": int(intent["index"])}


async def _find_own(
    item: Doc, provider: Provider, spec: ServerConfigSpec | None = None
) -> ServerRef | None:
    """Reconcile: the server the item's intent may have made, by batch or by key."""
    key = str(item["key"])
    where = _batch_identity(item)
    if where is None:
        return await provider.find_server(key)
    return await provider.find_batch_member(where["batch"], where["index"], key, spec)


def _mark_done(item: Doc, status: ItemState, result: Any = None) -> None:
    item["status"] = status.value
    if result is not None:
        item["result"] = result
    item["error"] = None
    item["finished_at"] = now()


async def create_server_item(
    item: Doc,
    spec: ServerConfigSpec,
    provider: Provider,
    host: ItemHost,
    retry: RetrySpec,
    timeout: float | None,
    coalescer: CreateCoalescer | None = None,
) -> ServerRef:
    """With a ``coalescer``, the create joins a batch of identical configs (one call
    for all); alone in its window it makes its own call, as without one."""
    key = str(item["key"])
    ref_box: list[ServerRef] = []
    # A create whose attempt timed out is not abandoned: the call may still reach the
    # provider after a lookup found nothing, and UpCloud has no idempotency token. Before
    # the next attempt its outcome is awaited (``settle``); a server it made is adopted.
    inflight: asyncio.Future[ServerRef] | None = None
    landed: list[ServerRef] = []

    async def settle() -> None:
        nonlocal inflight
        if inflight is not None:
            with contextlib.suppress(Exception):
                # A hung call ends by the client's own HTTP timeout; this bounds the rest.
                landed.append(await asyncio.wait_for(asyncio.shield(inflight), SETTLE_TIMEOUT))
            inflight = None

    async def coalesced(n: int, coalescer: CreateCoalescer) -> ServerRef | None:
        """Through a shared call; None when alone in the window (the caller creates)."""
        nonlocal inflight
        while True:
            try:
                seat = await coalescer.join(spec, key)
            except BatchAbandoned:
                continue  # sealed and abandoned before this member stored anything
            if seat is None:
                return None
            try:
                await _store_intent(item, "create", n, host, where=seat.intent)
            except BaseException:
                seat.withdraw()
                raise
            member = seat.ready()
            if timeout is not None:
                inflight = member  # shared: a timed-out member adopts it in settle()
            try:
                return await asyncio.shield(member)
            except BatchAbandoned:
                inflight = None  # never launched: nothing can exist for that intent
                continue

    async def attempt(n: int) -> None:
        nonlocal inflight
        ref: ServerRef | None = landed.pop() if landed else None
        if ref is None and item.get("intent") is not None:
            async with host.permit():
                # By key, or by batch and index if the last intent was a coalesced create.
                ref = await _find_own(item, provider, spec)
        if ref is None and coalescer is not None:
            ref = await coalesced(n, coalescer)
            if ref is not None:
                inflight = None
                crash_point("after_call", "create")
        if ref is None:
            await _store_intent(item, "create", n, host)
            async with host.permit():
                if timeout is None:
                    ref = await provider.create_server(spec, key)  # nothing cuts it short
                else:
                    inflight = asyncio.ensure_future(provider.create_server(spec, key))
                    ref = await asyncio.shield(inflight)
            inflight = None
            crash_point("after_call", "create")
        ref = await provider.wait_ready(ref, timeout)
        ref_box.append(ref)

    await with_retries(item, host, retry, timeout, attempt, settle)
    ref = ref_box[-1]
    _mark_done(item, ItemState.COMPLETED, ref.to_dict())
    await host.persist(item)
    return ref


def taskserv_env(server: ServerRef, taskserv: str) -> dict[str, str]:
    return {
        "ROOT": server.extra.get("root", ""),
        "SERVER_NAME": server.name,
        "TASKSERV": taskserv,
    }


async def _script(
    transport: Transport, server: ServerRef, step: str, script: str, env: dict[str, str]
) -> int:
    result = await transport.run(server, script, env)
    if result.exit_code != 0 and step != "check":
        raise ScriptError(step, result.exit_code, result.stderr_tail())
    return result.exit_code


async def install_taskserv_item(
    item: Doc,
    taskserv: TaskservSpec,
    server: ServerRef,
    transport: Transport,
    host: ItemHost,
    retry: RetrySpec,
    timeout: float | None,
) -> None:
    env = taskserv_env(server, taskserv.name)

    async def attempt(n: int) -> None:
        if await _script(transport, server, "check", taskserv.check, env) == 0:
            # Installed before this workflow ever applied it: not ours to uninstall.
            if item.get("intent") is None:
                item["adopted"] = True
            return
        await _store_intent(item, "apply", n, host)
        await _script(transport, server, "apply", taskserv.apply, env)
        crash_point("after_call", "apply")
        await _script(transport, server, "verify", taskserv.verify, env)

    await with_retries(item, host, retry, timeout, attempt)
    _mark_done(item, ItemState.COMPLETED)
    await host.persist(item)


async def delete_server_item(
    item: Doc,
    provider: Provider,
    host: ItemHost,
    retry: RetrySpec,
    timeout: float | None,
    spec: ServerConfigSpec | None = None,
) -> None:
    """Undo a server this workflow created. Adopted servers are never deleted. A
    coalesced member without a result is looked up by batch and index (``spec``, when
    given, narrows the search to its zone)."""

    async def attempt(n: int) -> None:
        ref = ServerRef.from_dict(item["result"]) if item.get("result") else None
        if ref is None:
            async with host.permit():
                ref = await _find_own(item, provider, spec)
        await _store_intent(item, "delete", n, host, running=False, where=_batch_identity(item))
        if ref is not None:
            async with host.permit():
                await provider.delete_server(ref)
            crash_point("after_call", "delete")

    await with_retries(item, host, retry, timeout, attempt)
    _mark_done(item, ItemState.ROLLED_BACK)
    await host.persist(item)


async def uninstall_taskserv_item(
    item: Doc,
    taskserv: TaskservSpec,
    server: ServerRef,
    transport: Transport,
    host: ItemHost,
    retry: RetrySpec,
    timeout: float | None,
) -> None:
    env = taskserv_env(server, taskserv.name)

    async def attempt(n: int) -> None:
        await _store_intent(item, "uninstall", n, host, running=False)
        await _script(transport, server, "uninstall", taskserv.uninstall, env)
        crash_point("after_call", "uninstall")

    await with_retries(item, host, retry, timeout, attempt)
    _mark_done(item, ItemState.ROLLED_BACK)
    await host.persist(item)


@contextlib.asynccontextmanager
async def no_permit() -> AsyncIterator[None]:
    yield
