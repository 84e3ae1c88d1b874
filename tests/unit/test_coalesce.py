"""Coalesced creates (runtime.coalesce) through the real OperationRunner and lifecycle,
with a fake batching provider at the Provider interface: no Ray, no network.

The fake behaves like EC2 without member tags: a server made by ``create_batch`` carries
only its batch id and launch index, so ``find_server(key)`` does NOT find it. A
reconcile that looked a coalesced member up by key would create it a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from runtime.coalesce import BatchAbandoned, CreateCoalescer, config_shape
from runtime.engine import ROLLBACK, OperationRunner, RunnerContext
from runtime.errors import PermanentError, StoreError, ThrottledError, TransientError
from runtime.planner import Plan, build_plan
from runtime.providers.base import Provider, ServerRef
from runtime.records import idempotency_key, new_item_doc
from runtime.states import ItemState, OpState
from schemas.loader import workflow_from_data
from schemas.models import ServerConfigSpec
from tests.unit.test_engine import FakeHost

Doc = dict[str, Any]
FAST = {"attempts": 3, "initial_backoff": 0, "max_backoff": 0}


# ---- fakes -------------------------------------------------------------------------


class Host(FakeHost):
    """FakeHost that can fail chosen persists."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_intent_of: set[str] = set()  # item names whose next create intent fails

    async def persist(self, item: Doc) -> None:
        intent = item.get("intent") or {}
        if item["name"] in self.fail_intent_of and intent.get("action") == "create":
            self.fail_intent_of.discard(item["name"])
            raise StoreError("disk full")
        await super().persist(item)


@dataclass
class Server:
    id: str
    name: str
    key_tag: str | None  # only servers made one by one carry their key
    batch: str | None = None
    index: int | None = None


class BatchingProvider(Provider):
    name = "fake"

    def __init__(
        self,
        host: Host,
        max_batch: int = 50,
        *,
        batch_errors: list[Exception] | None = None,
        lose_batch_reply: int = 0,
        delay: float = 0.0,
    ) -> None:
        self.host = host
        self.max_batch = max_batch
        self.batch_errors = list(batch_errors or [])
        self.lose_batch_reply = lose_batch_reply  # this many batch calls create, then fail
        self.delay = delay
        self.cloud: dict[str, Server] = {}
        self.batches: list[tuple[str, list[str]]] = []  # (batch id, item names), per call
        self.singles: list[str] = []  # item names created one by one
        self.lookups: list[tuple[str, int]] = []
        self.violations: list[str] = []
        self._n = 0

    def _new(self, name: str, key: str | None, batch: str | None, index: int | None) -> Server:
        self._n += 1
        server = Server(f"id-{self._n}", name, key, batch, index)
        self.cloud[server.id] = server
        return server

    def _ref(self, server: Server, key: str, name: str | None = None) -> ServerRef:
        return ServerRef(provider="fake", id=server.id, name=name or server.name, key=key)

    async def create_server(self, spec: ServerConfigSpec, key: str) -> ServerRef:
        intent = (self.host.last(key) or {}).get("intent") or {}
        if intent.get("action") != "create" or "batch" in intent:
            self.violations.append(f"{spec.name}: single create without its own intent")
        self.singles.append(spec.name)
        return self._ref(self._new(spec.name, key, None, None), key)

    async def create_batch(
        self, specs: list[ServerConfigSpec], keys: list[str], batch: str
    ) -> list[ServerRef]:
        self.batches.append((batch, [s.name for s in specs]))
        if len({config_shape(s) for s in specs}) != 1:
            self.violations.append(f"{batch}: mixed configs {[s.name for s in specs]}")
        for i, (spec, key) in enumerate(zip(specs, keys, strict=True)):
            intent = (self.host.last(key) or {}).get("intent") or {}
            if (intent.get("action"), intent.get("batch"), intent.get("index")) != (
                "create",
                batch,
                i,
            ):
                self.violations.append(f"{spec.name}: in {batch} without a durable intent")
        await asyncio.sleep(self.delay)
        if self.batch_errors:
            raise self.batch_errors.pop(0)
        made = [self._new(s.name, None, batch, i) for i, s in enumerate(specs)]
        if self.lose_batch_reply:
            self.lose_batch_reply -= 1
            raise TransientError("connection reset after the instances were launched")
        return [self._ref(m, k) for m, k in zip(made, keys, strict=True)]

    async def find_server(self, key: str) -> ServerRef | None:
        found = [s for s in self.cloud.values() if s.key_tag == key]
        return self._ref(found[0], key) if found else None

    async def find_batch_member(
        self, batch: str, index: int, key: str, spec: ServerConfigSpec | None = None
    ) -> ServerRef | None:
        self.lookups.append((batch, index))
        found = [s for s in self.cloud.values() if (s.batch, s.index) == (batch, index)]
        return self._ref(found[0], key, spec.name if spec else None) if found else None

    async def wait_ready(self, ref: ServerRef, timeout: float | None = None) -> ServerRef:
        return replace(ref, state="running")

    async def delete_server(self, ref: ServerRef) -> None:
        self.cloud.pop(ref.id, None)

    def per_item(self) -> Counter[str]:
        """Servers per item name: what 'exactly one per item' is checked against."""
        return Counter(s.name for s in self.cloud.values())


