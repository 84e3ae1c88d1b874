"""The progress stream as Server-Sent Events.

Every checkpoint event goes out with ``id: <seq>`` (the checkpoint's sequence number),
so a client that reconnects with ``Last-Event-ID`` gets exactly the events after the
last one it saw. Between them, ``status`` events (without an id, so they never move
the client's position) carry the whole status document for progress bars. The stream
ends after the workflow's terminal event, once the workflow really is terminal (a
Failed workflow may go on to roll back).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from api.backend import TERMINAL, WorkflowBackend

Doc = dict[str, Any]
BATCH = 500
WAIT = 5.0  # seconds one backend call waits for new events
KEEPALIVE = 15.0
STATUS_EVERY = 0.5  # seconds between status documents while events flow


def sse(data: Any, *, event: str | None = None, id: int | None = None) -> str:
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event:
        lines.append(f"event: {event}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


async def progress_events(
    backend: WorkflowBackend, workflow_id: str, after: int, first: Doc
) -> AsyncIterator[str]:
    """``first`` is the status document fetched before the response started (so an
    unknown id is a 404, not an empty stream)."""
    yield "retry: 1000\n\n"
    yield sse(first, event="status")
    last_sent = last_status = time.monotonic()
    last_check = 0.0
    last_doc = first
    while True:
        events = await backend.events(workflow_id, after, BATCH, WAIT)
        if events:
            for ev in events:
                after = int(ev["seq"])
                yield sse(ev, event=str(ev.get("type") or "message"), id=after)
            last_sent = time.monotonic()
            terminal_seen = any(
                ev.get("type") == "workflow" and (ev.get("data") or {}).get("status") in TERMINAL
                for ev in events
            )
            if len(events) >= BATCH and not terminal_seen:
                continue  # catching up: no status documents until we are live
            if terminal_seen or last_sent - last_status >= STATUS_EVERY:
                doc = last_doc = await backend.get(workflow_id)
                last_status = time.monotonic()
                yield sse(doc, event="status")
                if (
                    terminal_seen
                    and doc.get("status") in TERMINAL
                    and not await backend.events(workflow_id, after, 1, 0.0)
                ):
                    return
            continue
        if time.monotonic() - last_check < 1.0:
            # Woken by another workflow's events: do not poll the status on each wake-up.
            await asyncio.sleep(0.1)
            continue
        doc = await backend.get(workflow_id)
        last_check = time.monotonic()
        if doc.get("status") in TERMINAL:
            # Terminal and nothing new: flush what was written meanwhile, then end.
            tail = await backend.events(workflow_id, after, BATCH, 0.0)
            for ev in tail:
                after = int(ev["seq"])
                yield sse(ev, event=str(ev.get("type") or "message"), id=after)
            yield sse(doc, event="status")
            return
        if doc != last_doc:  # e.g. items in flight: live counts move between events
            last_doc = doc
            last_sent = time.monotonic()
            yield sse(doc, event="status")
        elif time.monotonic() - last_sent >= KEEPALIVE:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
