"""The REST API on Ray Serve: submit-to-first-item latency, and status latency under
concurrent clients.

- submit -> 202: the POST of a small local workflow (Nickel evaluated server-side in
  the bounded worker, planned, registered by the orchestrator);
- submit -> first item: from the POST until the progress stream delivers the first
  item event (workflow actor and operation actor creation included);
- status under N clients: GET /v1/workflows/batch/{id} from N concurrent clients,
  beside GET /v1/health (Serve alone, no orchestrator call) as the floor.

Starts its own ``provisioning up`` (temporary data dir, free ports, no sandbox) and
stops it after, unless ``--url`` points at a running one (token from
``PROVISIONING_API_TOKEN`` or ``--token``).

    .venv/bin/python -m bench.api_bench [--submits 10] [--requests 2000] [--clients 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
P = "/v1/workflows/batch"
SERVERS = ", ".join(f'{{ name = "b{i}", plan = "local", zone = "local" }}' for i in range(5))
SOURCE = f"""{{ batch_workflow = {{ name = "bench", parallel_limit = 5, operations = [
  {{ id = "servers", type = "server_batch", provider = "local", server_configs = [{SERVERS}] }}
] }} }}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(url: str | None, token: str | None) -> Iterator[tuple[str, str]]:
    if url:
        yield url, token or os.environ["PROVISIONING_API_TOKEN"]
        return
    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmp:
        data = Path(tmp) / "data"
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONING_")}
        cli = [sys.executable, "-m", "api.cli"]
        started = time.monotonic()
        subprocess.run(
            [*cli, "up", "--port", str(port), "--data-dir", str(data),
             "--dashboard-port", str(_free_port())],
            cwd=REPO, env=env, check=True, capture_output=True,
        )  # fmt: skip
        print(f"(provisioning up took {time.monotonic() - started:.1f} s)\n")
        try:
            yield f"http://127.0.0.1:{port}", (data / "token").read_text().strip()
        finally:
            subprocess.run(
                [*cli, "down", "--data-dir", str(data)], cwd=REPO, env=env, capture_output=True
            )


def submit_to_first_item(client: httpx.Client) -> tuple[float, float]:
    """Seconds from the POST to its 202, and to the first item event."""
    start = time.perf_counter()
    resp = client.post(f"{P}/submit", json={"source": SOURCE, "filename": "bench.ncl"})
    resp.raise_for_status()
    accepted = time.perf_counter() - start
    wid = resp.json()["id"]
    headers = {"Accept": "text/event-stream"}
    with client.stream("GET", f"{P}/{wid}/progress", headers=headers) as stream:
        for line in stream.iter_lines():
            if line == "event: item":
                return accepted, time.perf_counter() - start
    raise RuntimeError(f"{wid}: the stream ended without an item event")


async def hammer(url: str, token: str, path: str, requests: int, clients: int) -> list[float]:
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                start = time.perf_counter()
                (await c.get(path)).raise_for_status()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--url", help="a running API (default: start one)")
    parser.add_argument("--token")
    args = parser.parse_args()

    with service(args.url, args.token) as (url, token):
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            submit_to_first_item(client)  # warm-up: the evaluator's workers, first actors
            runs = [submit_to_first_item(client) for _ in range(args.submits)]
            wid = client.get(P, params={"limit": 1}).json()["items"][0]["id"]
        rows = []
        for name, path in (("health (Serve only)", "/v1/health"), ("status", f"{P}/{wid}")):
            start = time.perf_counter()
            lat = asyncio.run(hammer(url, token, path, args.requests, args.clients))
            rate = len(lat) / (time.perf_counter() - start)
            rows.append((name, pct(lat, 0.5), pct(lat, 0.99), rate))

    accepted = [a for a, _ in runs]
    first = [f for _, f in runs]
    print(f"{args.submits} sequential submissions of a 5-item local workflow (Nickel source)\n")
    print(f"{'':<24} {'p50 ms':>8} {'max ms':>8}")
    for label, values in (("submit -> 202", accepted), ("submit -> first item", first)):
        mid, top = statistics.median(values) * 1000, max(values) * 1000
        print(f"{label:<24} {mid:>8.0f} {top:>8.0f}")
    print(f"\n{args.requests} GETs from {args.clients} concurrent clients\n")
    print(f"{'route':<24} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for name, p50, p99, rate in rows:
        print(f"{name:<24} {p50 * 1000:>8.1f} {p99 * 1000:>8.1f} {rate:>8.0f}")
    print(
        "\nreproduce: .venv/bin/python -m bench.api_bench "
        f"--submits {args.submits} --requests {args.requests} --clients {args.clients}"
    )


if __name__ == "__main__":
    main()
