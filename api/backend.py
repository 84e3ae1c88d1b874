"""What the REST app needs from the orchestrator, as a small async interface.

``api.app`` depends on this Protocol only, so it imports no Ray: ``api.deployment``
implements it with calls to the named orchestrator actor, and the unit tests with a
fake. Backends raise the errors below (or any ``InputError``) for the app to map to
HTTP statuses; anything else is a 500.
"""

from __future__ import annotations

from typing import Any, Protocol

from runtime.errors import InputError

Doc = dict[str, Any]

TERMINAL = frozenset({"Completed", "Failed", "Cancelled", "RolledBack", "RollbackFailed"})


class NotFoundError(InputError):
    """No workflow with that id (HTTP 404)."""


class ConflictError(InputError):
    """The workflow's state does not allow the request (HTTP 409)."""


class WorkflowBackend(Protocol):
    async def submit(self, spec: Doc, idempotency_key: str | None) -> Doc:
        """Register a validated workflow; ``{"id", "name", "status"}``."""
        ...

    async def get(self, workflow_id: str) -> Doc:
        """The status document: the workflow and its operations with item counts."""
        ...

    async def list(self, status: str | None) -> list[Doc]:
        """Summaries of every workflow (with ``status`` only those), oldest first."""
        ...

    async def stats(self) -> Doc: ...

    async def cancel(self, workflow_id: str) -> Doc: ...

    async def resume(self, workflow_id: str) -> Doc: ...

    async def rollback(self, workflow_id: str, operation: str | None) -> Doc: ...

    async def rollback_preview(self, workflow_id: str, operation: str | None) -> list[Doc]:
        """What a rollback would undo, in order: ``{op, item, action, server}`` each."""
        ...

    async def events(self, workflow_id: str, after_seq: int, limit: int, wait: float) -> list[Doc]:
        """Events ``[{seq, type, data}]`` after ``after_seq``; waits up to ``wait`` s."""
        ...
