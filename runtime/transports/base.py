"""The taskserv transport: run one catalog script on one server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from runtime.providers.base import ServerRef


@dataclass(frozen=True)
class ScriptResult:
    exit_code: int
    stdout: str
    stderr: str

    def stderr_tail(self, lines: int = 5) -> str:
        return "\n".join(self.stderr.strip().splitlines()[-lines:])


class Transport(ABC):
    @abstractmethod
    async def run(
        self,
        server: ServerRef,
        script: str,
        env: dict[str, str],
        timeout: float | None = None,
    ) -> ScriptResult:
        """Run ``script`` with ``bash -euo pipefail`` on ``server`` with ``env`` set.

        Raises ``TransportError`` when the script cannot be run at all (connection
        refused, host key mismatch, timeout); a script that runs and fails returns
        its non-zero exit code instead.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close connections."""
