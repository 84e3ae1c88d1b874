"""OperationRunner and GroupCommitter driven by fakes at the Provider, Transport and
ItemHost interfaces: no Ray, no network, no sleeping beyond a few milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from runtime.engine import (
    AdjustableLimiter,
    OperationRunner,
    RunnerContext,
)
from runtime.errors import PermanentError, ThrottledError, TransientError
from runtime.groupcommit import GroupCommitter
from runtime.planner import Plan, build_plan
from runtime.providers.base import Provider, ServerRef
from runtime.records import idempotency_key, new_item_doc
from runtime.states import ItemState, OpState
from runtime.transports.base import ScriptResult, Transport
from schemas.loader import workflow_from_data
from schemas.models import ServerConfigSpec, TaskservSpec

Doc = dict[str, Any]
FAST = {"attempts": 3, "initial_backoff": 0, "max_backoff": 0}

# A synthetic catalog: a <- b <- c (each requires the previous). Scripts are tagged
# with their step so the fake transport knows which one it runs.
CATALOG = {
    name: TaskservSpec(
        name=name,
        requires=requires,
        check=f"check {name}",
        apply=f"apply {name}",
        verify=f"verify {name}",
        uninstall=f"uninstall {name}",
    )
    for name, requires in (("a", ()), ("b", ("a",)), ("c", ("b",)))
}


# ---- fakes -------------------------------------------------------------------------


class FakeHost:
    """ItemHost: ``persist`` records a copy of every document, in order."""

    def __init__(self) -> None:
        self.log: list[Doc] = []
        self.throttled: list[float | None] = []
        self.permits = 0

    async def persist(self, item: Doc) -> None:
        self.log.append(copy.deepcopy(item))
        await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        self.permits += 1
        yield

    def on_throttled(self, retry_after: float | None) -> None:
        self.throttled.append(retry_after)

    def last(self, key: str) -> Doc | None:
        for doc in reversed(self.log):
            if doc["key"] == key:
                return doc
        return None


class FakeProvider(Provider):
    name = "local"

    def __init__(
        self,
        host: FakeHost,
        *,
        errors: dict[str, list[Exception]] | None = None,
        lose_reply: set[str] | None = None,
        delay: float = 0.0,
        slow_first: dict[str, float] | None = None,
    ) -> None:
        self.host = host
        self.errors = {k: list(v) for k, v in (errors or {}).items()}
        self.lose_reply = set(lose_reply or ())
        self.delay = delay
        self.slow_first = dict(slow_first or {})
        self.servers: dict[str, ServerRef] = {}  # key -> server, what the "cloud" holds
        self.create_calls: list[str] = []  # server names, one per call
        self.find_calls: list[str] = []  # keys
        self.violations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        self.create_calls.append(spec.name)
        doc = self.host.last(key)
        if (
            doc is None
            or doc["status"] != ItemState.RUNNING.value
            or (doc.get("intent") or {}).get("action") != "create"
        ):
            self.violations.append(f"{spec.name}: create_server before its intent was persisted")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.slow_first.pop(spec.name, self.delay))
            queued = self.errors.get(spec.name)
            if queued:
                raise queued.pop(0)
            ref = ServerRef(provider="local", id=f"id-{spec.name}", name=spec.name, key=key)
            self.servers[key] = ref
            if spec.name in self.lose_reply:
                self.lose_reply.discard(spec.name)
                raise TransientError("connection reset after the server was created")
            return ref
        finally:
            self.in_flight -= 1

    async def find_server(self, key: str) -> ServerRef | None:
        self.find_calls.append(key)
        return self.servers.get(key)

    async def wait_ready(self, ref: ServerRef, timeout: float | None = None) -> ServerRef:
        return replace(ref, state="started", private_ip="10.0.0.1")

    async def delete_server(self, ref: ServerRef) -> None:
        self.servers.pop(ref.key, None)


class FakeTransport(Transport):
    def __init__(
        self,
        host: FakeHost,
        *,
        fail_apply: set[tuple[str, str]] | None = None,
        installed: set[tuple[str, str]] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.host = host
        self.fail_apply = set(fail_apply or ())
        self.installed = set(installed or ())
        self.delay = delay
        self.calls: list[tuple[str, str, str]] = []  # (server, taskserv, step)
        self.violations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def run(
        self, server: ServerRef, script: str, env: dict[str, str], timeout: float | None = None
    ) -> ScriptResult:
        step, name = script.split()
        assert env["TASKSERV"] == name
        assert env["SERVER_NAME"] == server.name
        self.calls.append((server.name, name, step))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if step == "check":
                return ScriptResult(0 if (server.name, name) in self.installed else 1, "", "")
            if step == "apply":
                doc = self.host.last(f"key-{server.name}/{name}")
                if doc is None or (doc.get("intent") or {}).get("action") != "apply":
                    self.violations.append(f"{server.name}/{name}: apply before intent")
                if (server.name, name) in self.fail_apply:
                    return ScriptResult(3, "", f"{name} exploded on {server.name}\n")
                self.installed.add((server.name, name))
            return ScriptResult(0, "", "")
        finally:
            self.in_flight -= 1


# ---- helpers -------------------------------------------------------------------------


def server_plan(n: int, **op_fields: Any) -> Plan:
    op = {
        "id": "srv",
        "type": "server_batch",
        "provider": "local",
        "retry": FAST,
        "server_configs": [{"name": f"s{i}", "plan": "p", "zone": "z"} for i in range(1, n + 1)],
        **op_fields,
    }
    spec = workflow_from_data({"name": "t", "operations": [op]})
    return build_plan(spec, CATALOG)


def taskserv_plan(servers: list[str], taskservs: list[str], **op_fields: Any) -> Plan:
    spec = workflow_from_data(
        {
            "name": "t",
            "operations": [
                {
                    "id": "srv",
                    "type": "server_batch",
                    "provider": "local",
                    "server_configs": [{"name": s, "plan": "p", "zone": "z"} for s in servers],
                },
                {
                    "id": "ts",
                    "type": "taskserv_batch",
                    "dependencies": ["srv"],
                    "taskservs": taskservs,
                    "retry": FAST,
                    **op_fields,
                },
            ],
        }
    )
    return build_plan(spec, CATALOG)


def items_for(plan: Plan, op_id: str, *, by_key: bool = False) -> dict[str, Doc]:
    docs = {}
    for item in plan.operations[op_id].items:
        doc = new_item_doc(op_id, item.name, item.kind, idempotency_key("wf-1", op_id, item.name))
        if by_key:
            doc["key"] = f"key-{item.name}"
        docs[item.name] = doc
    return docs


def server_runner(
    plan: Plan, host: FakeHost, provider: FakeProvider, capacity: int = 10
) -> tuple[OperationRunner, dict[str, Doc]]:
    items = items_for(plan, "srv")
    runner = OperationRunner(
        plan.operations["srv"], items, host, RunnerContext(provider=provider), capacity=capacity
    )
    return runner, items


def taskserv_runner(
    plan: Plan,
    host: FakeHost,
    transport: FakeTransport,
    servers: dict[str, ServerRef | None],
    capacity: int = 10,
) -> tuple[OperationRunner, dict[str, Doc]]:
    items = items_for(plan, "ts", by_key=True)
    ctx = RunnerContext(transports={"local": transport}, servers=servers, catalog=CATALOG)
    runner = OperationRunner(plan.operations["ts"], items, host, ctx, capacity=capacity)
    return runner, items


def ref(name: str) -> ServerRef:
    return ServerRef(provider="local", id=f"id-{name}", name=name, key=f"k-{name}")


def statuses(items: dict[str, Doc]) -> dict[str, str]:
    return {name: doc["status"] for name, doc in items.items()}


# ---- server items: intent, reconcile, retries ----------------------------------------


async def test_intent_is_persisted_before_create() -> None:
    host = FakeHost()
    provider = FakeProvider(host)
    plan = server_plan(3)
    runner, items = server_runner(plan, host, provider)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert sorted(provider.create_calls) == ["s1", "s2", "s3"]
    assert provider.violations == []
    for name, doc in items.items():
        history = [d for d in host.log if d["name"] == name]
        assert [d["status"] for d in history] == ["Running", "Completed"]
        assert history[0]["intent"]["action"] == "create"
        assert history[0]["intent"]["attempt"] == 1
        assert doc["status"] == "Completed"
        assert doc["result"]["id"] == f"id-{name}"
        assert doc["result"]["key"] == doc["key"]
        assert doc["result"]["state"] == "started"  # the wait_ready reference is kept


async def test_existing_intent_reconciles_instead_of_creating() -> None:
    host = FakeHost()
    provider = FakeProvider(host)
    plan = server_plan(2)
    runner, items = server_runner(plan, host, provider)
    # s1 crashed after its create reached the cloud; s2 crashed before it did
    for name in ("s1", "s2"):
        items[name].update(
            status="Running", attempt=1, intent={"action": "create", "attempt": 1, "at": 0}
        )
    s1_key = items["s1"]["key"]
    provider.servers[s1_key] = ServerRef("local", "id-existing", "s1", s1_key)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert sorted(provider.find_calls) == sorted([items["s1"]["key"], items["s2"]["key"]])
    assert provider.create_calls == ["s2"]  # s1 was found, not created again
    assert items["s1"]["result"]["id"] == "id-existing"
    assert items["s2"]["result"]["id"] == "id-s2"
    assert len(provider.servers) == 2


async def test_lost_reply_is_adopted_on_retry_not_duplicated() -> None:
    host = FakeHost()
    provider = FakeProvider(host, lose_reply={"s1"})
    runner, items = server_runner(server_plan(1), host, provider)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert provider.create_calls == ["s1"]
    assert provider.find_calls == [items["s1"]["key"]]
    assert len(provider.servers) == 1
    assert items["s1"]["status"] == "Completed"
    assert items["s1"]["result"]["id"] == "id-s1"


async def test_transient_errors_are_retried_and_counted() -> None:
    host = FakeHost()
    errors: dict[str, list[Exception]] = {"s1": [TransientError("503"), TransientError("503")]}
    provider = FakeProvider(host, errors=errors)
    runner, items = server_runner(server_plan(2), host, provider)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert provider.create_calls.count("s1") == 3
    assert provider.create_calls.count("s2") == 1
    assert items["s1"]["attempt"] == 3
    assert items["s2"]["attempt"] == 1
    attempts = [d["intent"]["attempt"] for d in host.log if d["name"] == "s1" and d["intent"]]
    assert attempts[:3] == [1, 2, 3]
    assert provider.violations == []


async def test_transient_errors_give_up_after_attempts() -> None:
    host = FakeHost()
    provider = FakeProvider(host, errors={"s1": [TransientError("503")] * 5})
    runner, items = server_runner(server_plan(1), host, provider)
    outcome = await runner.run()
    assert outcome.status is OpState.FAILED
    assert provider.create_calls == ["s1"] * FAST["attempts"]
    assert items["s1"]["status"] == "Failed"
    assert items["s1"]["error"]["class"] == "TransientError"
    assert outcome.error is not None and "s1" in outcome.error


async def test_permanent_error_is_not_retried() -> None:
    host = FakeHost()
    provider = FakeProvider(host, errors={"s1": [PermanentError("unknown zone")] * 5})
    runner, items = server_runner(server_plan(1), host, provider)
    outcome = await runner.run()
    assert outcome.status is OpState.FAILED
    assert provider.create_calls == ["s1"]
    assert items["s1"]["attempt"] == 1
    assert items["s1"]["error"] == {"class": "PermanentError", "message": "unknown zone"}
    assert host.log[-1]["status"] == "Failed"  # the failure is persisted
    assert "unknown zone" in (outcome.error or "")


async def test_throttle_is_reported_to_the_host_and_retried() -> None:
    host = FakeHost()
    provider = FakeProvider(host, errors={"s1": [ThrottledError(retry_after=0.0)]})
    runner, _items = server_runner(server_plan(1), host, provider)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert host.throttled == [0.0]
    assert provider.create_calls == ["s1", "s1"]


async def test_timeout_per_attempt_is_retried() -> None:
    host = FakeHost()
    # The first create outlives its attempt's timeout but still makes the server: the
    # retry waits for it and adopts it instead of creating a second one.
    provider = FakeProvider(host, slow_first={"s1": 0.3})
    runner, items = server_runner(server_plan(1, timeout=0.05), host, provider)
    outcome = await asyncio.wait_for(runner.run(), 3)
    assert outcome.status is OpState.COMPLETED
    assert provider.create_calls == ["s1"] and len(provider.servers) == 1
    assert items["s1"]["result"]["id"] == "id-s1"


async def test_finished_items_are_not_run_again() -> None:
    host = FakeHost()
    provider = FakeProvider(host)
    runner, items = server_runner(server_plan(3), host, provider)
    items["s1"].update(status="Completed", result=ref("s1").to_dict())
    items["s2"].update(status="Skipped")
    outcome = await runner.run()
    assert provider.create_calls == ["s3"]
    assert outcome.status is OpState.COMPLETED


# ---- failure budget ----------------------------------------------------------------


def _failing(host: FakeHost, *names: str) -> FakeProvider:
    return FakeProvider(host, errors={n: [PermanentError("bad plan")] for n in names})


@pytest.mark.parametrize("tolerance", [2, "34%", "40%"])
async def test_within_tolerance_completes(tolerance: int | str) -> None:
    host = FakeHost()
    provider = _failing(host, "s1", "s3")
    plan = server_plan(6, tolerated_failures=tolerance)
    runner, _items = server_runner(plan, host, provider, capacity=1)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert outcome.counts == {"Failed": 2, "Completed": 4}
    assert sorted(provider.create_calls) == [f"s{i}" for i in range(1, 7)]


@pytest.mark.parametrize("tolerance", [1, "20%", "33%"])
async def test_beyond_tolerance_fails_and_skips_the_rest(tolerance: int | str) -> None:
    host = FakeHost()
    provider = _failing(host, "s1", "s3")
    plan = server_plan(6, tolerated_failures=tolerance)
    runner, items = server_runner(plan, host, provider, capacity=1)
    outcome = await runner.run()
    assert outcome.status is OpState.FAILED
    assert provider.create_calls == ["s1", "s2", "s3"]  # nothing started after the 2nd failure
    assert statuses(items) == {
        "s1": "Failed",
        "s2": "Completed",
        "s3": "Failed",
        "s4": "Skipped",
        "s5": "Skipped",
        "s6": "Skipped",
    }
    assert "tolerated" in items["s4"]["error"]["message"]
    assert outcome.error is not None and "2 of 6" in outcome.error
    # the skipped items were persisted too
    assert {d["name"] for d in host.log if d["status"] == "Skipped"} == {"s4", "s5", "s6"}


async def test_zero_tolerance_is_the_default() -> None:
    host = FakeHost()
    provider = _failing(host, "s1")
    runner, items = server_runner(server_plan(3), host, provider, capacity=1)
    outcome = await runner.run()
    assert outcome.status is OpState.FAILED
    assert provider.create_calls == ["s1"]
    assert statuses(items) == {"s1": "Failed", "s2": "Skipped", "s3": "Skipped"}


# ---- taskserv chains -----------------------------------------------------------------


async def test_taskservs_run_in_requires_order_per_server() -> None:
    host = FakeHost()
    transport = FakeTransport(host)
    plan = taskserv_plan(["n1", "n2"], ["c", "a", "b"])
    runner, items = taskserv_runner(plan, host, transport, {"n1": ref("n1"), "n2": ref("n2")})
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    for server in ("n1", "n2"):
        applied = [t for s, t, step in transport.calls if s == server and step == "apply"]
        assert applied == ["a", "b", "c"]
    assert transport.violations == []
    assert set(statuses(items).values()) == {"Completed"}


async def test_already_installed_taskserv_is_adopted() -> None:
    host = FakeHost()
    transport = FakeTransport(host, installed={("n1", "a")})
    plan = taskserv_plan(["n1"], ["a", "b"])
    runner, items = taskserv_runner(plan, host, transport, {"n1": ref("n1")})
    await runner.run()
    assert ("n1", "a", "apply") not in transport.calls
    assert items["n1/a"]["adopted"] is True
    assert items["n1/a"]["status"] == "Completed"
    assert not items["n1/b"]["adopted"]


async def test_failing_taskserv_skips_the_rest_of_its_server_only() -> None:
    host = FakeHost()
    transport = FakeTransport(host, fail_apply={("n1", "b")})
    plan = taskserv_plan(["n1", "n2", "n3"], ["a", "b", "c"], tolerated_failures=1)
    runner, items = taskserv_runner(
        plan, host, transport, {n: ref(n) for n in ("n1", "n2", "n3")}, capacity=3
    )
    outcome = await runner.run()
    assert statuses(items) == {
        "n1/a": "Completed",
        "n1/b": "Failed",
        "n1/c": "Skipped",
        **{f"{n}/{t}": "Completed" for n in ("n2", "n3") for t in "abc"},
    }
    assert not [c for c in transport.calls if c[:2] == ("n1", "c")]
    assert "n1/b" in items["n1/c"]["error"]["message"]
    assert items["n1/b"]["error"]["class"] == "ScriptError"
    assert "exploded" in items["n1/b"]["error"]["message"]
    # a failing script is not retried
    assert transport.calls.count(("n1", "b", "apply")) == 1
    assert outcome.status is OpState.COMPLETED  # one failure, one tolerated


async def test_missing_target_server_skips_its_items() -> None:
    host = FakeHost()
    transport = FakeTransport(host)
    plan = taskserv_plan(["n1", "n2"], ["a", "b"])
    runner, items = taskserv_runner(plan, host, transport, {"n1": None, "n2": ref("n2")})
    outcome = await runner.run()
    assert items["n1/a"]["status"] == "Skipped"
    assert items["n1/b"]["status"] == "Skipped"
    assert "'n1'" in items["n1/a"]["error"]["message"]
    assert items["n2/a"]["status"] == items["n2/b"]["status"] == "Completed"
    assert {c[0] for c in transport.calls} == {"n2"}
    assert outcome.status is not OpState.FAILED


# ---- cancel and limits -------------------------------------------------------------


async def test_cancel_marks_unstarted_items_cancelled() -> None:
    host = FakeHost()
    provider = FakeProvider(host)
    provider.gate = asyncio.Event()
    runner, items = server_runner(server_plan(4), host, provider, capacity=1)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(provider.entered.wait(), 2)
    runner.cancel()
    provider.gate.set()
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.status is OpState.CANCELLED
    assert provider.create_calls == ["s1"]
    assert statuses(items) == {
        "s1": "Completed",  # in flight when cancelled: finished, not abandoned
        "s2": "Cancelled",
        "s3": "Cancelled",
        "s4": "Cancelled",
    }


async def test_cancel_stops_a_taskserv_chain_between_items() -> None:
    host = FakeHost()
    transport = FakeTransport(host)
    plan = taskserv_plan(["n1"], ["a", "b", "c"])
    runner, items = taskserv_runner(plan, host, transport, {"n1": ref("n1")})

    original = transport.run

    async def run_then_cancel(
        server: ServerRef, script: str, env: dict[str, str], timeout: float | None = None
    ) -> ScriptResult:
        result = await original(server, script, env, timeout)
        if script == "verify a":
            runner.cancel()
        return result

    transport.run = run_then_cancel  # type: ignore[method-assign]
    outcome = await runner.run()
    assert outcome.status is OpState.CANCELLED
    assert statuses(items) == {"n1/a": "Completed", "n1/b": "Cancelled", "n1/c": "Cancelled"}


@pytest.mark.parametrize("capacity", [1, 3, 7])
async def test_in_flight_never_exceeds_capacity(capacity: int) -> None:
    host = FakeHost()
    provider = FakeProvider(host, delay=0.005)
    runner, _items = server_runner(server_plan(20), host, provider, capacity=capacity)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert provider.max_in_flight <= capacity
    assert provider.max_in_flight == capacity  # the capacity is actually used
    assert outcome.max_in_flight <= capacity


async def test_taskserv_in_flight_counts_servers_not_items() -> None:
    host = FakeHost()
    transport = FakeTransport(host, delay=0.002)
    servers = [f"n{i}" for i in range(6)]
    plan = taskserv_plan(servers, ["a", "b", "c"])
    runner, _ = taskserv_runner(plan, host, transport, {n: ref(n) for n in servers}, capacity=2)
    outcome = await runner.run()
    assert outcome.status is OpState.COMPLETED
    assert transport.max_in_flight == 2


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_limiter_lowering_capacity_waits_for_drain() -> None:
    limiter = AdjustableLimiter(3)
    for _ in range(3):
        await limiter.acquire()
    lowering = asyncio.create_task(limiter.set_capacity(1))
    await _settle()
    assert not lowering.done()
    assert limiter.capacity == 1  # new acquirers see the lower limit at once
    await limiter.release()
    await _settle()
    assert not lowering.done()  # 2 still in use > 1
    await limiter.release()
    await asyncio.wait_for(lowering, 1)
    assert limiter.in_use == 1
    # at capacity: the next acquire waits until a release
    blocked = asyncio.create_task(limiter.acquire())
    await _settle()
    assert not blocked.done()
    await limiter.release()
    await asyncio.wait_for(blocked, 1)
    assert limiter.max_in_use == 3


async def test_limiter_raising_capacity_wakes_waiters() -> None:
    limiter = AdjustableLimiter(1)
    await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
    await _settle()
    assert not any(w.done() for w in waiters)
    await limiter.set_capacity(3)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert limiter.in_use == 3


async def test_limiter_zero_capacity_holds_everything() -> None:
    limiter = AdjustableLimiter(0)
    waiter = asyncio.create_task(limiter.acquire())
    await _settle()
    assert not waiter.done()
    await limiter.set_capacity(1)
    await asyncio.wait_for(waiter, 1)


# ---- GroupCommitter ----------------------------------------------------------------


class FakeSink:
    def __init__(self, *, delay: float = 0.0, fail_first: int = 0) -> None:
        self.calls: list[tuple[list[Doc], list[Doc]]] = []
        self.written: list[Doc] = []
        self.delay = delay
        self.fail_first = fail_first
        self.gate: asyncio.Event | None = None

    async def __call__(self, records: list[Doc], events: list[Doc]) -> None:
        self.calls.append((list(records), list(events)))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise OSError("disk full")
        self.written.extend(records)


async def test_many_concurrent_puts_few_sink_calls() -> None:
    sink = FakeSink(delay=0.002)
    gc = GroupCommitter(sink)

    async def put(i: int) -> None:
        record = {"i": i}
        await gc.put(record, {"event": i})
        assert record in sink.written  # durable before put returns

    await asyncio.gather(*(put(i) for i in range(300)))
    assert len(sink.calls) <= 3
    assert sorted(r["i"] for r in sink.written) == list(range(300))
    assert sorted(e["event"] for _, events in sink.calls for e in events) == list(range(300))
    assert gc.records_written == 300
    assert gc.batches == len(sink.calls)


async def test_puts_during_a_write_go_in_the_next_batch() -> None:
    sink = FakeSink()
    sink.gate = asyncio.Event()
    gc = GroupCommitter(sink)
    first = asyncio.create_task(gc.put({"i": 0}))
    await _settle()
    assert len(sink.calls) == 1
    rest = [asyncio.create_task(gc.put({"i": i})) for i in range(1, 51)]
    await _settle()
    assert not first.done()
    assert len(sink.calls) == 1  # one write at a time
    sink.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 2)
    assert [len(records) for records, _ in sink.calls] == [1, 50]


async def test_max_batch_splits_writes() -> None:
    sink = FakeSink()
    gc = GroupCommitter(sink, max_batch=10)
    await asyncio.gather(*(gc.put({"i": i}) for i in range(25)))
    assert [len(r) for r, _ in sink.calls] == [10, 10, 5]
    assert [r["i"] for r in sink.written] == list(range(25))


async def test_sink_error_fails_the_waiting_puts_and_recovers() -> None:
    sink = FakeSink(fail_first=1)
    gc = GroupCommitter(sink)
    results = await asyncio.gather(*(gc.put({"i": i}) for i in range(20)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results), results
    assert sink.written == []
    assert gc.records_written == 0
    await asyncio.wait_for(gc.put({"i": "after"}), 1)  # the committer still works
    assert sink.written == [{"i": "after"}]


async def test_sink_error_only_fails_its_own_batch() -> None:
    sink = FakeSink(fail_first=1)
    gc = GroupCommitter(sink, max_batch=5)
    results = await asyncio.gather(*(gc.put({"i": i}) for i in range(12)), return_exceptions=True)
    assert [isinstance(r, OSError) for r in results] == [True] * 5 + [False] * 7
    assert [r["i"] for r in sink.written] == list(range(5, 12))


async def test_drain_waits_for_queued_writes() -> None:
    sink = FakeSink(delay=0.01)
    gc = GroupCommitter(sink)
    tasks = [asyncio.create_task(gc.put({"i": i})) for i in range(5)]
    await asyncio.sleep(0)
    await gc.drain()
    assert len(sink.written) == 5
    await asyncio.gather(*tasks)