# ---- helpers -------------------------------------------------------------------------


def plan_of(configs: list[Doc], **op: Any) -> Plan:
    spec = workflow_from_data(
        {
            "name": "t",
            "operations": [
                {
                    "id": "srv",
                    "type": "server_batch",
                    "provider": "aws",
                    "retry": FAST,
                    "server_configs": configs,
                    **op,
                }
            ],
        }
    )
    return build_plan(spec, {})


def same(n: int, **fields: Any) -> list[Doc]:
    return [{"name": f"s{i:02d}", "plan": "p", "zone": "z", **fields} for i in range(n)]


def runner_for(
    plan: Plan,
    host: Host,
    provider: Provider,
    *,
    capacity: int = 100,
    items: dict[str, Doc] | None = None,
    mode: str = "forward",
) -> tuple[OperationRunner, dict[str, Doc]]:
    if items is None:
        items = {
            i.name: new_item_doc("srv", i.name, i.kind, idempotency_key("wf", "srv", i.name))
            for i in plan.operations["srv"].items
        }
    ctx = RunnerContext(provider=provider)
    runner = OperationRunner(plan.operations["srv"], items, host, ctx, capacity=capacity, mode=mode)
    return runner, items


def assert_one_server_per_item(provider: BatchingProvider, items: dict[str, Doc]) -> None:
    assert provider.per_item() == Counter(dict.fromkeys(items, 1))
    completed = {n: d for n, d in items.items() if d["status"] == ItemState.COMPLETED.value}
    ids = [d["result"]["id"] for d in completed.values()]
    assert len(set(ids)) == len(ids)
    for name, doc in completed.items():
        assert provider.cloud[doc["result"]["id"]].name == name


class PermitHost:
    def __init__(self) -> None:
        self.permits = 0

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        self.permits += 1
        yield


def spec(name: str, **fields: Any) -> ServerConfigSpec:
    return ServerConfigSpec.model_validate({"name": name, "plan": "p", "zone": "z", **fields})


# ---- grouping, windows, sizes ----------------------------------------------------------


async def test_identical_configs_share_one_call_and_each_item_gets_its_own_server() -> None:
    host = Host()
    provider = BatchingProvider(host)
    runner, items = runner_for(plan_of(same(20)), host, provider)

    outcome = await runner.run()

    assert outcome.status is OpState.COMPLETED, outcome
    assert len(provider.batches) == 1 and not provider.singles
    assert sorted(provider.batches[0][1]) == sorted(items)
    assert provider.violations == []
    assert_one_server_per_item(provider, items)
    intents = [d["intent"] for d in items.values()]
    assert {i["batch"] for i in intents} == {provider.batches[0][0]}
    assert sorted(i["index"] for i in intents) == list(range(20))
    assert host.permits == 1  # one provider-pool permit for the one call
    assert outcome.coalescing == {
        "coalesced_items": 20,
        "batch_calls": 1,
        "single_calls": 0,
        "abandoned_batches": 0,
        "largest_batch": 20,
        "calls_saved": 19,
    }


