"""The sandbox's SSH endpoint: where the emulated servers' addresses lead.

The login name names the server. Every command runs as ``bash -c COMMAND`` in
``<root_dir>/<username>/`` with ``ROOT`` (and ``HOME``) set to that directory, whatever
the client sent, so the real catalog scripts run over the production SSH path without
touching this machine. This is a convenience for tests and demos, not a security
boundary: an authenticated client runs commands as this process's user. The username
pattern only keeps an honest mistake from escaping ``root_dir``.

On first start it writes an ed25519 host key and a client key pair (mode 0600) into
``data_dir`` and authorizes that client key, so the sandbox can pin the host key::

    endpoint = SshEndpoint(root_dir, port=0)
    await endpoint.start()
    transport = endpoint.transport()   # an SshTransport wired to it

Run on its own: ``python -m runtime.sandbox.ssh_endpoint --port 9093 --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import asyncssh

from runtime.transports.local import BASE_PATH, discard, exit_code_of, wait_exit
from runtime.transports.ssh import SshTransport

__all__ = ["USERNAME_PATTERN", "SshEndpoint", "main"]

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (no window where others can read)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _ensure_key(path: Path) -> asyncssh.SSHKey:
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519")
    _write_private(path, key.export_private_key())
    _write_private(path.with_name(path.name + ".pub"), key.export_public_key())
    return key


class _EndpointServer(asyncssh.SSHServer):
    def __init__(self, authorized_keys: asyncssh.SSHAuthorizedKeys) -> None:
        self._authorized_keys = authorized_keys
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def begin_auth(self, username: str) -> bool:
        # An invalid name gets no authorized keys, so every key is refused for it.
        if USERNAME_PATTERN.match(username) and self._conn is not None:
            self._conn.set_authorized_keys(self._authorized_keys)
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False


class SshEndpoint:
    def __init__(
        self,
        root_dir: Path,
        host: str = "127.0.0.1",
        port: int = 9093,
        authorized_keys: Path | None = None,
        host_key_path: Path | None = None,
        *,
        data_dir: Path | None = None,
    ) -> None:
        """``port=0`` picks a free port (read ``.port`` after ``start()``).

        ``data_dir`` (default ``<root_dir>/.sshd``, which no valid username can reach)
        holds the generated keys; ``authorized_keys`` defaults to one that authorizes
        the generated client key; ``host_key_path`` defaults to a generated key there.
        """
        self.root_dir = Path(root_dir).resolve()
        self.host = host
        self._requested_port = port
        self.data_dir = Path(data_dir).resolve() if data_dir else self.root_dir / ".sshd"
        self.host_key_path = host_key_path or self.data_dir / "ssh_host_ed25519_key"
        self.client_key_path = self.data_dir / "client_ed25519_key"
        self.authorized_keys_path = authorized_keys or self.data_dir / "authorized_keys"
        self._server: asyncssh.SSHAcceptor | None = None
        self._children: set[int] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host_public_key(self) -> str:
        """The host key in OpenSSH text, for ``SshTransport(host_key=...)``."""
        key = asyncssh.read_private_key(str(self.host_key_path))
        return key.export_public_key().decode().strip()

    def server_dir(self, name: str) -> Path:
        if not USERNAME_PATTERN.match(name):
            raise ValueError(f"invalid server name: {name!r}")
        return self.root_dir / name

    def transport(self, **kwargs: Any) -> SshTransport:
        """An ``SshTransport`` that reaches every server through this endpoint."""
        return SshTransport(
            known_hosts=None,
            client_keys=[self.client_key_path],
            port=self.port,
            host_override=self.host,
            host_key=self.host_public_key,
            username_from="server_name",
            **kwargs,
        )

    def _prepare_keys(self) -> None:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        _ensure_key(Path(self.host_key_path))
        client_key = _ensure_key(self.client_key_path)
        if not Path(self.authorized_keys_path).exists():
            _write_private(Path(self.authorized_keys_path), client_key.export_public_key())

    async def start(self) -> None:
        self._prepare_keys()
        authorized = asyncssh.read_authorized_keys(str(self.authorized_keys_path))
        self._server = await asyncssh.create_server(
            lambda: _EndpointServer(authorized),
            self.host,
            self._requested_port,
            server_host_keys=[str(self.host_key_path)],
            process_factory=self._handle,
            encoding=None,
            line_editor=False,
            allow_scp=False,
            sftp_factory=None,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
        )

    async def stop(self) -> None:
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> SshEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        username = str(process.get_extra_info("username") or "")
        command = process.command
        if not USERNAME_PATTERN.match(username):  # auth already refused it; belt and braces
            process.stderr.write(b"invalid server name\n")
            process.exit(1)
            return
        if command is None:
            process.stderr.write(b"this endpoint runs commands only, not shells\n")
            process.exit(1)
            return
        server_dir = self.server_dir(username)
        server_dir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "SERVER_NAME": username}
        for name, value in process.env.items():
            name_s = name.decode() if isinstance(name, bytes) else str(name)
            value_s = value.decode() if isinstance(value, bytes) else str(value)
            if _ENV_NAME.match(name_s):
                env[name_s] = value_s
        env.update({"ROOT": str(server_dir), "HOME": str(server_dir), "USER": username})
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=server_dir,
            env=env,
            start_new_session=True,
        )
        self._children.add(proc.pid)
        try:
            await self._relay(process, proc)
        finally:
            self._children.discard(proc.pid)
            # The client went away or the command finished: leave no orphans behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()

    @staticmethod
    async def _relay(
        process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process
    ) -> None:
        assert proc.stdin and proc.stdout and proc.stderr
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr

        async def feed() -> None:
            try:
                while chunk := await process.stdin.read(65536):
                    stdin.write(chunk)
                    await stdin.drain()
            except (BrokenPipeError, ConnectionResetError, asyncssh.Error):
                pass  # the command stopped reading; its exit status tells the story
            finally:
                stdin.close()

        async def copy(reader: asyncio.StreamReader, writer: asyncssh.SSHWriter[bytes]) -> None:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()

        feeder = asyncio.ensure_future(feed())
        outputs = asyncio.gather(copy(stdout, process.stdout), copy(stderr, process.stderr))
        closed = asyncio.ensure_future(process.channel.wait_closed())
        done = asyncio.ensure_future(wait_exit(proc, outputs))
        try:
            await asyncio.wait({done, closed}, return_when=asyncio.FIRST_COMPLETED)
            if done.done() and not closed.done():
                process.exit(exit_code_of(done.result()))
        finally:
            for task in (feeder, outputs, done, closed):
                discard(task)


async def _serve(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir).resolve()
    root_dir = Path(args.root_dir).resolve() if args.root_dir else data_dir / "servers"
    endpoint = SshEndpoint(root_dir, host=args.host, port=args.port, data_dir=data_dir)
    await endpoint.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # One JSON line, so whoever started this process learns the port and the key paths.
    info = {
        "host": endpoint.host,
        "port": endpoint.port,
        "root_dir": str(endpoint.root_dir),
        "host_key": str(endpoint.host_key_path),
        "host_public_key": endpoint.host_public_key,
        "client_key": str(endpoint.client_key_path),
    }
    print(json.dumps(info), flush=True)
    await stop.wait()
    await endpoint.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The sandbox's SSH endpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9093)
    parser.add_argument("--data-dir", required=True, help="keys; servers/ unless --root-dir")
    parser.add_argument("--root-dir", default=None, help="per-server sandbox directories")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
