"""An httpx client of the REST API: what the CLI's remote commands use.

Base URL from ``PROVISIONING_API_URL`` (default http://127.0.0.1:9090), token from
``PROVISIONING_API_TOKEN`` or ``<data dir>/token``. Connection failures become
``ApiUnreachableError``; error responses become ``ApiError`` with the problem document.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, connect_sse

from runtime.errors import InputError, ProvisioningError
from runtime.settings import Settings

Doc = dict[str, Any]
PREFIX = "/v1/workflows/batch"


class ApiUnreachableError(ProvisioningError):
    def __init__(self, url: str, cause: str = "") -> None:
        super().__init__(f"cannot reach the orchestrator at {url}: run `provisioning up`")
        self.url, self.cause = url, cause


class ApiError(ProvisioningError):
    """An error response; ``status`` and the RFC 9457 ``problem`` document."""

    def __init__(self, status: int, problem: Doc) -> None:
        detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        super().__init__(f"{detail} (HTTP {status})")
        self.status, self.problem = status, problem


class ApiInputError(ApiError, InputError):
    """A 4xx: the request (the workflow, the id, the token) is wrong."""


def read_token(settings: Settings) -> str | None:
    if settings.api_token:
        return settings.api_token
    try:
        return settings.token_file.read_text().strip() or None
    except OSError:
        return None


class ApiClient:
    def __init__(self, base_url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiClient:
        return cls(settings.api_url, read_token(settings))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ApiUnreachableError(self.base_url, str(exc)) from None
        check(resp)
        return resp.json()

    # -- the API ----------------------------------------------------------------------

    def health(self) -> bool:
        try:
            return self.http.get("/v1/health", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def submit_file(self, path: Path, idempotency_key: str | None = None) -> Doc:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            body: Doc = {"workflow": json.loads(text), "filename": str(path)}
        else:
            body = {"source": text, "filename": str(path)}
        return self.request("POST", f"{PREFIX}/submit", json=body, headers=headers)  # type: ignore[no-any-return]

    def get(self, wid: str) -> Doc:
        return self.request("GET", f"{PREFIX}/{wid}")  # type: ignore[no-any-return]

    def list(self, status: str | None = None, page_size: int = 500) -> list[Doc]:
        out: list[Doc] = []
        cursor = None
        while True:
            params: Doc = {"limit": page_size}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self.request("GET", PREFIX, params=params)
            out.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def stats(self) -> Doc:
        return self.request("GET", f"{PREFIX}/stats")  # type: ignore[no-any-return]

    def action(self, wid: str, verb: str, body: Doc | None = None) -> Doc:
        return self.request("POST", f"{PREFIX}/{wid}/{verb}", json=body)  # type: ignore[no-any-return]

    def events(self, wid: str, last_event_id: int | None = None) -> Iterator[ServerSentEvent]:
        """The progress stream until it ends, reconnecting with ``Last-Event-ID`` when the
        connection drops (a few times, then the error is raised)."""
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = str(last_event_id)
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    f"{PREFIX}/{wid}/progress",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=60.0),
                ) as source:
                    check(source.response)
                    for event in source.iter_sse():
                        failures = 0
                        if event.id:
                            last_event_id = int(event.id)
                        yield event
                return
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if failures >= 5:
                    raise ApiUnreachableError(self.base_url, str(exc)) from None
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout):
                if failures >= 5:
                    raise
            failures += 1
            time.sleep(min(5.0, 0.5 * 2**failures))


def check(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        resp.read()
        problem = resp.json()
    except (ValueError, httpx.HTTPError):
        problem = {"detail": resp.text[:500] if resp.is_stream_consumed else ""}
    if not isinstance(problem, dict):
        problem = {"detail": str(problem)}
    cls = ApiInputError if resp.status_code < 500 else ApiError
    raise cls(resp.status_code, problem)