async def test_max_batch_splits_and_a_lone_item_makes_its_own_keyed_call() -> None:
    host = Host()
    provider = BatchingProvider(host, max_batch=3)
    runner, items = runner_for(plan_of(same(7)), host, provider)

    outcome = await runner.run()

    assert outcome.status is OpState.COMPLETED
    assert sorted(len(names) for _, names in provider.batches) == [3, 3]
    assert len(provider.singles) == 1
    lone = items[provider.singles[0]]
    assert "batch" not in lone["intent"]  # reconciled by key, like any single create
    assert provider.cloud[lone["result"]["id"]].key_tag == lone["key"]
    assert provider.violations == []
    assert_one_server_per_item(provider, items)
    assert outcome.coalescing is not None and outcome.coalescing["calls_saved"] == 4


async def test_only_configs_identical_but_for_the_name_are_batched() -> None:
    configs = [
        *same(3),  # s00..s02: the base shape
        {"name": "plan", "plan": "q", "zone": "z"},
        {"name": "zone", "plan": "p", "zone": "y"},
        {"name": "image", "plan": "p", "zone": "z", "image": "ami-12345678"},
        {"name": "userdata", "plan": "p", "zone": "z", "user_data": "#!/bin/sh"},
        {"name": "labels", "plan": "p", "zone": "z", "labels": {"team": "a"}},
        {"name": "labels2", "plan": "p", "zone": "z", "labels": {"team": "a"}},
    ]
    host = Host()
    provider = BatchingProvider(host)
    runner, items = runner_for(plan_of(configs), host, provider)

    assert (await runner.run()).status is OpState.COMPLETED

    assert sorted(sorted(names) for _, names in provider.batches) == [
        ["labels", "labels2"],
        ["s00", "s01", "s02"],
    ]
    assert sorted(provider.singles) == ["image", "plan", "userdata", "zone"]
    assert provider.violations == []
    assert_one_server_per_item(provider, items)


async def test_window_groups_joins_close_together_and_seals_after_it() -> None:
    host = PermitHost()
    provider = BatchingProvider(Host())
    coalescer = CreateCoalescer(provider, host, window=0.05)

    async def joined(name: str, after: float) -> tuple[str, str | None]:
        await asyncio.sleep(after)
        seat = await coalescer.join(spec(name), f"k-{name}")
        return name, None if seat is None else seat.batch_id

    seats = dict(
        await asyncio.gather(
            joined("a", 0), joined("b", 0.01), joined("c", 0.02), joined("late", 0.2)
        )
    )

    assert seats["a"] is not None and seats["a"] == seats["b"] == seats["c"]
    assert seats["late"] is None  # its own window: alone, the per-item call
    assert coalescer.stats.alone == 1


async def test_a_full_batch_seals_at_once_without_waiting_for_the_window() -> None:
    provider = BatchingProvider(Host(), max_batch=4)
    coalescer = CreateCoalescer(provider, PermitHost(), window=30.0)
    seats = await asyncio.wait_for(
        asyncio.gather(*(coalescer.join(spec(f"s{i}"), f"k{i}") for i in range(4))), 2
    )
    assert [s.index for s in seats if s is not None] == [0, 1, 2, 3]
    assert len({s.batch_id for s in seats if s is not None}) == 1


# ---- failures --------------------------------------------------------------------------


async def test_failed_batch_call_is_retried_per_item_without_duplicates() -> None:
    host = Host()
    provider = BatchingProvider(host, batch_errors=[TransientError("503")])
    runner, items = runner_for(plan_of(same(6)), host, provider)

    assert (await runner.run()).status is OpState.COMPLETED

    first, second = provider.batches
    assert sorted(first[1]) == sorted(second[1]) == sorted(items)
    # Each item looked its own (batch, index) up before creating again: nothing there.
    assert sorted(provider.lookups) == sorted((first[0], i) for i in range(6))
    assert {d["attempt"] for d in items.values()} == {2}
    assert {d["intent"]["batch"] for d in items.values()} == {second[0]}
    assert provider.violations == []
    assert_one_server_per_item(provider, items)


