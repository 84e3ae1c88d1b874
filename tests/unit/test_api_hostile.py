"""Hostile input through the REST API (issue 6): deep nesting, huge arrays, cycles,
non-UTF-8, Nickel that crashes its evaluator or never finishes, bodies over 1 MiB.

Each must be a problem document with a 4xx status whose detail names what was wrong:
never a 500, a hang, a traceback or a path of the server's; and the app must take a
normal submission afterwards. The inputs are built here once and sent both to the app
(an in-memory backend, the service's own limits) and, by
tests/e2e/test_hostile_input.py, to the real service.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import ApiLimits, create_app
from tests.unit.fake_backend import FakeBackend
from tests.unit.test_api_app import AUTH, LOCAL, REPO, SEED, TOKEN, P, is_problem

LIMITS = ApiLimits()  # what `provisioning up` serves with
ITEMS, OPS, BODY = LIMITS.max_items, LIMITS.max_operations, LIMITS.max_body_bytes


class Case(NamedTuple):
    request: dict[str, Any]  # keyword arguments of httpx's Client.post
    status: int
    says: tuple[str, ...]  # regular expressions the problem's detail must match


# ---- building the inputs -------------------------------------------------------------


def server_op(op_id: str = "servers", n: int = 1, **extra: Any) -> dict[str, Any]:
    configs = [{"name": f"{op_id}{i}", "plan": "l", "zone": "l"} for i in range(n)]
    return {
        "id": op_id,
        "type": "server_batch",
        "provider": "local",
        "server_configs": configs,
        **extra,
    }


def workflow(*ops: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"json": {"workflow": {"name": "hostile", **fields, "operations": list(ops)}}}


def raw(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


def nickel(source: str) -> dict[str, Any]:
    return {"json": {"source": source, "filename": "hostile.ncl"}}


NCL_OP = (
    '{ id = "%s", type = "server_batch", provider = "local", %s'
    'server_configs = [{ name = "%s1", plan = "l", zone = "l" }] }'
)


def ncl_op(op_id: str = "servers", deps: str = "") -> str:
    return NCL_OP % (op_id, f"dependencies = {deps}, " if deps else "", op_id)


def ncl_workflow(fields: str = "", ops: str = "") -> str:
    ops = ops or ncl_op()
    return f'{{ batch_workflow = {{ name = "hostile", {fields} operations = [{ops}] }} }}'


def nested(depth: int, opening: str, closing: str, inner: str = "") -> str:
    return opening * depth + inner + closing * depth


RECURSION = (r"recursion limit exceeded", r"line 1 column \d+")
NOT_JSON = (r"Invalid JSON",)
NOT_JSON_TYPE = (r"must be JSON in UTF-8", r"application/json")
CRASHED = (r"hostile\.ncl: evaluation failed: the Nickel evaluator crashed",)
STOPPED = (r"hostile\.ncl: evaluation (failed: the Nickel evaluator crashed|did not finish)",)


def json_cases() -> list[Any]:
    """Inputs refused before any Nickel runs: each is answered in well under a second."""
    name = {"name": "café", "operations": [server_op()]}
    return [
        # deep nesting: the JSON parser's own depth limit, wherever the nesting is
        pytest.param(
            Case(raw(nested(100_000, "[", "]").encode()), 422, RECURSION), id="deep-array-body"
        ),
        pytest.param(
            Case(raw(nested(50_000, '{"a":', "}", "1").encode()), 422, RECURSION),
            id="deep-object-body",
        ),
        pytest.param(
            Case(
                raw(('{"workflow":' + nested(20_000, '{"a":', "}", "1") + "}").encode()),
                422,
                RECURSION,
            ),
            id="deep-workflow",
        ),
        pytest.param(
            Case(
                raw(
                    b'{"workflow": {"name": "x", "operations": [], "description": '
                    + nested(20_000, "[", "]").encode()
                    + b"}}"
                ),
                422,
                RECURSION,
            ),
            id="deep-inside-a-field",
        ),
        # huge arrays
        pytest.param(
            Case(
                workflow(server_op(n=ITEMS + 1)),
                422,
                (rf"{ITEMS + 1} `server_configs` entries", rf"the limit is {ITEMS}\b"),
            ),
            id="server-configs-over-the-item-limit",
        ),
        pytest.param(
            Case(workflow(*[{}] * 300_000), 422, (rf"300000 operations; the limit is {OPS}\b",)),
            id="300k-empty-operations",
        ),
        pytest.param(
            Case(
                workflow(server_op("a"), server_op("b", dependencies=["a"] * 200_000)),
                422,
                (rf"200000 dependencies over all operations; the limit is {ITEMS}\b",),
            ),
            id="200k-dependencies",
        ),
        pytest.param(
            Case(
                workflow(
                    server_op("a"),
                    {
                        "id": "t",
                        "type": "taskserv_batch",
                        "dependencies": ["a"],
                        "taskservs": ["containerd"],
                        "servers": ["a0"] * 200_000,
                    },
                ),
                422,
                (r"200000 `servers` entries",),
            ),
            id="200k-target-servers",
        ),
        pytest.param(
            Case(workflow(server_op(), description=[0] * 1_000_000), 413, (rf"limit is {BODY}",)),
            id="1M-element-array-is-over-the-body-limit",
        ),
        pytest.param(
            Case(
                workflow(server_op(), description=[0] * 500_000),
                422,
                (r"batch_workflow\.description: Input should be a valid string",),
            ),
            id="500k-element-array-in-an-uncounted-field",
        ),
        pytest.param(
            Case(
                workflow(server_op(), junk=[0] * 500_000),
                422,
                (r"batch_workflow\.junk: Extra inputs are not permitted",),
            ),
            id="500k-element-array-in-an-unknown-field",
        ),
        # cycles
        pytest.param(
            Case(
                workflow(
                    server_op("a", dependencies=["c"]),
                    server_op("b", dependencies=["a"]),
                    server_op("c", dependencies=["b"]),
                ),
                422,
                (r"dependency cycle: a -> c -> b -> a",),
            ),
            id="dependency-cycle",
        ),
        pytest.param(
            Case(
                workflow(
                    server_op("a", dependencies=[{"on": "b", "kind": "soft"}]),
                    server_op("b", dependencies=[{"on": "a", "kind": "soft"}]),
                ),
                422,
                (r"dependency cycle: a -> b -> a",),
            ),
            id="soft-dependency-cycle",
        ),
        pytest.param(
            Case(workflow(server_op("a", dependencies=["a"])), 422, (r"dependency cycle: a -> a",)),
            id="self-dependency",
        ),
        # not UTF-8, not JSON
        pytest.param(
            Case(raw(b'{"source": "\xff\xfe\xfd"}'), 422, NOT_JSON), id="invalid-utf8-in-a-string"
        ),
        pytest.param(Case(raw(b"\xff\xfe" + b"\x80" * 64), 422, NOT_JSON), id="invalid-utf8-body"),
        pytest.param(
            Case(
                raw(json.dumps({"workflow": name}, ensure_ascii=False).encode("latin-1")),
                422,
                NOT_JSON,
            ),
            id="latin-1-body",
        ),
        pytest.param(
            Case(raw(json.dumps({"workflow": name}).encode("utf-16")), 422, NOT_JSON),
            id="utf-16-body",
        ),
        pytest.param(
            Case(raw(b'{"source": "{ x = \\"\\ud800\\" }"}'), 422, NOT_JSON),
            id="lone-surrogate-in-the-source",
        ),
        pytest.param(
            Case(raw(b'{"workflow": {"name": "\\udc00", "operations": []}}'), 422, NOT_JSON),
            id="lone-surrogate-in-the-workflow",
        ),
        pytest.param(
            Case({"json": {"source": SEED, "filename": "a\x00.ncl"}}, 422, (r"filename",)),
            id="nul-in-the-filename",
        ),
        pytest.param(
            Case(raw(json.dumps({"workflow": LOCAL}).encode(), "text/plain"), 415, NOT_JSON_TYPE),
            id="text-plain",
        ),
        pytest.param(Case({"data": {"workflow": "x"}}, 415, NOT_JSON_TYPE), id="form-urlencoded"),
        pytest.param(
            Case({"files": {"file": ("x.ncl", SEED)}}, 415, NOT_JSON_TYPE), id="multipart"
        ),
        pytest.param(
            Case(
                raw(json.dumps({"workflow": LOCAL}).encode(), "application/json; charset=latin-1"),
                415,
                NOT_JSON_TYPE,
            ),
            id="json-in-latin-1",
        ),
        # over the size limits, with a Content-Length (the streamed case has its own test)
        pytest.param(
            Case(
                {"json": {"source": "#" + "x" * (2 << 20)}}, 413, (rf"the limit is {BODY} bytes",)
            ),
            id="2MiB-body",
        ),
        pytest.param(
            Case(
                nickel("#" + "x" * (600 << 10) + "\n" + SEED),
                413,
                (r"Nickel source is \d+ bytes", rf"the limit is {LIMITS.max_source_bytes} bytes"),
            ),
            id="600KiB-nickel-source",
        ),
    ]


def nickel_cases() -> list[Any]:
    """Inputs the evaluator runs: each ends within its timeout, or by crashing a worker."""
    deps = ncl_op("a", '["b"]') + ", " + ncl_op("b", '["a"]')
    generated = (
        '{ id = "servers", type = "server_batch", provider = "local", server_configs = '
        'std.array.generate (fun i => { name = "s%%{std.to_string i}", plan = "l", zone = "l" }) '
        "%d }"
    )
    many_ops = (
        'std.array.generate (fun i => { id = "o%{std.to_string i}", type = "server_batch", '
        'provider = "local", server_configs = [{ name = "s%{std.to_string i}", plan = "l", '
        'zone = "l" }] }) 2000'
    )
    return [
        # deep nesting: too deep for Nickel's own stack (the worker dies), or for Python's
        # JSON reader of Nickel's output (a RecursionError in the worker)
        pytest.param(
            Case(
                nickel(ncl_workflow(f"junk = {nested(5_000, '{ a = ', ' }', '1')},")), 422, CRASHED
            ),
            id="records-5000-deep",
        ),
        pytest.param(
            Case(nickel(ncl_workflow(f"junk = {nested(50_000, '[', ']')},")), 422, CRASHED),
            id="arrays-50000-deep",
        ),
        pytest.param(
            Case(
                nickel(ncl_workflow(f"junk = {nested(1_200, '[', ']')},")),
                422,
                (r"hostile\.ncl: the workflow is nested too deeply",),
            ),
            id="arrays-1200-deep",
        ),
        pytest.param(
            Case(
                nickel(
                    ncl_workflow(
                        "junk = std.array.fold_left (fun acc _ => { a = acc }) {} "
                        "(std.array.range 0 1200),"
                    )
                ),
                422,
                (r"hostile\.ncl: the workflow is nested too deeply",),
            ),
            id="generated-records-1200-deep",
        ),
        # huge arrays
        pytest.param(
            Case(
                nickel(ncl_workflow(ops=generated % (ITEMS + 1))),
                422,
                (rf"{ITEMS + 1} `server_configs` entries", rf"the limit is {ITEMS}\b"),
            ),
            id="generated-server-configs-over-the-item-limit",
        ),
        pytest.param(
            Case(
                nickel(f'{{ batch_workflow = {{ name = "hostile", operations = {many_ops} }} }}'),
                422,
                (rf"2000 operations; the limit is {OPS}\b",),
            ),
            id="generated-2000-operations",
        ),
        pytest.param(
            Case(
                nickel(
                    ncl_workflow(
                        ops=ncl_op("a") + ", " + ncl_op("b", 'std.array.replicate 30000 "a"')
                    )
                ),
                422,
                (rf"30000 dependencies over all operations; the limit is {ITEMS}\b",),
            ),
            id="generated-30000-dependencies",
        ),
        pytest.param(
            # Refused by the contract, or the worker dies building it: either way in bounds.
            Case(
                nickel(ncl_workflow("junk = std.array.replicate 1000000 0,")),
                422,
                (
                    r"hostile\.ncl: (invalid workflow[\s\S]*extra field `junk`"
                    r"|evaluation failed: the Nickel evaluator crashed|evaluation did not finish)",
                ),
            ),
            id="1M-element-array-in-an-unknown-field",
        ),
        # cycles and recursion
        pytest.param(
            Case(nickel(ncl_workflow(ops=deps)), 422, (r"dependency cycle: a -> b -> a",)),
            id="dependency-cycle",
        ),
        pytest.param(
            Case(
                nickel(ncl_workflow(ops=ncl_op("a", '["a"]'))), 422, (r"dependency cycle: a -> a",)
            ),
            id="self-dependency",
        ),
        pytest.param(
            Case(
                nickel("{ batch_workflow = { name = batch_workflow.name, operations = [] } }"),
                422,
                (r"infinite recursion", r"hostile\.ncl:1:\d+"),
            ),
            id="record-field-defined-by-itself",
        ),
        pytest.param(
            # An infinitely deep value, not a loop: it grows until the memory limit kills
            # the worker, or the timeout does, whichever comes first on this machine.
            Case(nickel("let rec r = { a = r } in { batch_workflow = r }"), 422, STOPPED),
            id="infinitely-recursive-record",
        ),
        pytest.param(
            Case(
                nickel(SEED.replace("name", "na\x00me", 1)),
                422,
                (r"hostile\.ncl: invalid workflow", r"unexpected token", r"hostile\.ncl:\d+:\d+"),
            ),
            id="nul-byte-in-the-source",
        ),
    ]


# ---- checking the answers ------------------------------------------------------------


def submit(
    client: httpx.Client, request: dict[str, Any], auth: dict[str, str] = AUTH
) -> httpx.Response:
    """POST ``request`` (keyword arguments of ``Client.post``) to the submit route."""
    headers = {**auth, **request.get("headers", {})}
    return client.post(f"{P}/submit", **{**request, "headers": headers})


def refused(resp: httpx.Response, case: Case) -> dict[str, Any]:
    """``resp`` is ``case``'s problem document, and shows nothing of the server."""
    body = is_problem(resp, case.status)
    detail = body["detail"]
    for pattern in case.says:
        assert re.search(pattern, detail), f"{pattern!r} not in {detail!r}"
    for leak in ("Traceback", "site-packages", str(REPO), "/tmp/", "prov-eval", "\x1b["):
        assert leak not in resp.text, resp.text
    return body


