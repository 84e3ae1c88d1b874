"""Run catalog scripts on this machine, for the ``local`` provider's servers.

A local server is a sandbox directory. Its path travels in ``ServerRef.extra["root"]``
(set by the local provider); without it, ``LocalTransport(base_dir=...)`` uses
``<base_dir>/<server name>``. Scripts run with ``ROOT`` set to that directory and it as
their working directory and ``HOME``, so the real catalog installs into the sandbox.

The helpers at the bottom (``TailBuffer``, ``guard_script``, ``exit_code_of``) are
shared with the SSH transport, which must behave the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from runtime.errors import TransportError
from runtime.providers.base import ServerRef
from runtime.transports.base import ScriptResult, Transport

__all__ = [
    "BASE_PATH",
    "OUTPUT_LIMIT",
    "LocalTransport",
    "TailBuffer",
    "check_env",
    "discard",
    "exit_code_of",
    "guard_script",
    "pump",
    "wait_exit",
]

OUTPUT_LIMIT = 64 * 1024
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How long stdout/stderr may stay open after bash exited (a background child holding
# them) before the process group is killed, and how long SIGTERM gets before SIGKILL.
_PIPE_GRACE = 5.0
_KILL_GRACE = 2.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LocalTransport(Transport):
    def __init__(self, base_dir: Path | None = None, *, output_limit: int = OUTPUT_LIMIT) -> None:
        self._base_dir = base_dir
        self._output_limit = output_limit

    def root_for(self, server: ServerRef) -> Path:
        """The server's sandbox directory (created on first use)."""
        if "root" in server.extra:
            root = Path(server.extra["root"])
        elif self._base_dir is not None:
            root = self._base_dir / server.name
        else:
            raise TransportError(
                f"local server {server.name!r} has no sandbox directory "
                "(ServerRef.extra['root'] unset and no base_dir)"
            )
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root

    async def run(
        self,
        server: ServerRef,
        script: str,
        env: dict[str, str],
        timeout: float | None = None,
    ) -> ScriptResult:
        root = self.root_for(server)
        check_env(env)
        full_env = {"PATH": BASE_PATH, "HOME": str(root), "LANG": "C.UTF-8"}
        full_env["SERVER_NAME"] = server.name
        full_env.update(env)
        # The root prefix belongs to the server, never to the caller: a stray ROOT=""
        # would make the catalog install onto this machine.
        full_env["ROOT"] = str(root)
        try:
            proc = await asyncio.create_subprocess_exec(
                "bash",
                "-euo",
                "pipefail",
                "-s",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=root,
                env=full_env,
                start_new_session=True,  # its own process group, so a timeout kills it all
            )
        except OSError as exc:
            raise TransportError(f"{server.name}: cannot start bash: {exc}") from exc
        out, err = TailBuffer(self._output_limit), TailBuffer(self._output_limit)
        try:
            returncode = await asyncio.wait_for(self._session(proc, script, out, err), timeout)
        except TimeoutError:
            await _kill(proc)
            raise TransportError(
                f"{server.name}: script timed out after {timeout}s; stderr: {err.text()[-500:]}"
            ) from None
        except BaseException:
            await _kill(proc)
            raise
        return ScriptResult(exit_code_of(returncode), out.text(), err.text())

    @staticmethod
    async def _session(
        proc: asyncio.subprocess.Process, script: str, out: TailBuffer, err: TailBuffer
    ) -> int:
        assert proc.stdin and proc.stdout and proc.stderr
        pumps = asyncio.gather(pump(proc.stdout.read, out), pump(proc.stderr.read, err))
        try:
            proc.stdin.write(guard_script(script).encode())
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # bash exited early (e.g. killed); its exit code tells the story
        try:
            return await wait_exit(proc, pumps)
        finally:
            discard(pumps)


async def wait_exit(proc: asyncio.subprocess.Process, output: asyncio.Future[Any]) -> int:
    """Wait until ``proc`` exited and ``output`` (the copying of its pipes) finished.

    asyncio's ``Process.wait()`` also waits for every pipe to close, so a background
    child holding stdout would hang it for as long as the child lives. Once bash has
    exited, the pipes get a grace period, then the process group is killed.
    """
    while not output.done():
        await asyncio.wait({output}, timeout=0.2)
        if proc.returncode is not None and not output.done():
            try:
                await asyncio.wait_for(asyncio.shield(output), _PIPE_GRACE)
            except TimeoutError:
                _signal_group(proc, signal.SIGKILL)
                # A daemon in another session may still hold the pipes: stop copying.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(output), 1.0)
            break
    if output.done() and not output.cancelled():
        output.result()  # surface a failed copy instead of dropping it
    while proc.returncode is None:  # pipes closed first; the exit status follows shortly
        await asyncio.sleep(0.01)
    return proc.returncode


def discard(future: asyncio.Future[Any]) -> None:
    """Cancel ``future`` and consume its outcome, so asyncio logs no "never retrieved"."""
    future.cancel()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    _signal_group(proc, signal.SIGTERM)
    for _ in range(int(_KILL_GRACE / 0.05)):
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    # SIGKILL the group even if bash is gone: its children may still run.
    _signal_group(proc, signal.SIGKILL)


class TailBuffer:
    """Keeps the last ``limit`` bytes of a stream: the end of a log is what explains a failure."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._data += chunk
        excess = len(self._data) - self.limit
        if excess > 0:
            del self._data[:excess]
            self.dropped += excess

    def text(self) -> str:
        text = self._data.decode("utf-8", errors="replace")
        if self.dropped:
            return f"[... {self.dropped} bytes dropped ...]\n{text}"
        return text


async def pump(read: Callable[[int], Awaitable[bytes]], buffer: TailBuffer) -> None:
    """Copy a stream into ``buffer`` until end of file."""
    while chunk := await read(65536):
        buffer.feed(chunk)


def guard_script(script: str, prelude: str = "") -> str:
    """The text fed to ``bash -s``: the script inside one ``{ ...; } </dev/null`` group.

    bash reads a ``-s`` script from stdin as it goes, so a command that reads stdin
    (``apt-get``, ``cat``) would swallow the rest of the script. A group is parsed
    whole before it runs, and its stdin is /dev/null.
    """
    if not script.endswith("\n"):
        script += "\n"  # a closing heredoc delimiter must stay alone on its line
    return f"{prelude}{{\n{script}}} </dev/null\n"


def check_env(env: dict[str, str]) -> None:
    for name in env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"invalid environment variable name: {name!r}")


def exit_code_of(returncode: int) -> int:
    """Shell convention: death by signal N is exit code 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
