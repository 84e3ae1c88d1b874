"""kill -9 of the whole orchestrator that ``provisioning up`` started, at each boundary
of the durability protocol; then ``provisioning up`` again resumes the workflow by
itself (nobody calls resume) and completes it: every item made exactly once on the
provider side, and the store equal to the provider's state.

Each test runs its own ``up`` (its own data dir and ports; never the session's
``service``). The crash point is armed in hold mode (runtime/crashpoints.py):
reaching it writes ``<data dir>/run/crashpoint`` and blocks that process, so nothing
gets past the boundary; the test then SIGKILLs every pid ``up`` recorded in
``<data dir>/run/pids`` (GCS, raylet, Serve, the core actors). The workflow and
operation actors, started after ``up`` wrote that file, must die with the raylet;
what is left of the head's session then (Ray's own daemons: dashboard, agents, log
monitor) is killed too, so nothing of the old instance runs when ``up`` starts again.
The sandbox runs in sessions of its own and must outlive all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.providers.upcloud import KEY_LABEL
from tests.e2e.conftest import REPO, Service, _kill_recorded, free_port
from tests.integration.faults import (
    assert_local_invariants,
    assert_no_resource_without_intent,
    assert_store_matches,
    local_creations,
    local_resources,
    server_items,
)
from tests.integration.test_faults_crash import kill_session, load_offline, session_pids

pytestmark = pytest.mark.e2e
Doc = dict[str, Any]
SERVERS = {"local": 10, "upcloud": 8}
# Worker titles of the run's actors (ours and Serve's).
OUR_ACTORS: tuple[bytes, ...] = tuple(
    b"ray::" + name
    for name in (b"Orchestrator", b"Checkpoint", b"ProviderPool", b"Workflow", b"Operation")
)
OUR_ACTORS += (b"ray::Serve", b"ray::Proxy")


def cli(
    env: dict[str, str], *args: str | Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_dead(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` seconds (none, hopefully)."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@dataclass
class Instance:
    """One ``provisioning up`` of a test, on a data dir and ports of its own."""

    base: Path
    sandbox: bool
    service: Service
    ports: dict[str, int]
    heads: list[Doc]  # every Ray head it started (up.json's "head"), for the teardown

    @property
    def data_dir(self) -> Path:
        return self.service.data_dir

    @property
    def marker(self) -> Path:
        return self.data_dir / "run" / "crashpoint"

    def up(self, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
        args: list[str | Path] = ["up", "--port", str(self.ports["api"])]
        args += ["--dashboard-port", str(free_port())]
        if self.sandbox:
            args += ["--sandbox", "--upcloud-port", str(self.ports["upcloud"])]
            args += ["--ec2-port", str(self.ports["ec2"]), "--ssh-port", str(self.ports["ssh"])]
        env = dict(self.service.env)
        if crash_at:
            env["PROVISIONING_CRASH_AT"] = f"{crash_at}:hold={self.marker}"
        started = time.monotonic()
        done = cli(env, *args)
        assert done.returncode == 0, f"up failed:\n{done.stdout}\n{done.stderr}"
        print(f"`provisioning up` took {time.monotonic() - started:.1f} s")
        self.heads.append(self.state()["head"])
        self.service.token = (self.data_dir / "token").read_text().strip()
        return done

    def down(self) -> None:
        started = time.monotonic()
        done = cli(self.service.env, "down", "--data-dir", self.data_dir, timeout=120)
        print(f"`provisioning down` took {time.monotonic() - started:.1f} s")
        assert done.returncode == 0, f"down failed:\n{done.stdout}\n{done.stderr}"

    def state(self) -> Doc:
        return json.loads((self.data_dir / "run" / "up.json").read_text())  # type: ignore[no-any-return]

    def sandbox_pids(self) -> dict[str, int]:
        path = self.data_dir / "sandbox" / "pids.json"
        return {name: int(e["pid"]) for name, e in json.loads(path.read_text()).items()}

    def live(self, provider: str) -> dict[str, str]:
        """key -> provider id of every server the provider holds (one per key, asserted)."""
        if provider == "local":
            return local_resources(self.data_dir)  # asserts one directory per key
        servers = self.service.emulator("GET", "/_admin/servers")["servers"]
        keys = [s["labels"].get(KEY_LABEL) for s in servers]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        assert not twice, f"servers made twice on the emulator: {twice}"
        return {s["labels"][KEY_LABEL]: s["uuid"] for s in servers}


@pytest.fixture
def instance(request: pytest.FixtureRequest) -> Iterator[Instance]:
    # Not pytest's tmp_path: see tests/e2e/conftest.py.
    base = Path(tempfile.mkdtemp(prefix="prov-crash-up-"))
    data_dir = base / "data"
    ports = {"api": free_port(), "upcloud": free_port(), "ec2": free_port(), "ssh": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISIONING_", "RAY_"))}
    env.update(
        PROVISIONING_DATA_DIR=str(data_dir),
        PROVISIONING_API_URL=f"http://127.0.0.1:{ports['api']}",
        PROVISIONING_LOCAL_READY_DELAY="0.1",  # keeps local items in flight
        RAY_USAGE_STATS_ENABLED="0",
    )
    service = Service(
        data_dir, env["PROVISIONING_API_URL"], f"http://127.0.0.1:{ports['upcloud']}", env, ""
    )
    inst = Instance(base, request.param == "upcloud", service, ports, [])
    try:
        yield inst
    finally:
        cli(env, "down", "--data-dir", data_dir, timeout=120)
        _kill_recorded(data_dir)
        for head in inst.heads:
            kill_session(int(head["pgid"]))
            shutil.rmtree(head["temp_dir"], ignore_errors=True)  # Ray's session files
        shutil.rmtree(base, ignore_errors=True)


def write_workflow(path: Path, provider: str, backend: str) -> None:
    plan, zone = ("local", "local") if provider == "local" else ("1xCPU-1GB", "de-fra1")
    configs = ", ".join(
        f'{{ name = "k-{i:02d}", plan = "{plan}", zone = "{zone}" }}'
        for i in range(SERVERS[provider])
    )
    path.write_text(
        f"""{{ batch_workflow = {{
  name = "crash-up", storage_backend = "{backend}", parallel_limit = 3,
  operations = [
    {{ id = "fleet", type = "server_batch", provider = "{provider}",
       server_configs = [{configs}] }},
    {{ id = "runtime", type = "taskserv_batch", dependencies = ["fleet"],
       taskservs = ["containerd"] }},
  ] }} }}
