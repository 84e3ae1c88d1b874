"""Run catalog scripts on cloud servers over SSH (asyncssh). The only module that imports it
outside the sandbox.

Security choices, each on purpose:
- Host keys are always pinned: a ``known_hosts`` file, or one explicit host public key
  (the sandbox's endpoint). There is no "accept any host key" mode.
- Public-key authentication only; no agent, no passwords, no ``~/.ssh/config``, so a
  run does not depend on the operator's shell setup.
- The environment is exported in a prelude on stdin (values quoted with ``shlex``)
  rather than sent as SSH env requests, which sshd drops unless ``AcceptEnv`` allows them.
- ``ROOT`` is never sent: the root prefix belongs to the server (empty on a real one,
  forced by the sandbox endpoint), not to the caller.

Which host and user: ``host_override`` or else ``ServerRef.public_ip``; the user is
``ServerRef.extra["ssh_user"]`` if set, else the server's name with
``username_from="server_name"`` (the sandbox endpoint's scheme), else ``username``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import asyncssh

from runtime.errors import TransportError
from runtime.providers.base import ServerRef
from runtime.transports.base import ScriptResult, Transport
from runtime.transports.local import (
    OUTPUT_LIMIT,
    TailBuffer,
    check_env,
    exit_code_of,
    guard_script,
    pump,
)

__all__ = ["SshTransport"]

# Remote `timeout` gets this long after SIGTERM before SIGKILL; the client waits that
# plus a margin before it gives up on the channel itself.
_REMOTE_KILL_AFTER = 5
_CLIENT_MARGIN = 10.0

_ConnKey = tuple[str, int, str]


class SshTransport(Transport):
    def __init__(
        self,
        known_hosts: Path | None = None,
        client_keys: Sequence[Path] = (),
        username: str = "root",
        port: int = 22,
        host_override: str | None = None,
        connect_timeout: float = 15.0,
        *,
        host_key: str | Path | None = None,
        username_from: Literal["fixed", "server_name"] = "fixed",
        keepalive_interval: float = 30.0,
        output_limit: int = OUTPUT_LIMIT,
    ) -> None:
        """``known_hosts``: an OpenSSH known_hosts file; or ``host_key``: one pinned host
        public key (OpenSSH text, or the path of a ``.pub`` file) accepted for every host.
        """
        if (known_hosts is None) == (host_key is None):
            raise ValueError("pin host keys: give exactly one of known_hosts or host_key")
        if not client_keys:
            raise ValueError("SshTransport authenticates with keys only: give client_keys")
        self._known_hosts: Any
        if known_hosts is not None:
            if not Path(known_hosts).is_file():
                raise ValueError(f"known_hosts file not found: {known_hosts}")
            self._known_hosts = str(known_hosts)
        else:
            self._known_hosts = ([_load_host_key(host_key)], [], [])
        try:
            self._client_keys = [asyncssh.read_private_key(str(p)) for p in client_keys]
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ValueError(f"cannot read client key: {exc}") from exc
        self._username = username
        self._username_from = username_from
        self._port = port
        self._host_override = host_override
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive_interval
        self._output_limit = output_limit
        self._conns: dict[_ConnKey, asyncssh.SSHClientConnection] = {}
        self._locks: dict[_ConnKey, asyncio.Lock] = {}

    def target(self, server: ServerRef) -> _ConnKey:
        """(host, port, user) that ``server``'s scripts run on."""
        host = self._host_override or server.public_ip
        if not host:
            raise TransportError(f"{server.name}: no public IP to connect to")
        if "ssh_user" in server.extra:
            user = server.extra["ssh_user"]
        elif self._username_from == "server_name":
            user = server.name
        else:
            user = self._username
        return host, self._port, user

    async def run(
        self,
        server: ServerRef,
        script: str,
        env: dict[str, str],
        timeout: float | None = None,
    ) -> ScriptResult:
        check_env(env)
        exports = {"SERVER_NAME": server.name, **env}
        exports.pop("ROOT", None)
        prelude = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        payload = guard_script(script, prelude).encode()
        command = "bash -euo pipefail -s"
        client_timeout = None
        if timeout is not None:
            # Enforced on the server too: closing a channel does not stop a remote command.
            secs = max(1, math.ceil(timeout))
            command = f"timeout --kill-after={_REMOTE_KILL_AFTER}s {secs}s {command}"
            client_timeout = secs + _REMOTE_KILL_AFTER + _CLIENT_MARGIN

        key = self.target(server)
        # A cached connection may have died since its last use (server rebooted, idle
        # timeout): open a fresh one once before calling the server unreachable.
        for attempt in (1, 2):
            conn = await self._connection(key)
            try:
                proc = await conn.create_process(command, encoding=None)
            except (asyncssh.Error, OSError) as exc:
                await self._drop(key)
                if attempt == 2:
                    raise _mapped(key, exc) from exc
                continue
            break

        started = time.monotonic()
        out, err = TailBuffer(self._output_limit), TailBuffer(self._output_limit)
        try:
            await asyncio.wait_for(self._exchange(proc, payload, out, err), client_timeout)
        except TimeoutError:
            proc.close()
            raise TransportError(f"{_where(key)}: script timed out after {timeout}s") from None
        except (asyncssh.Error, OSError) as exc:
            await self._drop(key)
            raise _mapped(key, exc) from exc
        except BaseException:
            proc.close()
            raise
        returncode = proc.returncode
        if returncode is None:
            await self._drop(key)
            raise TransportError(f"{_where(key)}: connection lost before the script finished")
        code = exit_code_of(returncode)
        # 124 is coreutils timeout's "timed out" (137: it had to SIGKILL).
        if timeout is not None and code in (124, 137) and time.monotonic() - started >= timeout:
            raise TransportError(f"{_where(key)}: script timed out after {timeout}s")
        return ScriptResult(code, out.text(), err.text())

    @staticmethod
    async def _exchange(
        proc: asyncssh.SSHClientProcess[bytes], payload: bytes, out: TailBuffer, err: TailBuffer
    ) -> None:
        proc.stdin.write(payload)
        proc.stdin.write_eof()
        await asyncio.gather(pump(proc.stdout.read, out), pump(proc.stderr.read, err))
        await proc.wait_closed()

    async def _connection(self, key: _ConnKey) -> asyncssh.SSHClientConnection:
        # One lock per target: a hundred scripts for one new server open one connection.
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is not None and not conn.is_closed():
                return conn
            host, port, user = key
            try:
                conn = await asyncssh.connect(
                    host,
                    port,
                    username=user,
                    known_hosts=self._known_hosts,
                    client_keys=self._client_keys,
                    preferred_auth="publickey",
                    agent_path=None,
                    config=None,
                    connect_timeout=self._connect_timeout,
                    login_timeout=self._connect_timeout,
                    keepalive_interval=self._keepalive_interval,
                )
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                raise _mapped(key, exc) from exc
            self._conns[key] = conn
            return conn

    async def _drop(self, key: _ConnKey) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    async def close(self) -> None:
        for key in list(self._conns):
            await self._drop(key)

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self._conns.values() if not c.is_closed())


