"""The workflow language as frozen pydantic models.

The Nickel contracts in ``workflows.ncl`` check a file first (with Nickel's own
messages); these models check again, so a JSON workflow submitted over the API gets
the same rules, and the rest of the code works with typed values.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID_PATTERN = r"^[a-z0-9_-]+$"
SERVER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OperationType(StrEnum):
    SERVER_BATCH = "server_batch"
    TASKSERV_BATCH = "taskserv_batch"


class ProviderName(StrEnum):
    UPCLOUD = "upcloud"
    AWS = "aws"
    LOCAL = "local"


class DependencyKind(StrEnum):
    HARD = "hard"
    SOFT = "soft"


class DependencySpec(Frozen):
    on: str
    kind: DependencyKind = DependencyKind.HARD


class RetrySpec(Frozen):
    attempts: int = Field(default=3, ge=1, le=100)
    initial_backoff: float = Field(default=1.0, ge=0)
    max_backoff: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> RetrySpec:
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must be >= initial_backoff")
        return self


_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


class ServerConfigSpec(Frozen):
    name: Annotated[str, Field(pattern=SERVER_NAME_PATTERN, max_length=128)]
    plan: str = Field(min_length=1)
    zone: str = Field(min_length=1)
    image: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    user_data: str | None = None


class OperationSpec(Frozen):
    id: Annotated[str, Field(pattern=ID_PATTERN, max_length=128)]
    type: OperationType
    provider: ProviderName | None = None
    dependencies: tuple[DependencySpec, ...] = ()
    parallel_limit: int | None = Field(default=None, ge=1)
    tolerated_failures: int | str = 0
    retry: RetrySpec = RetrySpec()
    timeout: float | None = Field(default=None, gt=0)
    server_configs: tuple[ServerConfigSpec, ...] = ()
    taskservs: tuple[str, ...] = ()
    servers: tuple[str, ...] | None = None

    @field_validator("dependencies", mode="before")
    @classmethod
    def _deps(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return [{"on": d} if isinstance(d, str) else d for d in value]
        return value

    @field_validator("tolerated_failures")
    @classmethod
    def _tolerance(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("tolerated_failures must be >= 0")
            return value
        m = _PERCENT.match(value.strip())
        if not m or float(m.group(1)) > 100:
            raise ValueError("tolerated_failures must be a count or a percent like '10%'")
        return value.strip()

    @model_validator(mode="after")
    def _shape(self) -> OperationSpec:
        if self.type is OperationType.SERVER_BATCH:
            if self.provider is None:
                raise ValueError("a server_batch operation needs a provider")
            if not self.server_configs:
                raise ValueError("a server_batch operation needs at least one server_config")
            if self.taskservs:
                raise ValueError("taskservs belong to a taskserv_batch operation")
        else:
            if not self.taskservs:
                raise ValueError("a taskserv_batch operation needs at least one taskserv")
            if self.server_configs:
                raise ValueError("server_configs belong to a server_batch operation")
        return self

    def tolerated_count(self, total: int) -> int:
        """How many of ``total`` items may fail before the operation counts as Failed."""
        if isinstance(self.tolerated_failures, int):
            return self.tolerated_failures
        m = _PERCENT.match(self.tolerated_failures)
        assert m is not None
        return int(total * float(m.group(1)) / 100.0)


class WorkflowSpec(Frozen):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    version: str = "1.0.0"
    description: str = ""
    storage_backend: Literal["surrealdb", "filesystem"] = "surrealdb"
    parallel_limit: int = Field(default=10, ge=1)
    rollback_enabled: bool = True
    rollback_on_failure: bool = False
    on_failure: Literal["continue", "stop"] = "continue"
    operations: tuple[OperationSpec, ...] = Field(min_length=1)


class WorkflowFile(Frozen):
    batch_workflow: WorkflowSpec


# ---- taskserv catalog -------------------------------------------------------------


class TaskservSpec(Frozen):
    name: Annotated[str, Field(pattern=ID_PATTERN)]
    version: str = "0.0.0"
    description: str = ""
    requires: tuple[str, ...] = ()
    check: str
    apply: str
    verify: str
    uninstall: str