async def test_lost_reply_after_the_batch_is_adopted_per_item() -> None:
    host = Host()
    provider = BatchingProvider(host, lose_batch_reply=1)
    runner, items = runner_for(plan_of(same(8)), host, provider)

    assert (await runner.run()).status is OpState.COMPLETED

    assert len(provider.batches) == 1  # nothing launched twice
    batch = provider.batches[0][0]
    for doc in items.values():
        made = provider.cloud[doc["result"]["id"]]
        assert (made.batch, made.index) == (batch, doc["intent"]["index"])
    assert_one_server_per_item(provider, items)


async def test_permanent_batch_error_fails_every_member_once() -> None:
    host = Host()
    provider = BatchingProvider(host, batch_errors=[PermanentError("InvalidAMIID")])
    runner, items = runner_for(plan_of(same(5)), host, provider)

    outcome = await runner.run()

    assert outcome.status is OpState.FAILED
    assert len(provider.batches) == 1 and not provider.cloud
    for doc in items.values():
        assert doc["status"] == ItemState.FAILED.value and doc["attempt"] == 1
        assert (
            doc["error"]["class"] == "PermanentError" and "InvalidAMIID" in doc["error"]["message"]
        )


async def test_throttled_batch_is_reported_and_retried() -> None:
    host = Host()
    provider = BatchingProvider(host, batch_errors=[ThrottledError(retry_after=0)])
    runner, items = runner_for(plan_of(same(4)), host, provider)

    assert (await runner.run()).status is OpState.COMPLETED
    assert host.throttled == [0, 0, 0, 0] and len(provider.batches) == 2
    assert_one_server_per_item(provider, items)


async def test_member_failing_to_store_its_intent_abandons_the_batch_before_launch() -> None:
    host = Host()
    host.fail_intent_of = {"s02"}
    provider = BatchingProvider(host)
    runner, items = runner_for(plan_of(same(5)), host, provider)

    outcome = await runner.run()

    # The abandoned batch was never launched; the others joined a new one at once.
    assert len(provider.batches) == 1 and sorted(provider.batches[0][1]) == [
        "s00",
        "s01",
        "s03",
        "s04",
    ]
    assert items["s02"]["status"] == ItemState.FAILED.value  # StoreError is not retried
    others = {n: d for n, d in items.items() if n != "s02"}
    assert {d["status"] for d in others.values()} == {ItemState.COMPLETED.value}
    assert {d["attempt"] for d in others.values()} == {1}  # no attempt spent on it
    assert outcome.coalescing is not None and outcome.coalescing["abandoned_batches"] == 1
    assert provider.violations == []
    assert provider.per_item() == Counter(dict.fromkeys(others, 1))


