"""The REST API (DESIGN.md section 6) as a FastAPI app built by ``create_app``.

No Ray here: the app talks to a ``WorkflowBackend`` (``api.backend``), which
``api.deployment`` implements over the orchestrator actor and the unit tests fake.
The app does the input work itself (sizes, Nickel in a bounded worker, validation,
planning), so only a planned workflow reaches the orchestrator.
"""

# No `from __future__ import annotations`: the routes are closures whose annotations
# name local dependencies, which FastAPI can resolve only when evaluated eagerly.

import base64
import binascii
import hmac
import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from api.backend import NotFoundError, WorkflowBackend
from api.intake import (
    ApiLimits,
    Intake,
    SubmitRequest,
    SubmitResponse,
    check_json_content_type,
    read_body,
)
from api.problems import PROBLEM_RESPONSES, ApiProblem, install_problem_handlers
from api.stream import progress_events
from runtime.states import WorkflowState

__all__ = ["ApiLimits", "create_app"]

Doc = dict[str, Any]
PREFIX = "/v1/workflows/batch"
_ID = re.compile(r"^wf-[0-9a-f]{8,40}$")
StatusFilter = Annotated[WorkflowState | None, Query(description="Only workflows in this state")]


class Page(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None = None


class RollbackRequest(BaseModel):
    operation: str | None = None


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not _ID.match(raw):
        raise ApiProblem(422, "cursor is not one this API returned", kind="invalid-request")
    return raw


def create_app(
    backend: WorkflowBackend,
    *,
    token: str,
    limits: ApiLimits = ApiLimits(),
    catalog_dirs: Sequence[Path] | None = None,
) -> FastAPI:
    if not token:
        raise ValueError("an API token is required")
    intake = Intake(limits, catalog_dirs)
    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")
    expected = token.encode()

    def authorised(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = creds.credentials.encode() if creds is not None else b""
        if creds is None or not hmac.compare_digest(given, expected):
            raise ApiProblem(
                401,
                "missing or wrong bearer token (see <data dir>/token or PROVISIONING_API_TOKEN)",
                kind="unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def known_id(workflow_id: Annotated[str, PathParam(max_length=64)]) -> str:
        # Anything that is not shaped like an id cannot exist: answer without a Ray call.
        if not _ID.match(workflow_id):
            raise NotFoundError(f"no workflow with id {workflow_id!r}")
        return workflow_id

    WorkflowId = Annotated[str, Depends(known_id)]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        intake.close()

    app = FastAPI(
        title="provisioning",
        version="1",
        description="Batch workflows for cloud infrastructure. Errors are RFC 9457 "
        "`application/problem+json`. Every `/v1/workflows` route needs a bearer token.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    router = APIRouter(
        prefix=PREFIX, dependencies=[Depends(authorised)], responses=PROBLEM_RESPONSES
    )

    @app.get("/v1/health", tags=["health"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.post(
        "/submit",
        status_code=202,
        response_model=SubmitResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SubmitRequest.model_json_schema()}},
            }
        },
    )
    async def submit(
        request: Request,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Doc:
        """Submit a workflow: `{"source": "<nickel>", "filename": "x.ncl"}` or
        `{"workflow": {...}}`. The same `Idempotency-Key` returns the same workflow."""
        check_json_content_type(request)
        req = intake.parse(await read_body(request, limits.max_body_bytes))
        plan = await intake.plan(req)
        return await backend.submit(plan.workflow.model_dump(mode="json"), idempotency_key)

    @router.get("", response_model=Page)
    async def list_workflows(
        status: StatusFilter = None,
        limit: Annotated[int | None, Query(ge=1, le=limits.page_max)] = None,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
    ) -> Page:
        """Workflows oldest first (ids are time-ordered); follow `next_cursor` for more."""
        after = decode_cursor(cursor) if cursor else None
        docs = await backend.list(status.value if status else None)
        docs = sorted((d for d in docs if after is None or d["id"] > after), key=_by_id)
        size = limit or limits.page_default
        page = docs[:size]
        more = len(docs) > size
        return Page(items=page, next_cursor=encode_cursor(page[-1]["id"]) if more else None)

    @router.get("/stats")
    async def stats() -> Doc:
        """Counts by status, items by state, success rate, durations per operation type,
        provider calls and throttling events."""
        return await backend.stats()

    @router.get("/{workflow_id}")
    async def get_workflow(workflow_id: WorkflowId) -> Doc:
        return await backend.get(workflow_id)

    @router.get(
        "/{workflow_id}/progress",
        responses={200: {"content": {"text/event-stream": {}, "application/json": {}}}},
    )
    async def progress(
        request: Request,
        workflow_id: WorkflowId,
        last_event_id: Annotated[str | None, Header(max_length=20)] = None,
    ) -> Any:
        """The status document with overall progress; with `Accept: text/event-stream`,
        a live stream of events (`id:` = sequence number; resume with `Last-Event-ID`)
        that ends after the workflow's terminal event."""
        doc = await backend.get(workflow_id)
        if "text/event-stream" not in request.headers.get("accept", ""):
            return JSONResponse({**doc, "progress": _progress(doc)})
        after = 0
        if last_event_id:
            if not last_event_id.strip().isdigit():
                raise ApiProblem(422, "Last-Event-ID must be an event id", kind="invalid-request")
            after = int(last_event_id.strip())
        return StreamingResponse(
            progress_events(backend, workflow_id, after, doc),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.post("/{workflow_id}/rollback", status_code=202)
    async def rollback(workflow_id: WorkflowId, body: RollbackRequest | None = None) -> Doc:
        """Undo what the workflow did (a Completed, Failed or Cancelled one); with
        `operation`, that operation and what depends on it. 409 while it runs."""
        return await backend.rollback(workflow_id, body.operation if body else None)

    @router.get("/{workflow_id}/rollback/preview")
    async def rollback_preview(workflow_id: WorkflowId, operation: str | None = None) -> Doc:
        """What a rollback would undo, without undoing it: each step's operation, item,
        action (`delete_server` or `uninstall`) and server, in the order it would run."""
        steps = await backend.rollback_preview(workflow_id, operation)
        return {"id": workflow_id, "operation": operation, "steps": steps}

    @router.post("/{workflow_id}/cancel", status_code=202)
    async def cancel(workflow_id: WorkflowId) -> Doc:
        """Start nothing new; in-flight provider calls finish and are recorded."""
        return await backend.cancel(workflow_id)

    @router.post("/{workflow_id}/resume", status_code=202)
    async def resume(workflow_id: WorkflowId) -> Doc:
        """Continue an interrupted workflow, or redrive a Failed or Cancelled one."""
        return await backend.resume(workflow_id)

    app.include_router(router)
    return app


def _by_id(doc: Doc) -> str:
    return str(doc["id"])


def _progress(doc: Doc) -> dict[str, Any]:
    total = sum(int(op.get("total") or 0) for op in doc.get("operations", []))
    finished = sum(
        sum(n for s, n in (op.get("counts") or {}).items() if s not in ("Pending", "Running"))
        for op in doc.get("operations", [])
    )
    return {"finished": finished, "total": total, "fraction": finished / total if total else 0}
