"""SshTransport against the sandbox's SshEndpoint and against a real OpenSSH server,
both on loopback with generated keys."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.errors import TransportError
from runtime.providers.base import ServerRef
from runtime.sandbox.ssh_endpoint import SshEndpoint
from runtime.transports.ssh import SshTransport
from schemas.catalog import builtin_catalog_dir, load_catalog

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SSHD = Path("/usr/sbin/sshd")


def _server(name: str = "web-1", **extra: str) -> ServerRef:
    # The address is an emulator's fake one: host_override leads it to loopback.
    return ServerRef(
        provider="upcloud", id=name, name=name, key=f"k-{name}", public_ip="10.9.8.7", extra=extra
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True
    )
    return path.with_suffix(".pub").read_text().strip()


# --- the sandbox endpoint -------------------------------------------------------------


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[SshEndpoint]:
    async with SshEndpoint(tmp_path / "servers", port=0) as ep:
        yield ep


async def test_endpoint_runs_in_the_per_server_dir(endpoint: SshEndpoint) -> None:
    transport = endpoint.transport()
    try:
        script = 'echo "$ROOT|$PWD|$HOME|$SERVER_NAME|$GREETING"; cat; echo after'
        result = await transport.run(_server(), script, {"ROOT": "", "GREETING": "it's $me"})
        server_dir = endpoint.root_dir / "web-1"
        assert result.exit_code == 0, result.stderr
        assert result.stdout == f"{server_dir}|{server_dir}|{server_dir}|web-1|it's $me\nafter\n"
        # Two servers, two connections; the same server again reuses its connection.
        await transport.run(_server("db-1"), "true", {})
        await transport.run(_server("web-1"), "true", {})
        assert transport.open_connections == 2
        assert (endpoint.root_dir / "db-1").is_dir()
        failed = await transport.run(_server(), "echo oops >&2; exit 3", {})
        assert (failed.exit_code, failed.stderr) == (3, "oops\n")
    finally:
        await transport.close()
    assert transport.open_connections == 0


async def test_endpoint_runs_the_real_catalog(endpoint: SshEndpoint) -> None:
    spec = load_catalog([builtin_catalog_dir()])["containerd"]
    transport = endpoint.transport()
    env = {"SERVER_NAME": "web-1", "TASKSERV": "containerd"}
    try:
        assert (await transport.run(_server(), spec.check, env)).exit_code == 1
        applied = await transport.run(_server(), spec.apply, env, timeout=60)
        assert applied.exit_code == 0, applied.stderr
        assert (await transport.run(_server(), spec.verify, env)).exit_code == 0
    finally:
        await transport.close()
    marker = endpoint.root_dir / "web-1/var/lib/provisioning/taskservs/containerd.installed"
    assert "server=web-1" in marker.read_text()


async def test_endpoint_keys_are_private(endpoint: SshEndpoint) -> None:
    for path in (endpoint.host_key_path, endpoint.client_key_path):
        assert path.stat().st_mode & 0o777 == 0o600
    assert endpoint.host_public_key.startswith("ssh-ed25519 ")


async def test_wrong_pinned_host_key_is_refused(endpoint: SshEndpoint, tmp_path: Path) -> None:
    transport = SshTransport(
        client_keys=[endpoint.client_key_path],
        port=endpoint.port,
        host_override="127.0.0.1",
        host_key=_keygen(tmp_path / "other"),
        username_from="server_name",
    )
    with pytest.raises(TransportError, match="host key not accepted") as info:
        await transport.run(_server(), "true", {})
    assert info.value.retryable is False
    await transport.close()


@pytest.mark.parametrize("user", ["..", "../escape", "a/b", ".hidden", "-rf"])
async def test_path_escaping_username_is_refused(endpoint: SshEndpoint, user: str) -> None:
    transport = endpoint.transport()
    with pytest.raises(TransportError, match="authentication refused"):
        await transport.run(_server(ssh_user=user), "touch pwned", {})
    await transport.close()
    assert sorted(os.listdir(endpoint.root_dir)) == [".sshd"]
    assert not (endpoint.root_dir.parent / "escape").exists()


async def test_endpoint_timeout_kills_the_remote_command(endpoint: SshEndpoint) -> None:
    transport = endpoint.transport()
    tag = f"provisioning-test-{uuid.uuid4()}"
    started = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        await transport.run(_server(), f"sh -c 'sleep 30' {tag}", {}, timeout=1)
    assert time.monotonic() - started < 10
    await transport.close()
    await _eventually_gone(tag)


def test_endpoint_command_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime.sandbox.ssh_endpoint",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        transport = SshTransport(
            client_keys=[Path(info["client_key"])],
            port=info["port"],
            host_override=info["host"],
            host_key=info["host_public_key"],
            username_from="server_name",
        )

        async def go() -> str:
            try:
                return (await transport.run(_server("cli-1"), 'echo "$ROOT"', {})).stdout
            finally:
                await transport.close()

        assert asyncio.run(go()).strip() == str(tmp_path / "servers" / "cli-1")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


# --- a real OpenSSH server ---------------------------------------------------------------


@dataclass
class Sshd:
    port: int
    known_hosts: Path
    client_key: Path
    host_public_key: str


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    if not SSHD.exists():
        pytest.skip("OpenSSH server not installed (/usr/sbin/sshd): apt-get install openssh-server")
    if os.geteuid() != 0:
        pytest.skip("sshd must run as root to log in as root")
    host_pub = _keygen(tmp_path / "host_ed25519")
    client_pub = _keygen(tmp_path / "client_ed25519")
    (tmp_path / "authorized_keys").write_text(client_pub + "\n")
    port = _free_port()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host_ed25519'}\n"
        f"PidFile {tmp_path / 'sshd.pid'}\nAuthorizedKeysFile {tmp_path / 'authorized_keys'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nAllowUsers root\nLogLevel VERBOSE\n"
    )
    # sshd insists on its privilege-separation directory; the package creates it at boot.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = tmp_path / "sshd.log"
    proc = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(log)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not start: {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
        yield Sshd(port, known_hosts, tmp_path / "client_ed25519", host_pub)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _transport(sshd: Sshd, **kwargs: object) -> SshTransport:
    args: dict[str, object] = {
        "known_hosts": sshd.known_hosts,
        "client_keys": [sshd.client_key],
        "port": sshd.port,
        "host_override": "127.0.0.1",
    }
    args.update(kwargs)
    return SshTransport(**args)  # type: ignore[arg-type]


async def test_openssh_runs_scripts_over_one_connection(sshd: Sshd) -> None:
    transport = _transport(sshd)
    try:
        tricky = "a b 'c' \"d\" $e `f` \\g\nline2"
        script = 'printf "%s|" "$USER" "$SERVER_NAME" "${ROOT-unset}"; printf "%s" "$VALUE"\n'
        result = await transport.run(_server(), script, {"VALUE": tricky, "ROOT": "/tmp"})
        assert result.exit_code == 0, result.stderr
        assert result.stdout == f"root|web-1|unset|{tricky}"
        # A command reading stdin must not swallow the rest of the script.
        result = await transport.run(_server(), "cat\necho after\nexit 5", {})
        assert (result.exit_code, result.stdout) == (5, "after\n")
        # -e, -u and pipefail are on.
        assert (await transport.run(_server(), "false\necho no", {})).stdout == ""
        assert (await transport.run(_server(), 'echo "$NOPE"', {})).exit_code != 0
        assert (await transport.run(_server(), "false | true", {})).exit_code == 1
        assert transport.open_connections == 1
    finally:
        await transport.close()


async def test_openssh_pinned_public_key_alternative(sshd: Sshd) -> None:
    transport = _transport(sshd, known_hosts=None, host_key=sshd.host_public_key)
    try:
        assert (await transport.run(_server(), "echo ok", {})).stdout == "ok\n"
    finally:
        await transport.close()


async def test_openssh_host_key_mismatch_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    other = _keygen(tmp_path / "impostor")
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    transport = _transport(sshd, known_hosts=wrong)
    with pytest.raises(TransportError, match="host key not accepted") as info:
        await transport.run(_server(), "true", {})
    assert info.value.retryable is False
    # A host missing from known_hosts is refused as well: never trust on first use.
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(TransportError, match="host key not accepted"):
        await _transport(sshd, known_hosts=empty).run(_server(), "true", {})


async def test_openssh_unknown_client_key_and_closed_port(sshd: Sshd, tmp_path: Path) -> None:
    _keygen(tmp_path / "stranger")
    with pytest.raises(TransportError, match="authentication refused"):
        await _transport(sshd, client_keys=[tmp_path / "stranger"]).run(_server(), "true", {})
    with pytest.raises(TransportError, match="authentication refused"):
        await _transport(sshd, username="nobody").run(_server(), "true", {})
    closed = _transport(sshd, port=_free_port(), connect_timeout=3)
    with pytest.raises(TransportError) as info:
        await closed.run(_server(), "true", {})
    assert info.value.retryable is True


async def test_openssh_timeout_stops_the_remote_command(sshd: Sshd) -> None:
    transport = _transport(sshd)
    tag = f"provisioning-test-{uuid.uuid4()}"
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="timed out"):
            await transport.run(_server(), f"sh -c 'sleep 30' {tag}", {}, timeout=1)
        assert time.monotonic() - started < 10
        # The connection survives a timed-out script.
        assert (await transport.run(_server(), "echo still", {})).stdout == "still\n"
    finally:
        await transport.close()
    await _eventually_gone(tag)


async def test_openssh_reconnects_after_the_connection_dies(sshd: Sshd) -> None:
    transport = _transport(sshd)
    try:
        # The script's parent is the sshd process serving this connection (it was started
        # by the fixture's sshd); killing it drops the cached connection while idle.
        session_pid = int((await transport.run(_server(), "echo $PPID", {})).stdout)
        os.kill(session_pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        result = await transport.run(_server(), "echo back", {})
        assert result.stdout == "back\n"
        assert transport.open_connections == 1
        # A connection lost in the middle of a script is a TransportError, not an exit code.
        with pytest.raises(TransportError, match=r"(?i)connection lost"):
            await transport.run(_server(), "kill -9 $PPID; sleep 5", {})
    finally:
        await transport.close()


async def _eventually_gone(tag: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", tag], capture_output=True)
        if found.returncode != 0:
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"remote command {tag} still running after the timeout")
