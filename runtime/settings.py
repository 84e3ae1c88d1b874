"""Settings, read once at each entry point (CLI, ``up``, actor start) and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_API_URL = "http://127.0.0.1:9090"
DEFAULT_PORTS = {"api": 9090, "upcloud": 9091, "ec2": 9092, "ssh": 9093}


def default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get("PROVISIONING_DATA_DIR"):
        return Path(env["PROVISIONING_DATA_DIR"]).expanduser()
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "provisioning"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    api_url: str = DEFAULT_API_URL
    api_token: str | None = None
    surrealdb_url: str | None = None
    taskserv_path: tuple[Path, ...] = ()
    # Environment for the provider adapters (credentials, endpoints). Kept apart so it
    # is handed to the adapters and never written to the store or a response.
    provider_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Seconds a local server takes to become ready: 0 is the instant provider; tests
    # and benchmarks raise it to keep items in flight.
    local_ready_delay: float = 0.0
    # Seconds between status polls of a booting cloud server (None: each provider's own
    # default). The sandbox's servers boot in a second, so it polls faster.
    poll_interval: float | None = None
    # Fault tests only: ``<point>:<n>`` kills the orchestrator at a durability boundary
    # (see runtime/crashpoints.py). From PROVISIONING_CRASH_AT.
    crash_at: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        taskserv_path = tuple(
            Path(p).expanduser() for p in env.get("PROVISIONING_TASKSERV_PATH", "").split(":") if p
        )
        provider_env = {
            k: v
            for k, v in env.items()
            if k.startswith(
                ("UPCLOUD_", "AWS_", "PROVISIONING_AWS_", "PROVISIONING_RATE_", "PROVISIONING_SSH_")
            )
        }
        return cls(
            data_dir=default_data_dir(env),
            api_url=env.get("PROVISIONING_API_URL", DEFAULT_API_URL).rstrip("/"),
            api_token=env.get("PROVISIONING_API_TOKEN") or None,
            surrealdb_url=env.get("PROVISIONING_SURREALDB_URL") or None,
            taskserv_path=taskserv_path,
            provider_env=provider_env,
            local_ready_delay=float(env.get("PROVISIONING_LOCAL_READY_DELAY", "0") or 0),
            poll_interval=float(env["PROVISIONING_POLL_INTERVAL"])
            if env.get("PROVISIONING_POLL_INTERVAL")
            else None,
            crash_at=env.get("PROVISIONING_CRASH_AT") or None,
        )

    def with_data_dir(self, data_dir: Path | None) -> Settings:
        return self if data_dir is None else replace(self, data_dir=data_dir.expanduser())

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def local_dir(self) -> Path:
        return self.data_dir / "local"
