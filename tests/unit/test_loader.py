"""Loading workflow files: the seed, JSON, Nickel and pydantic errors, hostile imports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nickel
import pytest

from schemas import loader
from schemas.loader import (
    WorkflowLoadError,
    load_workflow,
    load_workflow_source,
    workflow_from_data,
)
from schemas.models import DependencyKind, OperationType, ProviderName, WorkflowSpec

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "workflows" / "example_batch.ncl"
ESC = "\x1b"

MINIMAL_OP = (
    '{ id = "s", type = "server_batch", provider = "local", '
    'server_configs = [{ name = "a", plan = "p", zone = "z" }] }'
)


def nickel_eval(path: Path) -> Any:
    """The file's raw value as Nickel sees it, without the contract."""
    return json.loads(nickel.run(f"import {json.dumps(str(path))}", []))


# ---- the seed ----------------------------------------------------------------------


def test_seed_loads_unchanged() -> None:
    spec = load_workflow(SEED)
    raw = nickel_eval(SEED)["batch_workflow"]
    assert isinstance(spec, WorkflowSpec)
    assert spec.name == raw["name"] == "multi_cloud_deployment"
    assert spec.version == raw["version"]
    assert spec.storage_backend == raw["storage_backend"]
    assert spec.parallel_limit == raw["parallel_limit"]
    assert spec.rollback_enabled == raw["rollback_enabled"]
    assert [op.id for op in spec.operations] == [op["id"] for op in raw["operations"]]
    servers, taskservs = spec.operations
    assert servers.type is OperationType.SERVER_BATCH
    assert servers.provider is ProviderName.UPCLOUD
    assert [c.model_dump(exclude_defaults=True) for c in servers.server_configs] == raw[
        "operations"
    ][0]["server_configs"]
    assert taskservs.type is OperationType.TASKSERV_BATCH
    assert taskservs.taskservs == tuple(raw["operations"][1]["taskservs"])
    assert [d.on for d in taskservs.dependencies] == raw["operations"][1]["dependencies"]
    assert all(d.kind is DependencyKind.HARD for d in taskservs.dependencies)
    # defaults the seed leaves out
    assert spec.on_failure == "continue"
    assert spec.rollback_on_failure is False
    assert taskservs.servers is None


def test_every_example_loads() -> None:
    files = sorted((REPO / "workflows").glob("*.ncl"))
    assert SEED in files
    for path in files:
        assert load_workflow(path).operations, path


def test_json_of_the_same_shape_loads(tmp_path: Path) -> None:
    raw = nickel_eval(SEED)
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(raw))
    assert load_workflow(path) == load_workflow(SEED)


def test_json_inner_record_is_accepted() -> None:
    raw = nickel_eval(SEED)
    assert workflow_from_data(raw["batch_workflow"]) == workflow_from_data(raw)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WorkflowLoadError, match="no such file"):
        load_workflow(tmp_path / "nope.ncl")


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"batch_workflow": ')
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow(path)
    assert str(path) in str(info.value)


# ---- Nickel contract errors ----------------------------------------------------------


def _ncl(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("field_line", "line", "field"),
    [
        ('parallel_limit = "five",', 4, "parallel_limit"),
        ('on_failure = "explode",', 4, "on_failure"),
        ('storage_backend = "mysql",', 4, "storage_backend"),
    ],
)
def test_nickel_contract_error_keeps_message_file_and_line(
    tmp_path: Path, field_line: str, line: int, field: str
) -> None:
    path = _ncl(
        tmp_path,
        "bad_contract.ncl",
        '{\n  batch_workflow = {\n    name = "x",\n'
        f"    {field_line}\n"
        f"    operations = [{MINIMAL_OP}],\n  }},\n}}\n",
    )
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow(path)
    msg = str(info.value)
    assert ESC not in msg
    assert "contract broken" in msg  # Nickel's own wording
    assert f"`{field}`" in msg
    assert re.search(rf"{re.escape(str(path))}:{line}:\d+", msg), msg