def _load_host_key(host_key: str | Path | None) -> asyncssh.SSHKey:
    """A ``Path`` or a bare path string is a ``.pub`` file; text with a space is the key."""
    assert host_key is not None
    try:
        if isinstance(host_key, str) and " " in host_key.strip():
            return asyncssh.import_public_key(host_key.strip())
        return asyncssh.read_public_key(str(host_key))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ValueError(f"cannot load pinned host key: {exc}") from exc


def _where(key: _ConnKey) -> str:
    host, port, user = key
    return f"{user}@{host}:{port}"


def _mapped(key: _ConnKey, exc: BaseException) -> TransportError:
    """The one place asyncssh and socket errors become ``TransportError``."""
    where = _where(key)
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        error = TransportError(f"{where}: host key not accepted (pinned key mismatch): {exc}")
        error.retryable = False  # retrying cannot fix a wrong key; an operator must look
    elif isinstance(exc, asyncssh.PermissionDenied):
        error = TransportError(f"{where}: authentication refused: {exc}")
        error.retryable = False
    elif isinstance(exc, TimeoutError):
        error = TransportError(f"{where}: connection timed out")
    elif isinstance(exc, asyncssh.DisconnectError):
        error = TransportError(f"{where}: disconnected: {exc.reason or exc}")
    else:
        error = TransportError(f"{where}: {type(exc).__name__}: {exc}")
    return error
