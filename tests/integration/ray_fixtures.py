"""One local Ray instance per test session; a fresh orchestrator per test."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.settings import Settings


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from actors import runner

    runner.connect(None)
    yield
    runner.shutdown()


def _kill_all_named() -> None:
    import ray

    from actors.names import NAMESPACE

    for info in ray.util.list_named_actors(all_namespaces=True):
        if info["namespace"] != NAMESPACE:
            continue
        try:
            ray.kill(ray.get_actor(info["name"], namespace=NAMESPACE))
        except ValueError:
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        names = [
            i
            for i in ray.util.list_named_actors(all_namespaces=True)
            if i["namespace"] == NAMESPACE
        ]
        if not names:
            return
        time.sleep(0.1)


class Orchestrator:
    """A test's handle on a real orchestrator actor over its own data dir."""

    def __init__(self, settings: Settings) -> None:
        from actors import runner

        self.settings = settings
        self.runner = runner
        self.handle = runner.start_orchestrator(settings, detached=False, resume=False)

    def restart(self, settings: Settings) -> None:
        """Kill this orchestrator and start a new one with ``settings`` (same data dir:
        the checkpoint actor stays). Its workflows and operations get ``settings``."""
        import ray

        from actors.names import NAMESPACE, ORCHESTRATOR

        ray.kill(self.handle)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                ray.get_actor(ORCHESTRATOR, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.05)
        self.settings = settings
        self.handle = self.runner.start_orchestrator(settings, detached=False, resume=False)

    def run(self, spec: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        wid = self.submit(spec)
        return self.wait(wid, timeout)

    def submit(self, spec: dict[str, Any]) -> str:
        return str(self.runner.call(self.handle.submit, spec)["id"])

    def wait(self, wid: str, timeout: float = 120) -> dict[str, Any]:
        doc: dict[str, Any] = self.runner.call(self.handle.wait, wid, timeout)
        return doc

    def get(self, wid: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.runner.call(self.handle.get, wid)
        return doc

    def load(self, wid: str) -> dict[tuple[str, str], dict[str, Any]]:
        import ray

        from actors.names import CHECKPOINT, NAMESPACE

        cp = ray.get_actor(CHECKPOINT, namespace=NAMESPACE)
        docs: dict[tuple[str, str], dict[str, Any]] = ray.get(cp.load.remote(wid))
        return docs

    def workflow_states(self, wid: str) -> list[str]:
        """The workflow's states in the order its events recorded them."""
        import ray

        from actors.names import CHECKPOINT, NAMESPACE

        cp = ray.get_actor(CHECKPOINT, namespace=NAMESPACE)
        events: list[dict[str, Any]] = ray.get(cp.events.remote(wid))
        return [e["data"]["status"] for e in events if e["type"] == "workflow"]


@pytest.fixture
def orchestrator(ray_session: None, tmp_path: Path) -> Iterator[Orchestrator]:
    _kill_all_named()
    settings = Settings.from_env({}).with_data_dir(tmp_path / "data")
    settings = _with(settings, taskserv_path=(tmp_path / "catalog",))
    (tmp_path / "catalog").mkdir()
    yield Orchestrator(settings)
    _kill_all_named()


def _with(settings: Settings, **changes: Any) -> Settings:
    from dataclasses import replace

    return replace(settings, **changes)


def write_taskserv(catalog: Path, name: str, apply: str, *, requires: tuple[str, ...] = ()) -> None:
    """A catalog entry whose ``apply`` is ``apply``; check/verify use its marker file."""
    marker = '"$ROOT/var/lib/provisioning/taskservs/$TASKSERV.installed"'
    reqs = ", ".join(f'"{r}"' for r in requires)
    text = textwrap.dedent(
        f"""
        {{
          name = "{name}",
          requires = [{reqs}],
          check = m%"test -f {marker}"%,
          apply = m%"
        {apply}
        mkdir -p "$ROOT/var/lib/provisioning/taskservs"
        echo ok > {marker}
        "%,
          verify = m%"test -f {marker}"%,
          uninstall = m%"rm -f {marker}"%,
        }}
        """
    )
    (catalog / f"{name}.ncl").write_text(text)
