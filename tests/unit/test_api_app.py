"""The REST app against an in-memory backend: auth, input limits, the safe Nickel path,
problem documents, routing, pagination and the SSE stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import ApiLimits, create_app
from tests.unit.fake_backend import FakeBackend

REPO = Path(__file__).resolve().parents[2]
SEED = (REPO / "workflows" / "example_batch.ncl").read_text()
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
P = "/v1/workflows/batch"
LOCAL = {
    "name": "tiny",
    "operations": [
        {
            "id": "servers",
            "type": "server_batch",
            "provider": "local",
            "server_configs": [{"name": "s1", "plan": "local", "zone": "local"}],
        }
    ],
}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> Iterator[TestClient]:
    limits = ApiLimits(max_body_bytes=64 << 10, max_source_bytes=16 << 10, eval_timeout=3)
    with TestClient(create_app(backend, token=TOKEN, limits=limits)) as c:
        yield c


def is_problem(resp, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"]
    return body  # type: ignore[no-any-return]


def test_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}]
)
def test_every_workflow_route_needs_the_token(client: TestClient, headers: dict) -> None:  # type: ignore[type-arg]
    for method, path in [
        ("GET", P),
        ("GET", f"{P}/stats"),
        ("GET", f"{P}/wf-0123456789abcdef"),
        ("POST", f"{P}/submit"),
        ("POST", f"{P}/wf-0123456789abcdef/cancel"),
    ]:
        resp = client.request(method, path, headers=headers)
        is_problem(resp, 401)
        assert resp.headers["www-authenticate"] == "Bearer"


def test_submit_nickel_source_plans_and_reaches_the_backend(
    client: TestClient, backend: FakeBackend
) -> None:
    resp = client.post(
        f"{P}/submit", json={"source": SEED, "filename": "example_batch.ncl"}, headers=AUTH
    )
    assert resp.status_code == 202, resp.text
    wid = resp.json()["id"]
    assert backend.specs[wid]["name"] == resp.json()["name"]
    assert backend.specs[wid]["operations"][0]["id"] == "upcloud_servers"


def test_idempotency_key_returns_the_same_workflow(client: TestClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "k-1"}
    first = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=headers).json()
    again = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=headers).json()
    assert again["id"] == first["id"] and again["existing"] is True


def test_bad_nickel_is_422_with_nickels_message(client: TestClient, backend: FakeBackend) -> None:
    source = SEED.replace('provider = "upcloud"', 'provider = "digitalocean"', 1)
    body = is_problem(
        client.post(f"{P}/submit", json={"source": source, "filename": "x.ncl"}, headers=AUTH), 422
    )
    assert "x.ncl" in body["detail"] and "provider" in body["detail"]
    assert "\x1b[" not in body["detail"]
    assert "submit" not in backend.calls


@pytest.mark.parametrize(
    "source",
    [
        'import "/etc/passwd"',
        '{ batch_workflow = import "/etc/os-release" as \'Text }',
        'let x = import "../../../etc/passwd" in x',
    ],
)
def test_imports_outside_the_catalog_are_refused_without_leaking(
    client: TestClient, source: str
) -> None:
    resp = client.post(f"{P}/submit", json={"source": source}, headers=AUTH)
    body = is_problem(resp, 422)
    assert "import refused" in body["detail"]
    for secret in ("root:", "NAME=", "ID="):
        assert secret not in resp.text


def test_nickel_that_never_ends_is_stopped(client: TestClient) -> None:
    source = "let rec f = fun x => f (x + 1) in { batch_workflow = f 1 }"
    body = is_problem(client.post(f"{P}/submit", json={"source": source}, headers=AUTH), 422)
    assert "did not finish within 3 s" in body["detail"]
    # The evaluator recovers: the next submission works.
    ok = client.post(f"{P}/submit", json={"source": SEED}, headers=AUTH)
    assert ok.status_code == 202, ok.text


def test_oversized_body_and_source_are_413(client: TestClient) -> None:
    big = "#" + "x" * (70 << 10) + "\n" + SEED
    body = is_problem(client.post(f"{P}/submit", json={"source": big}, headers=AUTH), 413)
    assert "limit is 65536 bytes" in body["detail"]
    src = "#" + "x" * (20 << 10) + "\n" + SEED
    body = is_problem(client.post(f"{P}/submit", json={"source": src}, headers=AUTH), 413)
    assert "Nickel source" in body["detail"] and "16384" in body["detail"]


def test_operation_limit_is_422_and_says_the_limit(backend: FakeBackend) -> None:
    app = create_app(backend, token=TOKEN, limits=ApiLimits(max_operations=2, max_items=5))
    ops = [
        {
            **LOCAL["operations"][0],
            "id": f"op{i}",
            "server_configs": [{"name": f"s{i}", "plan": "local", "zone": "local"}],
        }
        for i in range(3)
    ]
    with TestClient(app) as c:
        body = is_problem(
            c.post(
                f"{P}/submit", json={"workflow": {"name": "w", "operations": ops}}, headers=AUTH
            ),
            422,
        )
        assert "the limit is 2" in body["detail"]
        many = [{"name": f"s{i}", "plan": "local", "zone": "local"} for i in range(6)]
        wf = {"name": "w", "operations": [{**LOCAL["operations"][0], "server_configs": many}]}
        body = is_problem(c.post(f"{P}/submit", json={"workflow": wf}, headers=AUTH), 422)
        assert "6 items; the limit is 5" in body["detail"]


@pytest.mark.parametrize(
    "body",
    [{}, {"source": "x", "workflow": {}}, {"workflow": "nope"}, {"source": 1}, [], {"extra": 1}],
)
def test_malformed_submit_bodies_are_problem_documents(client: TestClient, body: object) -> None:
    is_problem(client.post(f"{P}/submit", json=body, headers=AUTH), 422)


def test_unknown_and_malformed_ids_are_404(client: TestClient, backend: FakeBackend) -> None:
    for wid in ("wf-0123456789abcdef", "nope", "wf-XYZ"):
        body = is_problem(client.get(f"{P}/{wid}", headers=AUTH), 404)
        assert wid in body["detail"]
    assert "get" in backend.calls  # the well-formed one reached the backend
    is_problem(client.post(f"{P}/nope/rollback", headers=AUTH), 404)


def test_rollback_of_a_running_workflow_is_409(client: TestClient, backend: FakeBackend) -> None:
    wid = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=AUTH).json()["id"]
    backend.emit(wid, "workflow", status="Running")
    body = is_problem(client.post(f"{P}/{wid}/rollback", headers=AUTH), 409)
    assert "Running" in body["detail"]
    backend.emit(wid, "workflow", status="Completed")
    resp = client.post(f"{P}/{wid}/rollback", json={"operation": "servers"}, headers=AUTH)
    assert resp.status_code == 202


def test_stats_is_not_shadowed_by_the_id_route(client: TestClient) -> None:
    assert client.get(f"{P}/stats", headers=AUTH).json() == {"workflows": 0, "by_status": {}}


def test_list_pages_with_an_opaque_cursor_and_filters(
    client: TestClient, backend: FakeBackend
) -> None:
    ids = [
        client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=AUTH).json()["id"]
        for _ in range(5)
    ]
    backend.emit(ids[1], "workflow", status="Running")
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(P, params=params, headers=AUTH).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(ids)
    running = client.get(P, params={"status": "Running"}, headers=AUTH).json()["items"]
    assert [d["id"] for d in running] == [ids[1]]
    is_problem(client.get(P, params={"status": "Sleeping"}, headers=AUTH), 422)
    is_problem(client.get(P, params={"cursor": "garbage!"}, headers=AUTH), 422)
    is_problem(client.get(P, params={"limit": 0}, headers=AUTH), 422)


def read_stream(client: TestClient, wid: str, last: int | None = None) -> list[dict]:  # type: ignore[type-arg]
    headers = {**AUTH, "Accept": "text/event-stream"}
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    events, current = [], {}
    with client.stream("GET", f"{P}/{wid}/progress", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
                continue
            field, _, value = line.partition(": ")
            current[field] = value
    return events


def test_progress_stream_resumes_from_last_event_id(
    client: TestClient, backend: FakeBackend
) -> None:
    wid = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=AUTH).json()["id"]
    other = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=AUTH).json()["id"]
    backend.finish(other, items=2)
    backend.finish(wid, items=4)
    full = read_stream(client, wid)
    ids = [int(e["id"]) for e in full if "id" in e]
    assert len(ids) == 6 and ids == sorted(set(ids))  # this workflow's events only, in order
    assert full[-1]["event"] == "status" and json.loads(full[-1]["data"])["status"] == "Completed"
    tail = read_stream(client, wid, last=ids[2])
    assert [int(e["id"]) for e in tail if "id" in e] == ids[3:]


def test_progress_as_json_is_the_status_document(client: TestClient, backend: FakeBackend) -> None:
    wid = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=AUTH).json()["id"]
    backend.finish(wid, items=3)
    doc = client.get(f"{P}/{wid}/progress", headers=AUTH).json()
    assert doc["status"] == "Completed" and doc["progress"]["finished"] == 3
    is_problem(
        client.get(
            f"{P}/{wid}/progress",
            headers={**AUTH, "Accept": "text/event-stream", "Last-Event-ID": "x"},
        ),
        422,
    )


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/submit",
        "",
        "/stats",
        "/{workflow_id}",
        "/{workflow_id}/progress",
        "/{workflow_id}/rollback",
        "/{workflow_id}/cancel",
        "/{workflow_id}/resume",
    ):
        assert P + path in paths
    assert "/v1/health" in paths


def test_rollback_preview_lists_steps_and_changes_nothing(
    client: TestClient, backend: FakeBackend
) -> None:
    wid = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=AUTH).json()["id"]
    before = client.get(f"{P}/{wid}", headers=AUTH).json()["status"]
    resp = client.get(f"{P}/{wid}/rollback/preview?operation=servers", headers=AUTH)
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"] == wid and body["operation"] == "servers"
    assert body["steps"][0]["action"] == "delete_server"
    assert client.get(f"{P}/{wid}", headers=AUTH).json()["status"] == before
    assert "rollback_preview" in backend.calls and "rollback" not in backend.calls
    is_problem(client.get(f"{P}/{wid}/rollback/preview"), 401)
    is_problem(client.get(f"{P}/wf-0123456789abcdef/rollback/preview", headers=AUTH), 404)
