"""Start, find again and stop the sandbox's three servers: UpCloud emulator, moto, SSH endpoint.

Each runs as its own process in its own session, so a crash or Ctrl-C of the
orchestrator that started them leaves them up: they hold the servers a resumed run
must reconcile against. Their pids and ports go to ``<data_dir>/sandbox/pids.json``;
a later ``start()`` reuses processes that are still alive and answering, and
``Sandbox.attach(data_dir).stop()`` (``provisioning down``) stops them.

Pids get reused, so a pid is signalled only after ``/proc/<pid>/cmdline`` shows it is
still the module we started, on the port we recorded.

The emulated servers lead to the SSH endpoint: ``env()`` points the SSH transport at
127.0.0.1:<ssh port> with the server's name as login name, and the endpoint runs
commands in ``<data_dir>/sandbox/ssh/servers/<server name>/``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.sandbox.moto_server import MotoServer, sandbox_aws_env
from runtime.sandbox.upcloud_emulator import DEFAULT_PASSWORD, DEFAULT_USERNAME

__all__ = ["Sandbox", "SandboxPorts"]

HOST = "127.0.0.1"
# What identifies each process in /proc/<pid>/cmdline, next to its port.
PERSIST_DELAY = 0.05  # seconds the UpCloud emulator gathers changes before a write
_MARKERS = {
    "upcloud": (b"runtime.sandbox.upcloud_emulator", b"--port"),
    "ec2": (b"moto.server", b"-p"),
    "ssh": (b"runtime.sandbox.ssh_endpoint", b"--port"),
}


@dataclass(frozen=True)
class SandboxPorts:
    upcloud: int = 9091
    ec2: int = 9092
    ssh: int = 9093


class Sandbox:
    def __init__(
        self, data_dir: Path, ports: SandboxPorts | None = None, *, ready_delay: float = 0.5
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.ports = ports or SandboxPorts()
        self.ready_delay = ready_delay
        self.dir = self.data_dir / "sandbox"
        self.ssh_dir = self.dir / "ssh"
        self.pids: dict[str, int] = {}
        self.host_public_key: str | None = None
        # Handles on children this object spawned, so stop() can reap them (no zombies).
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._moto: MotoServer | None = None

    @property
    def pids_file(self) -> Path:
        return self.dir / "pids.json"

    @property
    def servers_dir(self) -> Path:
        """Where the SSH endpoint runs each server's commands: ``<this>/<server name>/``."""
        return self.ssh_dir / "servers"

    @property
    def upcloud_url(self) -> str:
        return f"http://{HOST}:{self.ports.upcloud}"

    @classmethod
    def attach(cls, data_dir: Path) -> Sandbox:
        """A handle on the processes ``pids.json`` records (e.g. from a crashed ``up``)."""
        sandbox = cls(data_dir)
        recorded = sandbox._read_pids()
        if not recorded:
            raise FileNotFoundError(f"no sandbox recorded in {sandbox.pids_file}")
        ports = {name: int(entry["port"]) for name, entry in recorded.items() if name in _MARKERS}
        sandbox.ports = SandboxPorts(**ports)
        sandbox.pids = {name: int(entry["pid"]) for name, entry in recorded.items()}
        sandbox.host_public_key = recorded.get("ssh", {}).get("host_public_key")
        return sandbox

    # ---- start ----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Sandbox:
        """Start what is not already running (and answering); wait until all three answer."""
        self.dir.mkdir(parents=True, exist_ok=True)
        recorded = self._read_pids()
        reused = {name for name in _MARKERS if self._reusable(name, recorded.get(name), timeout)}
        try:
            # Spawn the two quick ones first and wait for them while moto (the slow one,
            # ~2-3 s) starts: the sandbox is up in the time moto alone takes.
            if "upcloud" not in reused:
                # Its state file is rewritten whole on a change: a burst of creates is
                # written once per PERSIST_DELAY, not once per create (O(n) each).
                delay: tuple[str, ...] = ("--ready-delay", str(self.ready_delay))
                delay += ("--persist-delay", str(PERSIST_DELAY))
                self._spawn("upcloud", "upcloud_emulator", ("--data-dir", str(self.dir), *delay))
            if "ssh" not in reused:
                self.ssh_dir.mkdir(parents=True, exist_ok=True)
                args = ("--data-dir", str(self.ssh_dir))
                self._spawn("ssh", "ssh_endpoint", args, stdout=self.dir / "ssh-endpoint.json")
            if "ec2" not in reused:
                self._moto = MotoServer(self.ports.ec2, HOST, log_path=self.dir / "moto.log")
                self._moto.start(timeout)
                assert self._moto.pid is not None
                self.pids["ec2"] = self._moto.pid
                self._write_pids()
            self._wait("upcloud", self._upcloud_answers, timeout)
            self._wait("ssh", self._ssh_answers, timeout)
            self.host_public_key = self._read_host_key()
            self._write_pids()
            if "upcloud" in reused:
                # A reused emulator keeps its own startup value: apply this run's delay.
                self._admin("PUT", "/_admin/faults", {"ready_delay": self.ready_delay})
        except BaseException:
            self.stop(only=set(_MARKERS) - reused)
            raise
        return self

    def _reusable(self, name: str, entry: dict[str, Any] | None, timeout: float) -> bool:
        pid, port = (int(entry["pid"]), int(entry["port"])) if entry else (0, 0)
        if not entry or not _is_ours(pid, name, port):
            return False
        if port != getattr(self.ports, name):
            raise RuntimeError(
                f"the sandbox's {name} server runs on port {port}, not "
                f"{getattr(self.ports, name)}: stop it first (provisioning down)"
            )
        answers = {"upcloud": self._upcloud_answers, "ec2": self._moto_answers}
        try:  # it may still be starting (an `up` that crashed a moment ago)
            self._wait(name, answers.get(name, self._ssh_answers), min(timeout, 10.0))
        except RuntimeError:
            _terminate(pid, name, port, None, 10.0)  # ours but wedged: replace it
            return False
        self.pids[name] = pid
        if name == "ssh":
            self.host_public_key = entry.get("host_public_key")
        return True

    def _spawn(
        self, name: str, module: str, args: tuple[str, ...], stdout: Path | None = None
    ) -> None:
        port = getattr(self.ports, name)
        argv = [sys.executable, "-m", f"runtime.sandbox.{module}", "--port", str(port), *args]
        with socket.socket() as probe:
            taken = probe.connect_ex((HOST, port)) == 0
        if taken:
            raise RuntimeError(f"port {port} is taken: the sandbox's {name} server cannot start")
        log = (self.dir / f"{name}.log").open("ab")
        out = stdout.open("wb") if stdout else log
        try:
            # Own session: the orchestrator's crash or Ctrl-C must not take it along.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log, start_new_session=True
            )
        finally:
            log.close()
            out.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid
        self._write_pids()  # at once: a crash during start() must still leave them findable

    def _wait(self, name: str, answers: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not answers():
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                tail = (self.dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"sandbox {name} server exited with {proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sandbox {name} server did not answer in {timeout}s")
            time.sleep(0.05)

    # ---- probes -----------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(self.upcloud_url + path, data, headers, method=method)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read() or b"null")

    def _upcloud_answers(self) -> bool:
        try:
            return isinstance(self._admin("GET", "/_admin/stats"), dict)
        except (OSError, ValueError):
            return False

    def _moto_answers(self) -> bool:
        return MotoServer(self.ports.ec2, HOST).answering()

    def _ssh_answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.ports.ssh), timeout=2) as sock:
                return sock.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _read_host_key(self) -> str:
        # The endpoint's own announcement, else the key file it wrote beside its keys.
        try:
            line = (self.dir / "ssh-endpoint.json").read_text().splitlines()[0]
            return str(json.loads(line)["host_public_key"])
        except (OSError, IndexError, ValueError, KeyError):
            return (self.ssh_dir / "ssh_host_ed25519_key.pub").read_text().strip()

    # ---- what the orchestrator needs ----------------------------------------------------

    def env(self) -> dict[str, str]:
        """The provider adapters' environment for this sandbox. Use it as the whole
        ``provider_env``: merged over a real one, a real UPCLOUD_TOKEN would win."""
        host_key = self.host_public_key or self._read_host_key()
        return {
            "UPCLOUD_API_ROOT": f"{self.upcloud_url}/1.3",
            "UPCLOUD_USERNAME": DEFAULT_USERNAME,
            "UPCLOUD_PASSWORD": DEFAULT_PASSWORD,
            **sandbox_aws_env(f"http://{HOST}:{self.ports.ec2}"),
            # Every server's address leads to the endpoint; the login name picks its dir.
            "PROVISIONING_SSH_HOST": HOST,
            "PROVISIONING_SSH_PORT": str(self.ports.ssh),
            "PROVISIONING_SSH_KEYS": str(self.ssh_dir / "client_ed25519_key"),
            "PROVISIONING_SSH_HOST_KEY": host_key,
            "PROVISIONING_SSH_USER_FROM": "server_name",
        }

    # ---- stop -------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0, *, only: set[str] | None = None) -> None:
        """Stop the processes this handle started or attached to, by pid; nothing else."""
        for name in ("ssh", "ec2", "upcloud"):  # the emulator last: it flushes its state
            if name not in self.pids or (only is not None and name not in only):
                continue
            pid = self.pids.pop(name)
            proc = self._procs.pop(name, None)
            if name == "ec2" and self._moto is not None and self._moto.pid == pid:
                self._moto.stop(timeout)  # it holds the Popen and reaps it
                self._moto = None
                continue
            _terminate(pid, name, getattr(self.ports, name), proc, timeout)
        if self.pids:
            self._write_pids()
        else:
            self.pids_file.unlink(missing_ok=True)

    # ---- pids.json ----------------------------------------------------------------------

    def _read_pids(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.pids_file.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and "pid" in v}

    def _write_pids(self) -> None:
        ports = asdict(self.ports)
        data: dict[str, Any] = {n: {"pid": p, "port": ports[n]} for n, p in self.pids.items()}
        if "ssh" in data and self.host_public_key:
            data["ssh"]["host_public_key"] = self.host_public_key
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.pids_file)  # readers see the old file or the new one


def _is_ours(pid: int, name: str, port: int) -> bool:
    """``pid`` is alive (not a zombie) and still runs ``name``'s module on ``port``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    module, flag = _MARKERS[name]
    on_port = any(a == flag and b == str(port).encode() for a, b in itertools.pairwise(argv))
    return module in argv and on_port and state != "Z"


def _terminate(
    pid: int, name: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_ours(pid, name, port):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _is_ours(pid, name, port) and time.monotonic() < deadline:
            time.sleep(0.05)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)  # reap our own child
