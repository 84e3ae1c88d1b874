"""An UpCloud API 1.3 emulator for the sandbox: ``create_app()`` and a CLI that serves it.

Covers what the ``upcloud-api`` client and ``runtime.providers.upcloud`` call: servers
(create, get, list with label filters, start, stop, delete), plans, zones and the
account. Errors have UpCloud's shape ``{"error": {"error_code", "error_message"}}``.
Faults are switched at run time through ``/_admin`` (see ``upcloud_faults``).

    python -m runtime.sandbox.upcloud_emulator --port 9091 --data-dir DIR
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.sandbox.upcloud_faults import FaultConfig, FaultInjector, FaultMiddleware
from runtime.sandbox.upcloud_service import ApiError, Emulator
from runtime.sandbox.upcloud_state import (
    PLANS,
    TEMPLATES,
    ZONES,
    ServerStore,
    render_server,
    render_summary,
)

STATE_FILE_NAME = "upcloud-emulator.json"
DEFAULT_USERNAME = "sandbox"
# Well-known sandbox credentials: the emulator guards nothing of value.
DEFAULT_PASSWORD = "sandbox"
DEFAULT_TOKEN = "sandbox-token"


def _error(status: int, code: str, message: str) -> JSONResponse:
    body = {"error": {"error_code": code, "error_message": message}}
    return JSONResponse(body, status_code=status)


def _label_filters(request: Request) -> list[tuple[str, str | None]]:
    filters: list[tuple[str, str | None]] = []
    for raw in request.query_params.getlist("label"):
        key, sep, value = raw.partition("=")
        filters.append((key, value if sep else None))
    return filters


def _loopback_only(request: Request) -> None:
    host = request.client.host if request.client else ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host in ("testclient", "localhost"):
            return
    raise ApiError(403, "FORBIDDEN", "The admin routes answer loopback clients only.")


def create_app(
    state_file: Path | None,
    *,
    ready_delay: float = 0.5,
    stop_delay: float = 0.1,
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    token: str = DEFAULT_TOKEN,
    faults: FaultConfig | None = None,
    persist_delay: float = 0.0,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The emulator app. ``state_file=None`` keeps servers in memory only.

    ``faults`` (when given) wins over ``ready_delay``/``stop_delay`` and is also what
    ``POST /_admin/reset`` returns to.
    """
    config = faults or FaultConfig(ready_delay=ready_delay, stop_delay=stop_delay)
    emulator = Emulator(
        ServerStore.load(state_file),
        FaultInjector(config),
        credentials=(username, password),
        token=token,
        persist_delay=persist_delay,
        clock=clock,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        emulator.flush()

    app = FastAPI(title="UpCloud API 1.3 emulator", lifespan=lifespan, openapi_url=None)
    app.state.emulator = emulator
    app.add_middleware(FaultMiddleware, injector=emulator.injector, authorize=emulator.authorize)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "BAD_REQUEST")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "REQUEST_INVALID", str(exc.errors()[:3]))

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise ApiError(400, "JSON_INVALID", "The request body is not valid JSON.") from None

    @app.get("/1.3/account")
    async def account() -> dict[str, Any]:
        limits = {"cores": 10000, "memory": 10**7, "public_ipv4": 10**6, "storage_maxiops": 10**7}
        return {"account": {"username": username, "credits": 100000, "resource_limits": limits}}

    @app.get("/1.3/zone")
    async def zones() -> dict[str, Any]:
        zone_list = [{"id": z, "description": d, "public": "yes"} for z, d in ZONES.items()]
        return {"zones": {"zone": zone_list}}

    @app.get("/1.3/plan")
    async def plans() -> dict[str, Any]:
        plan_list = [
            {
                "name": name,
                "core_number": cores,
                "memory_amount": memory,
                "storage_size": storage,
                "storage_tier": "maxiops",
                "public_traffic_out": 1024 * cores,
            }
            for name, (cores, memory, storage) in PLANS.items()
        ]
        return {"plans": {"plan": plan_list}}

    @app.get("/1.3/storage/template")
    async def templates() -> dict[str, Any]:
        items = [
            {"uuid": u, "title": t, "type": "template", "access": "public"}
            for u, t in TEMPLATES.items()
        ]
        return {"storages": {"storage": items}}

    @app.get("/1.3/server")
    async def list_servers(request: Request) -> dict[str, Any]:
        filters = _label_filters(request)
        now = clock()
        found = [
            render_summary(r, now) for r in emulator.store.servers.values() if r.matches(filters)
        ]
        return {"servers": {"server": found}}

    @app.post("/1.3/server", status_code=202)
    async def create_server(request: Request) -> dict[str, Any]:
        record = emulator.create(await json_body(request))
        return {"server": render_server(record, clock())}

    @app.get("/1.3/server/{uuid}")
    async def get_server(uuid: str) -> dict[str, Any]:
        return {"server": render_server(emulator.get(uuid), clock())}

    @app.post("/1.3/server/{uuid}/stop", status_code=202)
    async def stop_server(uuid: str) -> dict[str, Any]:
        # Real UpCloud answers with the server still "started"; the stop happens after.
        record = emulator.stop(uuid)
        server = render_server(record, clock())
        server["state"] = "started"
        return {"server": server}

    @app.post("/1.3/server/{uuid}/start")
    async def start_server(uuid: str) -> dict[str, Any]:
        return {"server": render_server(emulator.start(uuid), clock())}

    @app.delete("/1.3/server/{uuid}", status_code=204)
    async def delete_server(uuid: str) -> Response:
        emulator.delete(uuid)
        return Response(status_code=204)

    @app.get("/_admin/faults")
    async def get_faults(request: Request) -> dict[str, Any]:
        _loopback_only(request)
        return emulator.injector.config.model_dump()

    @app.put("/_admin/faults")
    async def put_faults(request: Request) -> Any:
        _loopback_only(request)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "FAULTS_INVALID", "The body must be a JSON object.")
        try:
            return emulator.injector.update(body).model_dump()
        except ValidationError as exc:
            return _error(400, "FAULTS_INVALID", str(exc.errors(include_url=False)))

    @app.get("/_admin/stats")
    async def get_stats(request: Request) -> dict[str, Any]:
        _loopback_only(request)
        return emulator.injector.stats.to_dict() | {"servers": len(emulator.store.servers)}

    @app.post("/_admin/reset")
    async def reset(request: Request, servers: bool = False) -> dict[str, Any]:
        """Faults back to their startup values and counters to zero; ``?servers=true``
        also forgets every server."""
        _loopback_only(request)
        emulator.injector.reset()
        if servers:
            emulator.store.servers.clear()
            emulator.persist()
        return {"faults": emulator.injector.config.model_dump()}

    @app.get("/_admin/servers")
    async def admin_servers(request: Request) -> dict[str, Any]:
        """Name -> address map for the sandbox's SSH endpoint (no auth, loopback only)."""
        _loopback_only(request)
        now = clock()
        items = [
            {
                "uuid": r.uuid,
                "hostname": r.hostname,
                "title": r.title,
                "state": r.state_at(now),
                "public_ip": r.public_ip,
                "utility_ip": r.utility_ip,
                "labels": dict(r.labels),
            }
            for r in emulator.store.servers.values()
        ]
        return {"servers": items}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m runtime.sandbox.upcloud_emulator")
    parser.add_argument("--port", type=int, default=9091)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--ready-delay", type=float, default=0.5)
    parser.add_argument("--stop-delay", type=float, default=0.1)
    parser.add_argument("--persist-delay", type=float, default=0.0)
    parser.add_argument("--username", default=DEFAULT_USERNAME)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    app = create_app(
        args.data_dir / STATE_FILE_NAME,
        ready_delay=args.ready_delay,
        stop_delay=args.stop_delay,
        username=args.username,
        password=args.password,
        token=args.token,
        persist_delay=args.persist_delay,
    )
    # Loopback only: the admin routes have no authentication.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
