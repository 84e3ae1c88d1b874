"""Driver-side entry points: connect to Ray and run or serve the orchestrator.

Every Ray call the CLI needs goes through here, so ``api/`` stays free of Ray
(except the Serve deployment).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.names import CHECKPOINT, NAMESPACE, ORCHESTRATOR
from actors.orchestrator import OrchestratorActor
from runtime.errors import InputError, ProvisioningError, StoreLockedError
from runtime.settings import Settings

Doc = dict[str, Any]
TERMINAL = {"Completed", "Failed", "Cancelled", "RolledBack", "RollbackFailed"}


def connect(address: str | None = None, *, dashboard: bool = False) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray instance."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "namespace": NAMESPACE,
        "log_to_driver": False,
        "configure_logging": False,
        "logging_level": logging.WARNING,
    }
    if address is None:
        kwargs["include_dashboard"] = dashboard
    ray.init(address=address, **kwargs)


def unwrap(exc: BaseException) -> BaseException:
    """The error raised inside an actor, if it was one of ours."""
    if isinstance(exc, RayTaskError):
        cause = exc.as_instanceof_cause()
        if isinstance(cause, InputError | StoreLockedError):
            return cause
        inner = getattr(exc, "cause", None)
        if isinstance(inner, RayActorError | RayTaskError):
            return unwrap(inner)  # e.g. the checkpoint actor the orchestrator called died
        if isinstance(inner, BaseException):
            return inner
    if isinstance(exc, RayActorError) and "StoreLockedError" in str(exc):
        line = next((ln for ln in str(exc).splitlines() if "StoreLockedError:" in ln), str(exc))
        return StoreLockedError(line.split("StoreLockedError:", 1)[-1].strip())
    return exc


def start_orchestrator(settings: Settings, *, detached: bool, resume: bool = True) -> Any:
    """Get or create the orchestrator; raise ``StoreLockedError`` if another one owns
    the data dir."""
    # On this node, with the checkpoint actor it creates: the data dir is local here.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options: dict[str, Any] = {
        "name": ORCHESTRATOR,
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "scheduling_strategy": here,
    }
    if detached:
        options["lifetime"] = "detached"
    deadline = time.monotonic() + 15
    while True:
        orch = OrchestratorActor.options(**options).remote(settings, resume)  # type: ignore[attr-defined]
        try:
            ray.get(orch.start.remote())
            return orch
        except (RayActorError, RayTaskError) as exc:
            err = unwrap(exc)
            # A killed predecessor's processes may hold the lock for a moment.
            if isinstance(err, StoreLockedError) and time.monotonic() < deadline:
                _kill_named(ORCHESTRATOR)
                _kill_named(CHECKPOINT)
                time.sleep(1)
                continue
            raise err from None


def _kill_named(name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass


def call(handle_method: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return ray.get(handle_method.remote(*args, **kwargs))
    except (RayActorError, RayTaskError) as exc:
        raise unwrap(exc) from None


def run_foreground(
    orchestrator: Any,
    spec: Doc | None,
    *,
    resume_id: str | None = None,
    on_status: Callable[[Doc], None] = lambda doc: None,
    on_submit: Callable[[str], None] = lambda wid: None,
    poll: float = 0.5,
) -> Doc:
    """Submit ``spec`` (or resume ``resume_id``) and poll until the workflow is terminal."""
    if resume_id:
        wid = call(orchestrator.resume, resume_id)["id"]
    else:
        wid = call(orchestrator.submit, spec)["id"]
    on_submit(wid)
    while True:
        doc: Doc = call(orchestrator.get, wid)
        on_status(doc)
        if doc["status"] in TERMINAL:
            return doc
        if doc.get("halted"):
            raise ProvisioningError(
                f"workflow {wid} stopped ({doc['status']}): {doc['halted']}; "
                f"fix the cause, then: provisioning batch run --resume {wid}"
            )
        time.sleep(poll)


@ray.remote(num_cpus=0)
class _Probe:
    def cpu(self) -> float:
        return time.process_time()


def actor_start_cpu(samples: int = 3) -> float:
    """CPU seconds one new actor process costs before it runs anything (interpreter,
    ``import ray``, registration): what every operation actor pays once. The median of
    ``samples`` fresh actors, for the benchmarks."""
    costs = []
    for _ in range(samples):
        probe = _Probe.remote()  # type: ignore[attr-defined]
        costs.append(float(ray.get(probe.cpu.remote())))
        ray.kill(probe)
    return sorted(costs)[len(costs) // 2]


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
