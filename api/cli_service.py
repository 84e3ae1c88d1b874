"""``provisioning up`` and ``provisioning down``: the orchestrator as a background service.

``up`` starts (unless ``--address`` names a cluster) a local Ray head with ``ray
start --head`` in a session of its own, on free ports and a private temp dir, so it
never meets another Ray instance on the machine; a short-lived driver then creates
the detached orchestrator (which resumes unfinished workflows) and deploys the API
on Serve, and exits. ``<data dir>/run/up.json`` records what ``up`` started;
``<data dir>/run/pids`` lists the core processes (gcs_server, raylet, Serve, the
run's actors), one pid a line, for operators and crash tests.

``down`` stops what ``up`` started, by what it recorded: the head's process group
(checked to still be that head), or, on a cluster it joined, Serve and the run's
actors; then the sandbox. It never runs ``ray stop``, which stops every Ray
instance of the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from api.terminal import err, out
from runtime.errors import InputError, ProvisioningError
from runtime.settings import Settings
from schemas.catalog import catalog_dirs

Doc = dict[str, Any]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $PROVISIONING_DATA_DIR)."),
]


def up(
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Also start the local stand-ins (UpCloud emulator, moto EC2, SSH endpoint) "
            "and use them.",
        ),
    ] = False,
    port: Annotated[int, typer.Option(help="API port.")] = 9090,
    host: Annotated[
        str, typer.Option(help="API address to bind (loopback unless told).")
    ] = "127.0.0.1",
    data_dir: DataDirOpt = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Join this Ray cluster instead of starting a local head."),
    ] = None,
    dashboard_port: Annotated[
        int, typer.Option(help="Ray dashboard port (another free one if taken).")
    ] = 8265,
    upcloud_port: Annotated[int, typer.Option(help="Sandbox UpCloud emulator port.")] = 9091,
    ec2_port: Annotated[int, typer.Option(help="Sandbox moto EC2 port.")] = 9092,
    ssh_port: Annotated[int, typer.Option(help="Sandbox SSH endpoint port.")] = 9093,
) -> None:
    """Start the orchestrator and the REST API in the background, then exit."""
    settings = Settings.from_env().with_data_dir(data_dir)
    settings = replace(settings, data_dir=settings.data_dir.resolve())
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(run_dir)
    if state and _answers(state["api_url"]):
        out.print(
            f"already up: API {state['api_url']}, dashboard {state.get('dashboard_url') or '-'}"
        )
        out.print(
            f"stop it with: provisioning down --data-dir {settings.data_dir}", highlight=False
        )
        return
    if state:
        err.print("a previous `up` left state behind but its API does not answer: cleaning up")
        # The sandbox outlives a crashed orchestrator on purpose: it holds the servers the
        # resumed workflows reconcile against (moto keeps them in memory only).
        # `up --sandbox` reuses it; Sandbox.start() replaces what no longer answers.
        _stop(settings, state, quiet=True, keep_sandbox=sandbox)
    if not _port_free(host, port):
        raise InputError(f"port {port} on {host} is taken: choose another with --port")

    state: Doc = {"api_url": f"http://{host}:{port}", "host": host, "port": port, "head": None}
    try:
        head_proc = None
        if address is None:
            err.print("starting a local Ray head")
            head_proc, state["head"] = launch_head(settings.data_dir, dashboard_port)
            address = state["head"]["address"]
            state["dashboard_url"] = state["head"]["dashboard_url"]
        state["ray_address"] = address
        _write_state(run_dir, state)  # now: a failure below must still be cleaned up by down
        if sandbox:  # while Ray starts
            from runtime.sandbox.launcher import Sandbox, SandboxPorts

            ports = SandboxPorts(upcloud=upcloud_port, ec2=ec2_port, ssh=ssh_port)
            err.print(
                f"starting the sandbox (UpCloud :{upcloud_port}, EC2 :{ec2_port}, SSH :{ssh_port})"
            )
            stand_ins = Sandbox(settings.data_dir, ports).start()
            settings = replace(settings, provider_env=stand_ins.env())
            state["sandbox"] = True
        if head_proc is not None:
            await_head(head_proc, state["head"], settings.data_dir)
        token = settings.api_token or _new_token(settings.token_file)
        if state["head"]:
            os.environ.update(ray_auth_env(settings.data_dir))  # for this driver
        from api import deployment  # Ray is imported only here

        dirs = catalog_dirs(
            {"PROVISIONING_TASKSERV_PATH": ":".join(map(str, settings.taskserv_path))}
        )
        err.print("starting the orchestrator and the API")
        resumed = deployment.bring_up(
            settings, token, address=address, host=host, port=port, catalog_dirs=dirs
        )
        _wait_answers(state["api_url"], 90)
        pids = dict(deployment.core_pids(address))
        if state["head"]:
            pids.update(_head_pids(state["head"]))
        (run_dir / "pids").write_text("".join(f"{p}\n" for p in sorted(set(pids.values()))))
        state["pids"] = pids
        _write_state(run_dir, state)
    except BaseException as exc:
        err.print(f"[red]up failed[/] ({type(exc).__name__}: {exc}): stopping what it started")
        _disconnect()
        _stop(settings, state, quiet=True)
        raise
    _disconnect()
    out.print(f"API        {state['api_url']}  (OpenAPI: {state['api_url']}/docs)")
    if state.get("dashboard_url"):
        out.print(f"dashboard  {state['dashboard_url']}  (Actors tab, namespace provisioning)")
    if resumed:
        out.print(f"resumed {len(resumed)} unfinished workflow(s): {', '.join(resumed)}")
    token_hint = "PROVISIONING_API_TOKEN" if settings.api_token else str(settings.token_file)
    out.print(f"token      {token_hint}", highlight=False)
    out.print(f"stop with  provisioning down --data-dir {settings.data_dir}", highlight=False)


def down(data_dir: DataDirOpt = None) -> None:
    """Stop what `provisioning up` started: the API, the orchestrator, Ray, the sandbox."""
    settings = Settings.from_env().with_data_dir(data_dir)
    settings = replace(settings, data_dir=settings.data_dir.resolve())
    state = _read_state(settings.run_dir)
    if state is None and not (settings.data_dir / "sandbox" / "pids.json").exists():
        out.print(f"nothing to stop: no `provisioning up` recorded in {settings.data_dir}")
        return
    _stop(settings, state or {}, quiet=False)
    out.print("stopped")


# -- the Ray head ------------------------------------------------------------------------


def launch_head(data_dir: Path, dashboard_port: int) -> tuple[subprocess.Popen[bytes], Doc]:
    """Launch ``ray start --head`` in a new session: every Ray process it starts is in
    the process group whose id is recorded, which is how ``down`` stops exactly them.
    ``await_head`` waits for it."""
    # Short (unix socket paths are limited to 107 bytes) and private to this data dir.
    temp_dir = Path("/tmp") / f"prov-ray-{hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]}"
    gcs, dash = _free_port(6379), _free_port(dashboard_port)
    ports = {
        "--port": gcs,
        "--dashboard-port": dash,
        "--ray-client-server-port": _free_port(10001),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
    }
    ray_bin = Path(sys.executable).with_name("ray")
    argv = [str(ray_bin if ray_bin.exists() else shutil.which("ray") or "ray"), "start", "--head"]
    for flag, value in ports.items():
        argv += [flag, str(value)]
    argv += [
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        # 0: workers take ports the OS picks, never one chosen above.
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--include-dashboard",
        "true",
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(ray_auth_env(data_dir))
    log_path = data_dir / "run" / "ray-start.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
    head = {
        "pgid": proc.pid,
        "temp_dir": str(temp_dir),
        "address": f"127.0.0.1:{gcs}",
        "dashboard_url": f"http://127.0.0.1:{dash}",
        "metrics_port": ports["--metrics-export-port"],
    }
    return proc, head


def await_head(proc: subprocess.Popen[bytes], head: Doc, data_dir: Path) -> None:
    try:
        code = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        code = -1
    if code != 0:
        stop_head(head)
        tail = (data_dir / "run" / "ray-start.log").read_text(errors="replace")[-3000:]
        raise ProvisioningError(f"`ray start --head` failed (exit {code}):\n{tail}")


def ray_auth_env(data_dir: Path) -> dict[str, str]:
    """Ray's token authentication with a token of this data dir's own (not the user's
    ``~/.ray/auth_token``, which another Ray instance on the machine may use)."""
    path = data_dir / "run" / "ray-auth-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            found.append(int(entry.name))
    return found


def _is_our_head(head: Doc, pid: int) -> bool:
    try:
        return head["temp_dir"].encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _head_pids(head: Doc) -> dict[str, int]:
    pids = {}
    for pid in _group(int(head["pgid"])):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in ("gcs_server", "raylet"):
            pids[name] = pid
    return pids


TERM_GRACE = 1.5  # seconds


def stop_head(head: Doc, timeout: float = 6.0) -> None:
    """TERM, then KILL, the head's process group, if it still is that head (some of
    Ray's agents ignore SIGTERM)."""
    pgid = int(head["pgid"])
    members = _group(pgid)
    if not members or not any(_is_our_head(head, p) for p in members):
        return  # gone, or the group id now belongs to someone else
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        # A short grace for TERM: the GCS and raylet wait for agents that ignore it, and
        # nothing needs it (every write is durable when acknowledged).
        deadline = time.monotonic() + (TERM_GRACE if sig == signal.SIGTERM else timeout)
        while _group(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group(pgid):
            break
    if not _group(pgid):  # Ray's session files and logs, ours alone (see launch_head)
        shutil.rmtree(head["temp_dir"], ignore_errors=True)


# -- shared ----------------------------------------------------------------------------


def _stop(settings: Settings, state: Doc, *, quiet: bool, keep_sandbox: bool = False) -> None:
    head = state.get("head")
    if head:
        if not quiet:
            err.print("stopping the Ray head (API, orchestrator, workers)")
        stop_head(head)
    elif state.get("ray_address"):
        if not quiet:
            err.print(f"stopping the API and the orchestrator on {state['ray_address']}")
        try:
            from api import deployment

            deployment.take_down(state["ray_address"])
        except Exception as exc:
            err.print(f"[yellow]could not reach the cluster[/]: {exc}")
    from runtime.sandbox.launcher import Sandbox

    try:
        if not keep_sandbox:
            Sandbox.attach(settings.data_dir).stop()
            if not quiet:
                err.print("stopped the sandbox")
    except FileNotFoundError:
        pass
    for name in ("up.json", "pids"):
        (settings.run_dir / name).unlink(missing_ok=True)


def _disconnect() -> None:
    """Leave the cluster before its head is stopped (a driver that loses the GCS exits
    the whole process after a minute)."""
    if "ray" in sys.modules:
        from actors import runner

        runner.shutdown()


def _read_state(run_dir: Path) -> Doc | None:
    try:
        data = json.loads((run_dir / "up.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(run_dir: Path, state: Doc) -> None:
    tmp = run_dir / "up.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, run_dir / "up.json")


def _new_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    return token


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_answers(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(url):
        if time.monotonic() > deadline:
            raise ProvisioningError(f"the API at {url} did not answer within {timeout:g} s")
        time.sleep(0.3)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(preferred: int | None = None) -> int:
    if preferred and _port_free("0.0.0.0", preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