"""
    )


def await_marker(inst: Instance, wid: str, timeout: float = 150) -> Doc:
    """The crash point's marker. The API is not asked meanwhile: once the point holds,
    a status request can wait on the blocked actor."""
    deadline = time.monotonic() + timeout
    while not inst.marker.exists():
        if time.monotonic() > deadline:
            try:
                with inst.service.http() as c:
                    c.timeout = httpx.Timeout(10)
                    status = c.get(f"/v1/workflows/batch/{wid}").json()["status"]
            except httpx.HTTPError as exc:
                status = repr(exc)
            raise AssertionError(f"crash point not reached in {timeout} s; {wid}: {status}")
        time.sleep(0.05)
    return json.loads(inst.marker.read_text())  # type: ignore[no-any-return]


def kill_orchestrator(inst: Instance, held: int) -> None:
    """SIGKILL every pid ``up`` recorded; check that the rest of the orchestrator (the
    held process, the workflow and operation actors) went down with them; then clear
    what is left of the head's session. The sandbox is left alone."""
    head_sid = int(inst.state()["head"]["pgid"])  # `ray start` ran in a session of its own
    recorded = [int(p) for p in (inst.data_dir / "run" / "pids").read_text().split()]
    assert len(recorded) >= 8, recorded  # gcs_server, raylet, 3 of Serve, 3 of ours
    assert all(alive(p) for p in recorded), "a recorded pid was dead before the kill"
    sandbox = inst.sandbox_pids() if inst.sandbox else {}
    assert not set(sandbox.values()) & set(session_pids(head_sid))
    for pid in recorded:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not wait_dead(recorded, 10), "recorded pids survived SIGKILL"
    # Unrecorded actors (workflow, operation, and the one holding the crash point) die
    # with the raylet: a worker that outlived it could still reach the provider.
    assert not wait_dead([held], 30), f"the held process {held} outlived the raylet"
    ours = [p for p in session_pids(head_sid) if cmdline(p).startswith(OUR_ACTORS)]
    assert not wait_dead(ours, 30), [cmdline(p)[:60] for p in ours if alive(p)]
    # Ray's daemons of that head (dashboard, its agents, log monitor, autoscaler
    # monitor, client server) stay up without a GCS: as after a power cut, nothing of
    # the old instance may run when `up` starts again.
    kill_session(head_sid)
    assert not wait_dead(session_pids(head_sid), 10), "the old head's session survived"
    assert all(alive(p) for p in sandbox.values()), "the kill took the sandbox down"


CASES = [
    # point, provider, storage backend
    ("before_intent:5:create", "local", "filesystem"),
    ("after_intent:5:create", "local", "surrealdb"),
    ("after_call:4:create", "upcloud", "surrealdb"),  # UpCloud: no token, found by label
    ("during_commit:6", "local", "filesystem"),
]


