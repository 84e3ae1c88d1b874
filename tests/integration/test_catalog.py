"""The taskserv catalog as Nickel really evaluates it: built-in entries, the search path,
and errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.catalog import (
    ENV_VAR,
    builtin_catalog_dir,
    catalog_dirs,
    load_catalog,
    load_entry,
    schemas_dir,
)
from schemas.errors import InputError

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[")


def _entry(name: str, version: str = "9.9", requires: str = "[]", extra: str = "") -> str:
    return f"""
let C = import "taskservs.ncl" in
{{
  name = "{name}",
  version = "{version}",
  requires = {requires},
  check = "exit 1",
  apply = C.script name version "echo applied",
  verify = "true",
  uninstall = "true",
  {extra}
}} | C.Taskserv
"""


def test_builtin_entries_load_with_their_requires() -> None:
    catalog = load_catalog([builtin_catalog_dir()])
    assert {"containerd", "kubernetes", "cilium"} <= set(catalog)
    assert catalog["containerd"].requires == ()
    assert catalog["kubernetes"].requires == ("containerd",)
    assert catalog["cilium"].requires == ("kubernetes",)
    for spec in catalog.values():
        assert spec.description
        assert spec.version != "0.0.0"
        # The shared prelude is in every step, so each can run on its own.
        for step in (spec.check, spec.apply, spec.verify, spec.uninstall):
            assert step.startswith("set -euo pipefail")
            assert 'MARKER="$ROOT/var/lib/provisioning/taskservs/$TASKSERV.installed"' in step


def test_builtin_dir_is_next_to_schemas() -> None:
    assert builtin_catalog_dir() == schemas_dir().parent / "taskservs"
    assert (schemas_dir() / "taskservs.ncl").is_file()


def test_defaults_apply(tmp_path: Path) -> None:
    (tmp_path / "tiny.ncl").write_text(
        'let C = import "taskservs.ncl" in '
        '{ name = "tiny", check = "true", apply = "true", verify = "true", uninstall = "true" }'
        " | C.Taskserv"
    )
    spec = load_entry(tmp_path / "tiny.ncl")
    assert (spec.version, spec.description, spec.requires) == ("0.0.0", "", ())


def test_search_path_dir_shadows_and_extends(tmp_path: Path) -> None:
    (tmp_path / "containerd.ncl").write_text(_entry("containerd", version="2.0"))
    (tmp_path / "etcd.ncl").write_text(_entry("etcd", requires='["containerd"]'))
    dirs = catalog_dirs({ENV_VAR: f"{tmp_path}:/nonexistent/dir"})
    assert dirs == [tmp_path, Path("/nonexistent/dir"), builtin_catalog_dir()]

    catalog = load_catalog(dirs)
    assert catalog["containerd"].version == "2.0"  # the earlier dir wins
    assert catalog["etcd"].requires == ("containerd",)
    assert catalog["kubernetes"].requires == ("containerd",)  # built-ins still there


def test_catalog_dirs_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert catalog_dirs() == [tmp_path, builtin_catalog_dir()]
    monkeypatch.delenv(ENV_VAR)
    assert catalog_dirs() == [builtin_catalog_dir()]


def test_contract_error_names_the_file_without_ansi(tmp_path: Path) -> None:
    bad = tmp_path / "broken.ncl"
    bad.write_text(_entry("broken", requires="[42]"))
    with pytest.raises(InputError) as info:
        load_catalog([tmp_path])
    message = str(info.value)
    assert str(bad) in message
    assert "contract broken" in message
    assert f"{bad}:" in message.split("\n", 1)[1]  # Nickel's own position names the file too
    assert not ANSI.search(message)


def test_unknown_field_and_syntax_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "extra.ncl").write_text(_entry("extra", extra='colour = "red",'))
    with pytest.raises(InputError, match=r"extra\.ncl") as info:
        load_entry(tmp_path / "extra.ncl")
    assert "colour" in str(info.value)
    assert not ANSI.search(str(info.value))

    (tmp_path / "syntax.ncl").write_text("{ name = ")
    with pytest.raises(InputError, match=r"syntax\.ncl") as info:
        load_entry(tmp_path / "syntax.ncl")
    assert not ANSI.search(str(info.value))


def test_name_must_match_file_stem_and_pattern(tmp_path: Path) -> None:
    (tmp_path / "alpha.ncl").write_text(_entry("beta"))
    with pytest.raises(InputError, match="must equal the file name 'alpha'"):
        load_entry(tmp_path / "alpha.ncl")

    (tmp_path / "Caps.ncl").write_text(_entry("Caps"))
    with pytest.raises(InputError, match=r"Caps\.ncl[\s\S]*expected a taskserv name"):
        load_entry(tmp_path / "Caps.ncl")


def test_version_must_be_shell_safe(tmp_path: Path) -> None:
    (tmp_path / "quoted.ncl").write_text(_entry("quoted", version='1.0\\"; rm -rf /'))
    with pytest.raises(InputError, match="expected a version"):
        load_entry(tmp_path / "quoted.ncl")


def test_edited_file_is_evaluated_again(tmp_path: Path) -> None:
    path = tmp_path / "edit.ncl"
    path.write_text(_entry("edit", version="1.0"))
    assert load_entry(path).version == "1.0"
    path.write_text(_entry("edit", version="1.0.1"))  # size differs even if mtime does not
    assert load_entry(path).version == "1.0.1"
