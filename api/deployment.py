"""The REST app on Ray Serve, and the Ray-backed ``WorkflowBackend`` it uses.

The only module of ``api/`` that imports Ray. The app is built in the replica
(``__serve_build_asgi_app__``), after the constructor has received the token, so the
token travels as a constructor argument, not in an environment shown by the dashboard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors import orchestrator as orch_mod
from actors.names import CHECKPOINT, NAMESPACE, ORCHESTRATOR
from actors.runner import unwrap
from api.backend import ConflictError, NotFoundError
from api.intake import ApiLimits
from runtime.errors import InputError, ProvisioningError

Doc = dict[str, Any]
APP_NAME = "provisioning-api"
DEPLOYMENT_NAME = "api"


class OrchestratorUnavailableError(ProvisioningError):
    """The orchestrator actor cannot be reached (HTTP 503)."""


class RayBackend:
    """``WorkflowBackend`` over the named orchestrator and checkpoint actors."""

    def __init__(self) -> None:
        self._orch: Any = None
        self._checkpoint: Any = None

    def _handles(self) -> tuple[Any, Any]:
        if self._orch is None:
            try:
                self._orch = ray.get_actor(ORCHESTRATOR, namespace=NAMESPACE)
                self._checkpoint = ray.get_actor(CHECKPOINT, namespace=NAMESPACE)
            except ValueError as exc:
                raise OrchestratorUnavailableError(
                    "the orchestrator is not running: run `provisioning up`"
                ) from exc
        return self._orch, self._checkpoint

    async def _call(self, pick: Callable[[Any, Any], Any], *args: Any) -> Any:
        orch, checkpoint = self._handles()
        try:
            return await pick(orch, checkpoint).remote(*args)
        except (RayActorError, RayTaskError, GetTimeoutError) as exc:
            err = unwrap(exc)
            self._orch = None  # look the actors up again next time
            raise _translate(err) from None

    async def submit(self, spec: Doc, idempotency_key: str | None) -> Doc:
        return await self._call(lambda o, c: o.submit, spec, idempotency_key)  # type: ignore[no-any-return]

    async def get(self, workflow_id: str) -> Doc:
        return await self._call(lambda o, c: o.get, workflow_id)  # type: ignore[no-any-return]

    async def list(self, status: str | None) -> list[Doc]:
        return await self._call(lambda o, c: o.list, status)  # type: ignore[no-any-return]

    async def stats(self) -> Doc:
        return await self._call(lambda o, c: o.stats)  # type: ignore[no-any-return]

    async def cancel(self, workflow_id: str) -> Doc:
        return await self._call(lambda o, c: o.cancel, workflow_id)  # type: ignore[no-any-return]

    async def resume(self, workflow_id: str) -> Doc:
        return await self._call(lambda o, c: o.resume, workflow_id)  # type: ignore[no-any-return]

    async def rollback(self, workflow_id: str, operation: str | None) -> Doc:
        return await self._call(lambda o, c: o.rollback, workflow_id, operation)  # type: ignore[no-any-return]

    async def rollback_preview(self, workflow_id: str, operation: str | None) -> list[Doc]:
        return await self._call(lambda o, c: o.rollback_preview, workflow_id, operation)  # type: ignore[no-any-return]

    async def events(self, workflow_id: str, after_seq: int, limit: int, wait: float) -> list[Doc]:
        return await self._call(  # type: ignore[no-any-return]
            lambda o, c: c.events, workflow_id, after_seq, limit, wait
        )


def _translate(err: BaseException) -> BaseException:
    """The orchestrator's errors as the API's (its classes live with Ray, in actors/)."""
    if isinstance(err, orch_mod.NotFoundError):
        return NotFoundError(str(err))
    if isinstance(err, orch_mod.ConflictError):
        return ConflictError(str(err))
    if isinstance(err, InputError | ProvisioningError):
        return err
    return OrchestratorUnavailableError(f"orchestrator call failed: {type(err).__name__}: {err}")


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=100,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=10,
)
@serve.ingress()
class ApiDeployment:
    def __init__(self, token: str, limits: dict[str, Any], catalog_dirs: list[str] | None) -> None:
        self._token = token
        self._limits = ApiLimits(**limits)
        self._dirs = [Path(d) for d in catalog_dirs] if catalog_dirs is not None else None

    def __serve_build_asgi_app__(self) -> Any:
        from api.app import create_app

        return create_app(
            RayBackend(), token=self._token, limits=self._limits, catalog_dirs=self._dirs
        )


def deploy(
    token: str,
    *,
    host: str = "127.0.0.1",
    port: int = 9090,
    limits: ApiLimits | None = None,
    catalog_dirs: Sequence[Path] | None = None,
) -> None:
    """Start Serve's HTTP proxy on ``host:port`` and deploy the API (the driver may exit
    afterwards: Serve's controller is detached)."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO lines in `up`
    serve.start(http_options={"host": host, "port": port})
    dirs = [str(d) for d in catalog_dirs] if catalog_dirs is not None else None
    app = ApiDeployment.bind(token, asdict(limits or ApiLimits()), dirs)  # type: ignore[attr-defined]
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def undeploy() -> None:
    """Delete the API and stop Serve (its controller and proxies)."""
    try:
        serve.shutdown()
    except Exception:
        pass


# -- driver side of `provisioning up` / `down` -------------------------------------------


def bring_up(
    settings: Any,
    token: str,
    *,
    address: str,
    host: str,
    port: int,
    catalog_dirs: Sequence[Path],
) -> list[str]:
    """Connect to ``address``, get or create the detached orchestrator (it resumes the
    unfinished workflows), deploy the API. Returns the ids it resumed."""
    from actors import runner

    runner.connect(address)
    orch = runner.start_orchestrator(settings, detached=True, resume=True)
    resumed: list[str] = runner.call(orch.start)  # [] when start() already ran
    deploy(token, host=host, port=port, catalog_dirs=catalog_dirs)
    return resumed


def core_pids(address: str) -> dict[str, int]:
    """``name -> pid`` of the live actors of the run (ours and Serve's), on any node."""
    from ray.util.state import list_actors

    pids: dict[str, int] = {}
    for actor in list_actors(
        address=address,
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        raise_on_missing_output=False,
    ):
        namespace = getattr(actor, "ray_namespace", None)
        if actor.pid and (
            namespace in (NAMESPACE, "serve") or actor.class_name.startswith("Serve")
        ):
            pids[actor.name or actor.class_name] = int(actor.pid)
    return pids


def take_down(address: str) -> None:
    """On a cluster ``up`` did not start: stop Serve and kill the run's named actors
    (the orchestrator first, so it starts nothing more)."""
    from actors import runner

    runner.connect(address)
    undeploy()
    names = [
        i["name"]
        for i in ray.util.list_named_actors(all_namespaces=True)
        if i["namespace"] == NAMESPACE
    ]
    names.sort(key=lambda n: (n != ORCHESTRATOR, n.startswith(("checkpoint", "provider")), n))
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass
    runner.shutdown()
