"""moto's EC2 emulator in server mode, started and stopped by pid.

The sandbox runs moto as a subprocess in its own session, so it outlives a crash of
the orchestrator that started it (the servers it holds are the state a resumed run
must reconcile against) and a Ctrl-C in the terminal. ``stop()`` signals that pid
only, after checking that the pid still is a moto server: pids get reused.

``start_thread()`` runs moto inside this process instead, which is quicker for tests
but dies with the process; the ``strict`` validation switches do not apply to it
(moto reads them from the environment once, at import).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_PORT = 9092
DEFAULT_REGION = "eu-central-1"

# Without these moto accepts any AMI id and any instance type, so a typo in a
# workflow would pass in the sandbox and fail on AWS.
STRICT_ENV = {
    "MOTO_ENABLE_AMI_VALIDATION": "true",
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
}


def sandbox_aws_env(endpoint_url: str, region: str = DEFAULT_REGION) -> dict[str, str]:
    """Environment for AWS clients talking to the sandbox: dummy credentials only."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": region,
        # Never fall back to the instance metadata service for credentials.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MotoServer:
    def __init__(
        self,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        *,
        strict: bool = True,
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.port = port
        self.host = host
        self.strict = strict
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._thread_server: Any = None

    @classmethod
    def attach(cls, pid: int, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> MotoServer:
        """A handle on a server started earlier (e.g. by a crashed ``up``), to stop it."""
        server = cls(port, host)
        server._pid = pid
        return server

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else self._pid

    def answering(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=timeout):
                return True
        except (OSError, urllib.error.URLError):
            return False

    def start(self, timeout: float = 60.0) -> None:
        """Start ``python -m moto.server`` and wait until it answers."""
        if self.answering():
            raise RuntimeError(f"something already answers on {self.endpoint_url}")
        env = {**os.environ, **(STRICT_ENV if self.strict else {}), **self.env}
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            out = self.log_path.open("ab")
        argv = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        try:
            # Own session: a Ctrl-C or crash of the parent must not take moto with it.
            self._proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + timeout
        while not self.answering():
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self._proc.returncode} on start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto did not answer on {self.endpoint_url} in {timeout}s")
            time.sleep(0.1)

    def start_thread(self) -> None:
        """Run moto in a thread of this process (port 0 picks a free port)."""
        from moto.server import ThreadedMotoServer

        self._thread_server = ThreadedMotoServer(
            ip_address=self.host, port=self.port, verbose=False
        )
        self._thread_server.start()
        self.port = int(self._thread_server.get_host_and_port()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server this handle started or attached to; never anything else."""
        if self._thread_server is not None:
            self._thread_server.stop()
            self._thread_server = None
            return
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout)
            self._proc = None
            return
        if self._pid is not None and _is_moto(self._pid):
            os.kill(self._pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_moto(self._pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_moto(self._pid):
                os.kill(self._pid, signal.SIGKILL)
        self._pid = None

    def reset(self) -> None:
        """Forget every resource in every region (moto's ``/moto-api/reset``)."""
        self._post("/moto-api/reset", b"")

    def enforce_auth(self, enforce: bool = True) -> None:
        """Make moto check credentials (unknown keys get ``AuthFailure``) or stop checking."""
        self._post("/moto-api/reset-auth", b"0" if enforce else b"inf")

    def _post(self, path: str, body: bytes) -> None:
        # text/plain: with urllib's default form type, moto's handler sees an empty body
        req = urllib.request.Request(
            f"{self.endpoint_url}{path}",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _is_moto(pid: int) -> bool:
    """Whether ``pid`` is alive and is a moto server (and not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"moto.server" in cmdline and state != "Z"
