"""The hostile inputs of tests/unit/test_api_hostile.py sent to the real service
(``provisioning up --sandbox``: Ray Serve's proxy, the replica's Nickel evaluator at the
service's own limits, the orchestrator): each is a problem document, none reaches the
orchestrator, and afterwards the service is healthy and runs a normal workflow."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import P, Service, local_workflow
from tests.unit.test_api_hostile import (
    BODY,
    CRASHED,
    Case,
    json_cases,
    ncl_workflow,
    nested,
    nickel,
    nickel_cases,
    refused,
    slow_legit,
    submit,
)

pytestmark = pytest.mark.e2e

# At the service's limits (10 s, 2 GiB) these take 5-15 s each: the unit tests, with a
# smaller memory limit, cover them.
SLOW = {"infinitely-recursive-record", "1M-element-array-in-an-unknown-field"}
ACCEPTED: list[str] = []  # ids of the workflows this module submitted on purpose


def workflow_count(service: Service) -> int:
    with service.http() as c:
        return int(c.get(f"{P}/stats").json()["workflows"])


@pytest.fixture(scope="module")
def before(service: Service) -> int:
    """How many workflows the orchestrator had before the first hostile input."""
    return workflow_count(service)


@pytest.fixture(scope="module")
def client(service: Service, before: int) -> Iterator[httpx.Client]:
    with service.http() as c:
        yield c


@pytest.mark.parametrize("case", [*json_cases(), *(p for p in nickel_cases() if p.id not in SLOW)])
def test_hostile_input_is_a_problem_document(client: httpx.Client, case: Case) -> None:
    refused(submit(client, case.request, auth={}), case)
    assert client.get("/v1/health").json() == {"status": "ok"}


def test_streamed_body_over_the_limit_is_413(client: httpx.Client) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"source": "#'
        for _ in range(48):  # 3 MiB
            sent += 64 << 10
            yield b"x" * (64 << 10)
        yield b'"}'

    resp = submit(client, {"content": chunks()}, auth={})
    assert "content-length" not in resp.request.headers  # sent chunked
    refused(resp, Case({}, 413, (rf"request body is more than \d+ bytes; the limit is {BODY}",)))
    assert client.get("/v1/health").json() == {"status": "ok"}


def test_a_crashing_evaluation_does_not_fail_the_others(service: Service, before: int) -> None:
    crash = nickel(ncl_workflow(f"junk = {nested(50_000, '[', ']')},"))
    ops = [f"h{uuid.uuid4().hex[:10]}" for _ in range(3)]

    def post(request: dict[str, Any]) -> httpx.Response:
        with service.http() as c:
            return submit(c, request, auth={})

    with ThreadPoolExecutor(4) as pool:
        legit = [pool.submit(post, nickel(slow_legit(op))) for op in ops[:2]]
        crashed = pool.submit(post, crash)
        legit.append(pool.submit(post, nickel(slow_legit(ops[2]))))
        refused(crashed.result(), Case({}, 422, CRASHED))
        for future in legit:
            resp = future.result()
            assert resp.status_code == 202, resp.text
            ACCEPTED.append(resp.json()["id"])
    for wid in ACCEPTED[-3:]:
        assert service.wait(wid, timeout=120)["status"] == "Completed"


def test_the_service_is_healthy_afterwards(service: Service, before: int) -> None:
    with service.http(token=None) as anon:
        assert anon.get("/v1/health").json() == {"status": "ok"}
    name = f"after-hostile-{uuid.uuid4().hex[:8]}"
    wf = local_workflow(name, name, 3)
    with service.http() as c:
        resp = c.post(f"{P}/submit", json={"workflow": wf})
        assert resp.status_code == 202, resp.text
        ACCEPTED.append(resp.json()["id"])
    doc = service.wait(ACCEPTED[-1], timeout=120)
    assert doc["status"] == "Completed"
    assert doc["operations"][0]["counts"] == {"Completed": 3}
    # Not one hostile input reached the orchestrator: only the workflows sent on purpose.
    assert workflow_count(service) == before + len(ACCEPTED)