def test_nickel_enum_error_in_an_operation(tmp_path: Path) -> None:
    path = _ncl(
        tmp_path,
        "bad_enum.ncl",
        '{\n  batch_workflow = {\n    name = "x",\n    operations = [\n'
        '      { id = "s", type = "server_batch", provider = "gcp",\n'
        '        server_configs = [{ name = "a", plan = "p", zone = "z" }] },\n'
        "    ],\n  },\n}\n",
    )
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow(path)
    msg = str(info.value)
    assert ESC not in msg
    assert "`provider`" in msg
    assert "upcloud, aws, local" in msg
    assert f"{path}:5:" in msg


def test_nickel_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = _ncl(tmp_path, "syntax.ncl", "{ batch_workflow = { name = } }\n")
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow(path)
    assert str(path) in str(info.value)
    assert ESC not in str(info.value)


def test_ansi_is_stripped_from_whatever_nickel_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _ncl(tmp_path, "ok.ncl", "{}")

    def fake_run(expr: str, import_paths: list[str]) -> str:
        raise nickel.NickelException(f"\x1b[1m\x1b[38;5;9merror\x1b[0m: boom at {path}:3:1")

    monkeypatch.setattr(loader.nickel, "run", fake_run)
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow(path)
    assert ESC not in str(info.value)
    assert "error: boom" in str(info.value)


# ---- pydantic errors -----------------------------------------------------------------


def _seed_data() -> dict[str, Any]:
    data: dict[str, Any] = nickel_eval(SEED)
    return data


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (
            lambda d: d["batch_workflow"]["operations"][1].__setitem__("retry", {"attempts": 0}),
            "batch_workflow.operations.1.retry.attempts (operation 'aws_taskservs')",
        ),
        (
            lambda d: d["batch_workflow"]["operations"][0]["server_configs"][1].__setitem__(
                "zone", ""
            ),
            "batch_workflow.operations.0.server_configs.1.zone (operation 'upcloud_servers')",
        ),
        (
            lambda d: d["batch_workflow"]["operations"][0].__setitem__("colour", "red"),
            "batch_workflow.operations.0.colour (operation 'upcloud_servers')",
        ),
        (
            lambda d: d["batch_workflow"]["operations"][1].__setitem__(
                "tolerated_failures", "lots"
            ),
            "batch_workflow.operations.1.tolerated_failures (operation 'aws_taskservs')",
        ),
        (
            lambda d: d["batch_workflow"].__setitem__("parallel_limit", 0),
            "batch_workflow.parallel_limit",
        ),
    ],
)
def test_json_errors_name_field_path_and_operation(tmp_path: Path, mutate: Any, where: str) -> None:
    data = _seed_data()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow(path)
    msg = str(info.value)
    assert msg.startswith(str(path))
    assert where in msg, msg


def test_model_rules_apply_to_json(tmp_path: Path) -> None:
    data = _seed_data()
    del data["batch_workflow"]["operations"][0]["server_configs"]
    with pytest.raises(WorkflowLoadError) as info:
        workflow_from_data(data, "in.json")
    assert "operation 'upcloud_servers'" in str(info.value)
    assert "server_config" in str(info.value)


def test_many_errors_are_capped() -> None:
    ops = [
        {"id": f"op{i}", "type": "server_batch", "provider": "nowhere", "server_configs": []}
        for i in range(50)
    ]
    with pytest.raises(WorkflowLoadError) as info:
        workflow_from_data({"batch_workflow": {"name": "x", "operations": ops}})
    assert len(str(info.value).splitlines()) <= 25


# ---- untrusted source: imports ---------------------------------------------------------


