"""From a submit request to a planned workflow, before anything reaches the orchestrator.

Sizes are checked first (body, source), then the Nickel is evaluated in a bounded
worker (``api.evaluator``) with imports restricted to the schemas and the taskserv
catalog, or the JSON workflow is validated, then planned against the catalog and
checked against the operation and item limits. Bad input never reaches Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from api.evaluator import NickelEvaluator
from api.problems import ApiProblem
from runtime.planner import Plan, build_plan
from schemas.catalog import catalog_dirs, load_catalog
from schemas.loader import workflow_from_data

Doc = dict[str, Any]


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 1 << 20
    max_source_bytes: int = 512 << 10
    max_operations: int = 1_000
    max_items: int = 20_000
    eval_timeout: float = 10.0
    eval_memory_bytes: int = 2 << 30
    page_default: int = 100
    page_max: int = 1_000

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_source_bytes, self.max_operations) < 1:
            raise ValueError("API limits must be positive")
        if self.eval_timeout <= 0 or not 1 <= self.page_default <= self.page_max:
            raise ValueError("invalid API limits")


class SubmitRequest(BaseModel):
    """Either Nickel ``source`` (with the ``filename`` its messages should name) or a
    ``workflow`` as JSON (``{"batch_workflow": {...}}`` or the inner record)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, description="Nickel text of the workflow file")
    filename: str = Field(
        "workflow.ncl", min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$"
    )
    workflow: dict[str, Any] | None = Field(None, description="The workflow as JSON")

    @model_validator(mode="after")
    def _one_of(self) -> SubmitRequest:
        if (self.source is None) == (self.workflow is None):
            raise ValueError("give exactly one of `source` (Nickel text) or `workflow` (JSON)")
        return self


class SubmitResponse(BaseModel):
    id: str
    name: str
    status: str
    existing: bool = False


def check_json_content_type(request: Request) -> None:
    """Refuse (415) a body declared as anything but JSON in UTF-8; none declared is JSON."""
    declared = request.headers.get("content-type", "")
    media, _, params = declared.partition(";")
    media = media.strip().lower()
    charset = "utf-8"
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    is_json = media in ("", "application/json") or (
        media.startswith("application/") and media.endswith("+json")
    )
    if not is_json or charset not in ("utf-8", "utf8"):
        raise ApiProblem(
            415,
            f"the body must be JSON in UTF-8 (Content-Type: application/json), not "
            f"{declared[:100]!r}",
            kind="unsupported-media-type",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large("request body", int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large("request body", size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str, size: int, limit: int, *, at_least: bool = False) -> ApiProblem:
    more = "more than " if at_least else ""
    return ApiProblem(
        413, f"{what} is {more}{size} bytes; the limit is {limit} bytes", kind="too-large"
    )


class Intake:
    def __init__(self, limits: ApiLimits, dirs: Sequence[Path] | None = None) -> None:
        self.limits = limits
        self.dirs = list(dirs) if dirs is not None else catalog_dirs()
        self.evaluator = NickelEvaluator(
            timeout=limits.eval_timeout, memory_limit=limits.eval_memory_bytes
        )

    def parse(self, body: bytes) -> SubmitRequest:
        try:
            return SubmitRequest.model_validate_json(body or b"null")
        except ValidationError as exc:
            msgs = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:10]
            )
            raise ApiProblem(422, msgs, kind="invalid-request") from None

    async def plan(self, req: SubmitRequest) -> Plan:
        data: Any = req.workflow
        if req.source is not None:
            size = len(req.source.encode("utf-8"))
            if size > self.limits.max_source_bytes:
                raise _too_large("Nickel source", size, self.limits.max_source_bytes)
            data = await self.evaluator.evaluate(req.source, req.filename, self.dirs)
        self.check_counts(data, req.filename)
        spec = workflow_from_data(data, req.filename)
        plan = build_plan(spec, load_catalog(self.dirs))
        if plan.item_count > self.limits.max_items:
            raise ApiProblem(
                422,
                f"{req.filename}: {plan.item_count} items; the limit is {self.limits.max_items}",
                kind="too-many-items",
            )
        return plan

    def check_counts(self, data: Any, filename: str) -> None:
        """Refuse too many operations, or lists longer than the item limit allows, before
        validating: validation, and the list of errors it makes, cost time in proportion
        to them, on the server's event loop (300,000 empty operations in a 1 MiB body
        took 10 s). Each list bound here is implied by the item limit checked after
        planning (for a valid workflow), except ``dependencies``, bounded by it too."""
        workflow = data.get("batch_workflow", data) if isinstance(data, dict) else None
        ops = workflow.get("operations") if isinstance(workflow, dict) else None
        if not isinstance(ops, list):
            return  # validation says what is wrong
        if len(ops) > self.limits.max_operations:
            raise ApiProblem(
                422,
                f"{filename}: {len(ops)} operations; the limit is {self.limits.max_operations}",
                kind="too-many-operations",
            )
        for key in ("server_configs", "servers", "taskservs", "dependencies"):
            total = sum(
                len(op[key]) for op in ops if isinstance(op, dict) and isinstance(op.get(key), list)
            )
            if total > self.limits.max_items:
                what = (
                    "dependencies over all operations"
                    if key == "dependencies"
                    else f"`{key}` entries make at least {total} items"
                )
                raise ApiProblem(
                    422,
                    f"{filename}: {total} {what}; the limit is {self.limits.max_items}",
                    kind="too-many-items",
                )

    def close(self) -> None:
        self.evaluator.close()