def slow_legit(op_id: str = "servers") -> str:
    """A valid workflow (one local server, ``<op_id>1``) that takes Nickel ~0.5 s."""
    return ncl_workflow(
        'description = "sum %{std.to_string (std.array.fold_left (fun acc x => acc + x) 0 '
        '(std.array.range 0 60000))}",',
        ncl_op(op_id),
    )


# ---- the tests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # The service's own limits, with a smaller timeout and memory limit so that the
    # evaluator cases end sooner (a worker at 512 MiB dies in about a second).
    limits = ApiLimits(eval_timeout=5, eval_memory_bytes=512 << 20)
    with TestClient(create_app(FakeBackend(), token=TOKEN, limits=limits)) as c:
        yield c


def still_serves(client: TestClient, nickel_too: bool = False) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    resp = client.post(f"{P}/submit", json={"workflow": LOCAL}, headers=AUTH)
    assert resp.status_code == 202, resp.text
    if nickel_too:
        resp = client.post(f"{P}/submit", json={"source": SEED}, headers=AUTH)
        assert resp.status_code == 202, resp.text


@pytest.mark.parametrize("case", json_cases())
def test_hostile_json_is_a_problem_document(client: TestClient, case: Case) -> None:
    started = time.monotonic()
    refused(submit(client, case.request), case)
    # Refused before validation or planning: 300,000 empty operations took 10 s of the
    # event loop when the operation limit was checked after validation.
    assert time.monotonic() - started < 5
    still_serves(client)