async def test_cancelled_before_the_seal_leaves_the_batch_after_it_abandons() -> None:
    provider = BatchingProvider(Host())
    coalescer = CreateCoalescer(provider, PermitHost(), window=0.05)

    # Before the seal: the member just leaves; the others form the batch.
    early = [asyncio.create_task(coalescer.join(spec(f"e{i}"), f"ke{i}")) for i in range(3)]
    await asyncio.sleep(0.01)
    early[1].cancel()
    done = await asyncio.gather(*early, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    seat_a, seat_c = done[0], done[2]
    assert not isinstance(seat_a, BaseException) and not isinstance(seat_c, BaseException)
    assert seat_a is not None and seat_c is not None
    assert (seat_a.size, seat_a.index, seat_c.index) == (2, 0, 1)

    # After the seal, before every intent is durable: the batch is abandoned.
    first = seat_a.ready()
    seat_c.withdraw()
    with pytest.raises(BatchAbandoned):
        await first
    assert provider.batches == [] and coalescer.stats.abandoned == 1

    # A launched batch is not abandoned by a late withdrawal: its call is made.
    seats = await asyncio.gather(*(coalescer.join(spec(f"l{i}"), f"kl{i}") for i in range(2)))
    assert all(s is not None for s in seats)
    futures = [s.ready() for s in seats if s is not None]
    for s in seats:
        assert s is not None
        s.withdraw()
    refs = await asyncio.gather(*futures)
    assert [r.key for r in refs] == ["kl0", "kl1"] and len(provider.batches) == 1


async def test_timed_out_member_adopts_the_shared_call_when_it_lands() -> None:
    host = Host()
    provider = BatchingProvider(host, delay=0.3)
    runner, items = runner_for(plan_of(same(4), timeout=0.15), host, provider)

    assert (await runner.run()).status is OpState.COMPLETED

    # Every attempt timed out in the 0.3 s call; the retry waited for it (settle) and
    # adopted its result: no lookup, no second launch.
    assert len(provider.batches) == 1 and not provider.singles and not provider.lookups
    assert_one_server_per_item(provider, items)


# ---- resume and rollback ---------------------------------------------------------------


def stored(plan: Plan, intents: dict[str, Doc | None]) -> dict[str, Doc]:
    """Item documents as a crash left them: Running with the given intents."""
    docs = {}
    for item in plan.operations["srv"].items:
        doc = new_item_doc("srv", item.name, item.kind, idempotency_key("wf", "srv", item.name))
        intent = intents.get(item.name)
        if intent is not None:
            doc.update(status="Running", attempt=1, intent={"action": "create", **intent})
        docs[item.name] = doc
    return docs


async def test_resume_after_a_crash_reconciles_each_member_by_batch_and_index() -> None:
    plan = plan_of(same(6))
    host = Host()
    provider = BatchingProvider(host)
    # Crash after the shared call: s00..s03 were launched as pb-old, nothing stored.
    launched = {f"s{i:02d}": provider._new(f"s{i:02d}", None, "pb-old", i) for i in range(4)}
    # Crash after the intents of another batch, before its call: nothing launched.
    intents: dict[str, Doc | None] = {
        n: {"batch": "pb-old", "index": i} for i, n in enumerate(launched)
    }
    intents.update(
        {"s04": {"batch": "pb-never", "index": 0}, "s05": {"batch": "pb-never", "index": 1}}
    )
    runner, items = runner_for(plan, host, provider, items=stored(plan, intents))

    assert (await runner.run()).status is OpState.COMPLETED

    for name, server in launched.items():
        assert items[name]["result"]["id"] == server.id  # adopted, not made again
    assert [sorted(names) for _, names in provider.batches] == [["s04", "s05"]]
    assert_one_server_per_item(provider, items)


async def test_rollback_deletes_members_that_have_no_result_by_batch_and_index() -> None:
    host = Host()
    provider = BatchingProvider(host, lose_batch_reply=1)
    plan = plan_of(same(5), retry={"attempts": 1})
    runner, items = runner_for(plan, host, provider)

    assert (await runner.run()).status is OpState.FAILED  # the lost reply, no retry
    assert len(provider.cloud) == 5 and not any(d["result"] for d in items.values())

    back, _ = runner_for(plan, host, provider, items=items, mode=ROLLBACK)
    assert (await back.run()).status is OpState.ROLLED_BACK
    assert provider.cloud == {}
    assert {d["status"] for d in items.values()} == {ItemState.ROLLED_BACK.value}
    # The delete intents kept the batch identity, so a resumed rollback finds them too.
    assert all("batch" in d["intent"] for d in items.values())


async def test_a_provider_without_batches_gets_no_coalescer() -> None:
    host = Host()
    provider = BatchingProvider(host, max_batch=1)
    runner, items = runner_for(plan_of(same(4)), host, provider)
    assert runner.coalescer is None
    outcome = await runner.run()
    assert outcome.coalescing is None and outcome.status is OpState.COMPLETED
    assert len(provider.singles) == 4 and not provider.batches
    assert all("batch" not in d["intent"] for d in items.values())
