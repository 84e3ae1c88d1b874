"""The built-in catalog's real scripts, run by LocalTransport under a temporary ROOT.

No network and no packages: with ROOT set the scripts write configuration only, and
nothing may appear or change outside ROOT.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.errors import TransportError
from runtime.providers.base import ServerRef
from runtime.transports.base import ScriptResult
from runtime.transports.local import LocalTransport
from schemas.catalog import builtin_catalog_dir, load_catalog
from schemas.models import TaskservSpec

pytestmark = pytest.mark.integration

CATALOG = load_catalog([builtin_catalog_dir()])
CHAIN = {"containerd": [], "kubernetes": ["containerd"], "cilium": ["containerd", "kubernetes"]}
CONFIG = {
    "containerd": "etc/containerd/config.toml",
    "kubernetes": "etc/kubernetes/kubeadm-config.yaml",
    "cilium": "etc/cilium/values.yaml",
}


def _server(root: Path, name: str = "node-1") -> ServerRef:
    return ServerRef(
        provider="local", id=name, name=name, key=f"k-{name}", extra={"root": str(root)}
    )


async def _step(server: ServerRef, spec: TaskservSpec, step: str) -> ScriptResult:
    env = {"SERVER_NAME": server.name, "TASKSERV": spec.name}
    return await LocalTransport().run(server, getattr(spec, step), env, timeout=60)


def _host_snapshot(paths: list[str]) -> dict[str, tuple[int, int] | None]:
    """What the host has at each path, to prove a sandbox run left it alone."""
    snap: dict[str, tuple[int, int] | None] = {}
    for rel in paths:
        host = Path("/") / rel
        try:
            st = host.stat()
            snap[rel] = (st.st_mtime_ns, st.st_size)
        except OSError:
            snap[rel] = None
    return snap


def _written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["containerd", "kubernetes", "cilium"])
async def test_lifecycle_under_a_sandbox_root(tmp_path: Path, name: str) -> None:
    root = tmp_path / "node-1"
    server = _server(root)
    spec = CATALOG[name]
    for prereq in CHAIN[name]:
        assert (await _step(server, CATALOG[prereq], "apply")).exit_code == 0

    assert (await _step(server, spec, "check")).exit_code != 0, "check must fail before apply"
    assert (await _step(server, spec, "verify")).exit_code != 0

    applied = await _step(server, spec, "apply")
    assert applied.exit_code == 0, applied.stderr
    assert "package installation is skipped" in applied.stdout
    marker = root / "var/lib/provisioning/taskservs" / f"{name}.installed"
    assert marker.read_text().splitlines() == [
        f"taskserv={name}",
        f"version={spec.version}",
        "server=node-1",
    ]
    assert (root / CONFIG[name]).stat().st_size > 0
    assert (await _step(server, spec, "check")).exit_code == 0
    verified = await _step(server, spec, "verify")
    assert verified.exit_code == 0, verified.stderr

    # Idempotent: a second apply changes nothing and still passes check and verify.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = await _step(server, spec, "apply")
    assert again.exit_code == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    assert (await _step(server, spec, "check")).exit_code == 0

    uninstalled = await _step(server, spec, "uninstall")
    assert uninstalled.exit_code == 0, uninstalled.stderr
    assert not marker.exists()
    assert not (root / CONFIG[name]).exists()
    assert (await _step(server, spec, "check")).exit_code != 0
    assert (await _step(server, spec, "uninstall")).exit_code == 0, "uninstall re-runs cleanly"
    # What it required is still installed.
    for prereq in CHAIN[name]:
        assert (await _step(server, CATALOG[prereq], "check")).exit_code == 0


async def test_full_chain_touches_nothing_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "node-2"
    server = _server(root, "node-2")
    # Every path the scripts write, as it would be on the host.
    probe = tmp_path / "probe"
    for name in CHAIN["cilium"] + ["cilium"]:
        await _step(_server(probe, "probe"), CATALOG[name], "apply")
    host_paths = _written(probe)
    assert "etc/containerd/config.toml" in host_paths
    host_before = _host_snapshot(host_paths)
    root.mkdir()
    outside_before = sorted(os.listdir(tmp_path))

    for name in ["containerd", "kubernetes", "cilium"]:
        result = await _step(server, CATALOG[name], "apply")
        assert result.exit_code == 0, result.stderr
    for name in ["cilium", "kubernetes", "containerd"]:
        result = await _step(server, CATALOG[name], "uninstall")
        assert result.exit_code == 0, result.stderr

    assert _host_snapshot(host_paths) == host_before
    assert sorted(os.listdir(tmp_path)) == outside_before
    assert not list((root / "var/lib/provisioning/taskservs").iterdir())
    leftovers = [p for p in _written(root) if (root / p).is_file()]
    assert leftovers == [], "uninstall removes every file apply wrote"


async def test_apply_refuses_to_run_before_its_requirement(tmp_path: Path) -> None:
    server = _server(tmp_path / "node-3", "node-3")
    result = await _step(server, CATALOG["cilium"], "apply")
    assert result.exit_code != 0
    assert "cilium requires kubernetes" in result.stderr


async def test_root_cannot_be_overridden_by_the_caller(tmp_path: Path) -> None:
    server = _server(tmp_path / "node-4", "node-4")
    result = await LocalTransport().run(server, 'echo "$ROOT|$PWD|$HOME"', {"ROOT": ""})
    root = str((tmp_path / "node-4").resolve())
    assert result.stdout.strip() == f"{root}|{root}|{root}"


async def test_local_transport_basics(tmp_path: Path) -> None:
    transport = LocalTransport(base_dir=tmp_path)
    server = ServerRef(provider="local", id="x", name="box", key="k")
    # A command reading stdin must not swallow the rest of the script.
    result = await transport.run(server, "cat\necho after\nexit 7", {"A": "x y"})
    assert (result.exit_code, result.stdout) == (7, "after\n")
    assert (tmp_path / "box").is_dir()
    # pipefail and -u are on.
    assert (await transport.run(server, "false | true", {})).exit_code == 1
    assert (await transport.run(server, 'echo "$UNSET_VAR"', {})).exit_code == 1
    big = await transport.run(server, "head -c 200000 /dev/zero | tr '\\0' x", {})
    assert big.stdout.startswith("[... ") and big.stdout.endswith("x" * 1000)
    assert len(big.stdout) < 70 * 1024
    with pytest.raises(TransportError, match="timed out"):
        await transport.run(server, "sleep 30", {}, timeout=0.5)
    with pytest.raises(TransportError, match="no sandbox directory"):
        await LocalTransport().run(server, "true", {})