@pytest.mark.parametrize("case", nickel_cases())
def test_hostile_nickel_is_a_problem_document(client: TestClient, case: Case) -> None:
    started = time.monotonic()
    refused(submit(client, case.request), case)
    # At worst a timeout, a new worker and a second timeout (the retry alone); the
    # margin is for a loaded machine.
    assert time.monotonic() - started < 2 * 5 + 30
    still_serves(client, nickel_too=True)


def test_body_over_the_limit_without_content_length_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"source": "#'
        for _ in range(32):
            yield b"x" * (64 << 10)
        yield b'"}'

    resp = submit(client, {"content": chunks()})
    assert "content-length" not in resp.request.headers  # sent chunked
    refused(resp, Case({}, 413, (rf"request body is more than \d+ bytes; the limit is {BODY}",)))
    still_serves(client)


def test_a_crashing_evaluation_does_not_fail_the_others(client: TestClient) -> None:
    """A worker that dies takes the evaluations sharing its pool with it: they are
    retried, each in a worker of its own, and succeed (they were answered 500 when the
    dead pool could not be discarded)."""
    crash = nickel(ncl_workflow(f"junk = {nested(50_000, '[', ']')},"))

    with ThreadPoolExecutor(4) as pool:
        legit = [pool.submit(submit, client, nickel(slow_legit())) for _ in range(2)]
        time.sleep(0.3)  # both workers are busy with them when the crash comes
        crashed = pool.submit(submit, client, crash)
        legit.append(pool.submit(submit, client, nickel(slow_legit())))
        refused(crashed.result(), Case({}, 422, CRASHED))
        for future in legit:
            resp = future.result()
            assert resp.status_code == 202, resp.text
    still_serves(client, nickel_too=True)


def test_nickel_messages_name_the_schema_files_without_the_servers_paths(
    client: TestClient,
) -> None:
    source = SEED.replace('provider = "upcloud"', 'provider = "nowhere"', 1)
    body = refused(
        submit(client, {"json": {"source": source, "filename": "p.ncl"}}),
        Case({}, 422, (r"p\.ncl:\d+:\d+", r"workflows\.ncl:\d+:\d+")),
    )
    assert "/schemas/" not in body["detail"]


def test_json_with_a_utf8_charset_or_no_content_type_is_accepted(client: TestClient) -> None:
    body = json.dumps({"workflow": LOCAL}).encode()
    for headers in ({"content-type": "application/json; charset=UTF-8"}, {}):
        resp = client.post(f"{P}/submit", headers={**AUTH, **headers}, content=body)
        assert resp.status_code == 202, resp.text
