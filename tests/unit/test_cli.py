"""The real CLI in a subprocess: bad files exit 2 with a short, placed message; the
examples validate and plan; the taskserv search path extends the catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BAD = Path(__file__).resolve().parent / "fixtures" / "bad"
EXAMPLES = sorted((REPO / "workflows").glob("*.ncl"))
SEED = REPO / "workflows" / "example_batch.ncl"
MAX_LINES = 60


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONING_")}
    e["PROVISIONING_DATA_DIR"] = str(tmp_path / "data")
    return e


def cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def flat(text: str) -> str:
    """Rich wraps long lines at the terminal width; compare with whitespace folded."""
    return " ".join(text.split())


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# fixture file -> what stderr must mention (the place of the mistake)
BAD_CASES: dict[str, list[str]] = {
    "cycle.ncl": ["cycle", "alpha", "beta", "gamma"],
    "unknown_dependency.ncl": ["'install'", "'severs_typo'", "unknown dependency"],
    "string_for_number.ncl": ["string_for_number.ncl:5:", "`parallel_limit`"],
    "wrong_operation_type.ncl": ["wrong_operation_type.ncl:8:", "`type`", "server_batch"],
    "wrong_provider.ncl": ["wrong_provider.ncl:9:", "`provider`", "upcloud, aws, local"],
    "unknown_taskserv.ncl": ["'web'", "'nginx'", "containerd", "kubernetes", "cilium"],
    "duplicate_ids.ncl": ["'servers'", "duplicate"],
    "server_batch_without_configs.ncl": [
        "server_batch_without_configs.ncl",
        "operation 'servers'",
        "server_config",
    ],
}


def test_every_bad_fixture_has_a_case() -> None:
    assert sorted(p.name for p in BAD.glob("*.ncl")) == sorted(BAD_CASES)


@pytest.mark.parametrize("name", sorted(BAD_CASES))
@pytest.mark.parametrize("command", [["batch", "validate"], ["batch", "plan", "--json"]])
def test_bad_file_exits_2_with_a_placed_message(
    env: dict[str, str], name: str, command: list[str]
) -> None:
    path = BAD / name
    result = cli(env, *command[:2], rel(path), *command[2:])
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout.strip() == ""
    err = result.stderr
    assert "Traceback" not in err
    assert "\x1b" not in err
    assert 0 < len(err.splitlines()) < MAX_LINES, err
    assert err.lstrip().startswith("error:"), err
    for needle in BAD_CASES[name]:
        assert needle in flat(err), f"{needle!r} not in:\n{err}"


def test_cycle_path_is_printed_in_dependency_order(env: dict[str, str]) -> None:
    err = flat(cli(env, "batch", "validate", rel(BAD / "cycle.ncl")).stderr)
    # alpha needs gamma, gamma needs beta, beta needs alpha
    rotations = [
        "alpha -> gamma -> beta -> alpha",
        "gamma -> beta -> alpha -> gamma",
        "beta -> alpha -> gamma -> beta",
    ]
    assert any(r in err for r in rotations), err


def test_missing_file_exits_2(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "batch", "validate", tmp_path / "nope.ncl")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nope.ncl" in flat(result.stderr)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate(env: dict[str, str], path: Path) -> None:
    result = cli(env, "batch", "validate", path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "valid" in result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_plan_json(env: dict[str, str], path: Path) -> None:
    result = cli(env, "batch", "plan", path, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"waves", "operations", "api_calls"} <= set(doc)
    assert sorted(op for wave in doc["waves"] for op in wave) == sorted(doc["operations"])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_plan_table(env: dict[str, str], path: Path) -> None:
    result = cli(env, "batch", "plan", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_seed_plan_json(env: dict[str, str]) -> None:
    result = cli(env, "batch", "plan", SEED, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["waves"] == [["upcloud_servers"], ["aws_taskservs"]]
    servers = doc["operations"]["upcloud_servers"]
    taskservs = doc["operations"]["aws_taskservs"]
    assert servers["type"] == "server_batch"
    assert servers["provider"] == "upcloud"
    assert servers["items"] == 2
    assert taskservs["type"] == "taskserv_batch"
    assert taskservs["items"] == 6
    assert taskservs["taskserv_order"] == ["containerd", "kubernetes", "cilium"]
    assert taskservs["servers"] == ["web-01", "web-02"]
    assert taskservs["dependencies"] == [{"on": "upcloud_servers", "kind": "hard"}]
    assert doc["api_calls"] > 0


EXTRA_TASKSERV = """
let C = import "taskservs.ncl" in
{
  name = "helm",
  version = "3.16",
  description = "test entry",
  requires = ["kubernetes"],
  check = C.script name version "exit 1",
  apply = C.script name version "write_marker",
  verify = C.script name version "need_file /var/lib/provisioning/taskservs/helm.installed",
  uninstall = C.script name version "drop_file /var/lib/provisioning/taskservs/helm.installed",
} | C.Taskserv
"""

USES_HELM = """
{
  batch_workflow = {
    name = "with_helm",
    operations = [
      {
        id = "servers",
        type = "server_batch",
        provider = "local",
        server_configs = [{ name = "n1", plan = "local", zone = "local" }],
      },
      {
        id = "apps",
        type = "taskserv_batch",
        dependencies = ["servers"],
        taskservs = ["helm", "containerd", "kubernetes"],
      },
    ],
  },
}
"""


def test_taskserv_path_adds_a_catalog_entry(env: dict[str, str], tmp_path: Path) -> None:
    extra = tmp_path / "catalog"
    extra.mkdir()
    (extra / "helm.ncl").write_text(EXTRA_TASKSERV)
    workflow = tmp_path / "helm_workflow.ncl"
    workflow.write_text(USES_HELM)

    without = cli(env, "batch", "validate", workflow)
    assert without.returncode == 2
    assert "'helm'" in flat(without.stderr)
    assert "Traceback" not in without.stderr

    env = {**env, "PROVISIONING_TASKSERV_PATH": str(extra)}
    result = cli(env, "batch", "validate", workflow)
    assert result.returncode == 0, result.stderr
    plan = cli(env, "batch", "plan", workflow, "--json")
    assert plan.returncode == 0, plan.stderr
    op = json.loads(plan.stdout)["operations"]["apps"]
    assert op["taskserv_order"] == ["containerd", "kubernetes", "helm"]
    assert op["items"] == 3


def test_broken_catalog_entry_exits_2_naming_it(env: dict[str, str], tmp_path: Path) -> None:
    extra = tmp_path / "catalog"
    extra.mkdir()
    (extra / "broken.ncl").write_text('{ name = "broken", check = 1 }')
    env = {**env, "PROVISIONING_TASKSERV_PATH": str(extra)}
    result = cli(env, "batch", "validate", SEED)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "broken.ncl" in flat(result.stderr)


def test_stats_tables_show_a_dash_for_what_has_no_value(env: dict[str, str]) -> None:
    """`batch stats` against a stand-in API: an unlimited provider has no rate and an
    operation type without finished runs no durations."""
    from fastapi import FastAPI

    from runtime.sandbox.app_thread import AppServerThread

    doc = {
        "workflows": 2,
        "live": 0,
        "queued": 0,
        "success_rate": None,
        "by_status": {"Completed": 2},
        "items_by_state": {"Completed": 5},
        "operations_by_type": {"server_batch": {"count": 1, "mean_s": None, "p95_s": None}},
        "providers": {"local": {"granted_total": 5, "current_rate": None}},
    }
    app = FastAPI()
    app.get("/v1/workflows/batch/stats")(lambda: doc)
    with AppServerThread(app) as server:
        done = cli({**env, "PROVISIONING_API_URL": server.url, "PROVISIONING_API_TOKEN": "t"},
                   "batch", "stats")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "workflows by status" in done.stdout and "Traceback" not in done.stderr
    local = next(line for line in done.stdout.splitlines() if "local" in line)
    assert local.split("│")[1:-1][-1].strip() == "-"