@pytest.mark.parametrize(
    "point, instance, backend",
    CASES,
    indirect=["instance"],
    ids=[c[0].split(":")[0] for c in CASES],
)
def test_kill_up_at_a_durability_boundary_then_up_resumes(
    point: str, instance: Instance, backend: str, tmp_path: Path
) -> None:
    inst = instance
    provider = "upcloud" if inst.sandbox else "local"
    total = SERVERS[provider]
    wf = tmp_path / "wf.ncl"
    write_workflow(wf, provider, backend)

    inst.up(crash_at=point)
    submitted = inst.service.cli("batch", "submit", wf, "--json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    wid = json.loads(submitted.stdout)["id"]
    hit = await_marker(inst, wid)
    assert hit["point"] == point.split(":")[0], hit
    sandbox_before = inst.sandbox_pids() if inst.sandbox else {}

    kill_orchestrator(inst, held=int(hit["pid"]))

    # The store as the crash left it (offline: the lock is free, its owner is dead).
    docs = load_offline(inst.data_dir, backend, wid)
    assert docs[("workflow", "")]["status"] in ("Pending", "Running"), docs[("workflow", "")]
    live = inst.live(provider)
    assert_no_resource_without_intent(docs, live)
    servers = server_items(docs)
    n = int(point.split(":")[1])
    intents = [d for d in servers.values() if d.get("intent")]
    if point.startswith("before_intent"):
        # Held before the n-th intent: at most n - 1 intents, and nothing made past them.
        assert len(intents) <= n - 1 and len(live) <= n - 1, (len(intents), len(live))
    if point.startswith("after_intent"):
        # An intent is durable for a server that was never made: resume must make it.
        assert any(d["key"] not in live for d in intents)
    if point.startswith("after_call"):
        # The crash made a server the store has no result for: resume must adopt it.
        assert any(d["key"] in live and not d.get("result") for d in servers.values())
    if not point.startswith("during_commit"):  # held in the middle of the fleet
        assert len(live) < total

    # Up again, without the crash point: the orchestrator resumes the workflow itself.
    inst.marker.unlink()
    again = inst.up()
    assert f"resumed 1 unfinished workflow(s): {wid}" in again.stdout, again.stdout
    if inst.sandbox:
        # The stand-ins outlive the orchestrator: `up` reuses them (they hold the state
        # the resumed run reconciles against).
        assert inst.sandbox_pids() == sandbox_before
    resumed = time.monotonic()
    doc = inst.service.wait(wid, timeout=240)
    print(f"the resumed workflow finished in {time.monotonic() - resumed:.1f} s")
    assert doc["status"] == "Completed", doc
    assert {op["id"]: op["counts"] for op in doc["operations"]} == {
        "fleet": {"Completed": total},
        "runtime": {"Completed": total},
    }
    live = inst.live(provider)  # before `down`, which stops the emulator
    assert len(live) == total
    if provider == "upcloud":  # the same emulator process throughout: one create per key
        calls = inst.service.emulator("GET", "/_admin/stats")["calls"]
        assert calls.get("POST /1.3/server") == total, calls
    inst.down()

    final = load_offline(inst.data_dir, backend, wid)
    if provider == "local":
        assert_local_invariants(inst.data_dir, final)
        assert sum(local_creations(inst.data_dir).values()) == total  # each made once
    else:
        assert_store_matches(final, live)
    assert {d["status"] for (kind, _), d in final.items() if kind == "item"} == {"Completed"}


def test_hold_mode_marks_then_blocks_and_plain_specs_parse_as_before(tmp_path: Path) -> None:
    from runtime import crashpoints

    marker = tmp_path / "crashpoint"
    spec = f"after_call:2:create:hold={marker}"
    assert crashpoints.parse(spec) == ("after_call", 2, "create")
    assert crashpoints.parse(f"during_commit:3:hold={marker}") == ("during_commit", 3, None)
    assert crashpoints.split_hold("after_call:2") == ("after_call:2", None)
    with pytest.raises(ValueError):
        crashpoints.parse("after_call:2:hold=relative/marker")
    # In a process of its own: the second hit writes the marker and never returns.
    code = (
        "import sys; from runtime import crashpoints as c; c.configure(sys.argv[1]);"
        "c.crash_point('after_call', 'create'); print('first', flush=True);"
        "c.crash_point('after_call', 'delete'); c.crash_point('after_call', 'create');"
        "print('past the boundary', flush=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, spec], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.05)
        hit = json.loads(marker.read_text())
        assert hit == {"point": "after_call", "action": "create", "hit": 2, "pid": proc.pid}
        time.sleep(0.5)
        assert proc.poll() is None  # held, not killed, not carried on
    finally:
        proc.kill()
        out, _ = proc.communicate()
    assert out == "first\n"
