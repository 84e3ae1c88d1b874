"""The local provider on a real directory: one server per key, whatever a crash left."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from runtime.errors import PermanentError
from runtime.providers.local import CREATIONS_LOG, STATE_FILE, LocalProvider
from schemas.models import ServerConfigSpec


def spec(name: str) -> ServerConfigSpec:
    return ServerConfigSpec(name=name, plan="local", zone="local")


def log_lines(root: Path) -> list[str]:
    return (root / CREATIONS_LOG).read_text().splitlines()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_create_makes_a_directory_a_state_file_and_one_log_line(tmp_path: Path) -> None:
    p = LocalProvider(tmp_path)
    ref = run(p.create_server(spec("web-1"), "k1"))
    assert ref.name == "web-1" and ref.key == "k1" and ref.extra["root"] == str(tmp_path / "web-1")
    assert json.loads((tmp_path / "web-1" / STATE_FILE).read_text())["key"] == "k1"
    assert log_lines(tmp_path) == ["k1 web-1"]
    # Found by key, from this provider and from a fresh one (another actor, a restart).
    assert run(p.find_server("k1")) == ref
    assert run(LocalProvider(tmp_path).find_server("k1")) == ref
    assert run(p.find_server("k2")) is None


def test_a_second_create_of_the_same_key_makes_nothing(tmp_path: Path) -> None:
    run(LocalProvider(tmp_path).create_server(spec("web-1"), "k1"))
    ref = run(LocalProvider(tmp_path).create_server(spec("web-1"), "k1"))
    assert ref.key == "k1"
    assert log_lines(tmp_path) == ["k1 web-1"]


@pytest.mark.parametrize("left", ["empty dir", "torn state", "state, no log line"])
def test_what_a_crash_left_half_made_is_taken_over(tmp_path: Path, left: str) -> None:
    d = tmp_path / "web-1"
    d.mkdir()
    if left == "torn state":
        (d / STATE_FILE).write_text('{"name": "web-1", "ke')
    elif left == "state, no log line":
        (d / STATE_FILE).write_text(json.dumps({"name": "web-1", "key": "k1"}))
    p = LocalProvider(tmp_path)
    assert run(p.find_server("k1")) is None  # not made yet, as far as the index knows
    run(p.create_server(spec("web-1"), "k1"))
    assert log_lines(tmp_path) == ["k1 web-1"]
    assert json.loads((d / STATE_FILE).read_text())["key"] == "k1"
    assert p.keys() == ["k1"]


def test_a_server_of_another_key_is_never_taken(tmp_path: Path) -> None:
    run(LocalProvider(tmp_path).create_server(spec("web-1"), "k1"))
    with pytest.raises(PermanentError, match="another key"):
        run(LocalProvider(tmp_path).create_server(spec("web-1"), "k2"))
    assert log_lines(tmp_path) == ["k1 web-1"]


def test_delete_removes_the_server_and_its_key(tmp_path: Path) -> None:
    p = LocalProvider(tmp_path)
    ref = run(p.create_server(spec("web-1"), "k1"))
    run(p.create_server(spec("web-2"), "k2"))
    run(p.delete_server(ref))
    run(p.delete_server(ref))  # twice is fine: it is gone
    assert not (tmp_path / "web-1").exists()
    assert run(p.find_server("k1")) is None
    assert p.keys() == ["k2"]