@pytest.fixture
def nickel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every expression handed to Nickel (while still evaluating it)."""
    calls: list[str] = []
    real = loader.nickel.run

    def spy(expr: str, import_paths: list[str]) -> str:
        calls.append(expr)
        return str(real(expr, import_paths=import_paths))

    monkeypatch.setattr(loader.nickel, "run", spy)
    return calls


@pytest.mark.parametrize(
    "source",
    [
        'import "/etc/passwd"',
        'import "../x.ncl"',
        'import "/etc/os-release" as \'Text',
        '{ batch_workflow = (import "/etc/os-release" as \'Text) }',
        'import "workflows.ncl" as \'Text',
        'import "sub/workflows.ncl"',
        'import "submitted.ncl"',
        '{ a = import\n  "/etc/passwd" }',
    ],
)
def test_hostile_import_refused_before_evaluation(source: str, nickel_calls: list[str]) -> None:
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow_source(source, "sub.ncl")
    msg = str(info.value)
    assert nickel_calls == [], "refused only after Nickel evaluated it"
    assert "import refused" in msg
    assert msg.startswith("sub.ncl:")
    assert "root:" not in msg
    assert "PRETTY_NAME" not in msg


def test_refused_import_reports_its_line(nickel_calls: list[str]) -> None:
    source = '{\n  batch_workflow = {\n    x = import "/etc/passwd",\n  },\n}\n'
    with pytest.raises(WorkflowLoadError, match=r"^sub\.ncl:3: import refused"):
        load_workflow_source(source, "sub.ncl")
    assert nickel_calls == []


def test_allowed_import_works(nickel_calls: list[str]) -> None:
    source = (
        'let W = import "workflows.ncl" in\n'
        "{ batch_workflow = {\n"
        '    name = "submitted",\n'
        f"    operations = [{MINIMAL_OP}],\n"
        "  } | W.BatchWorkflow }\n"
    )
    spec = load_workflow_source(source, "sub.ncl")
    assert spec.name == "submitted"
    assert [op.id for op in spec.operations] == ["s"]
    assert len(nickel_calls) == 1


def test_source_without_imports_is_evaluated_with_contract() -> None:
    ok = f'{{ batch_workflow = {{ name = "x", operations = [{MINIMAL_OP}] }} }}'
    assert load_workflow_source(ok).parallel_limit == 10  # default filled in
    bad = '{ batch_workflow = { name = "x", parallel_limit = "five", operations = [] } }'
    with pytest.raises(WorkflowLoadError) as info:
        load_workflow_source(bad, "mine.ncl")
    msg = str(info.value)
    assert "`parallel_limit`" in msg
    assert "mine.ncl:1:" in msg
    assert "prov-submit-" not in msg  # the private temp path is not shown
    assert ESC not in msg


def test_import_dirs_extend_the_allowed_names(tmp_path: Path, nickel_calls: list[str]) -> None:
    (tmp_path / "shared.ncl").write_text('{ name = "from-shared" }')
    source = (
        'let S = import "shared.ncl" in\n'
        f"{{ batch_workflow = {{ name = S.name, operations = [{MINIMAL_OP}] }} }}\n"
    )
    with pytest.raises(WorkflowLoadError, match="import refused"):
        load_workflow_source(source, "sub.ncl")
    assert nickel_calls == []
    spec = load_workflow_source(source, "sub.ncl", import_dirs=[tmp_path])
    assert spec.name == "from-shared"


def test_invalid_operation_is_not_also_reported_as_no_operations() -> None:
    data = {
        "batch_workflow": {
            "name": "x",
            "operations": [{"id": "servers", "type": "server_batch", "provider": "upcloud"}],
        }
    }
    with pytest.raises(WorkflowLoadError) as info:
        workflow_from_data(data, "in.json")
    msg = str(info.value)
    assert "operation 'servers'" in msg
    assert "at least 1 item" not in msg, msg


def test_an_empty_operations_list_is_still_reported() -> None:
    data = {"batch_workflow": {"name": "x", "operations": []}}
    with pytest.raises(WorkflowLoadError) as info:
        workflow_from_data(data, "in.json")
    assert "batch_workflow.operations" in str(info.value)
    assert "at least 1 item" in str(info.value)
