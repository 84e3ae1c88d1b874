"""The ``provisioning`` command line. Exit codes: 0 ok, 1 workflow failed, 2 bad input,
3 orchestrator unreachable."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from api import cli_remote, cli_service
from api.client import ApiUnreachableError
from api.progress import WorkflowProgress
from api.render import print_plan
from api.terminal import EXIT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE, err, out
from runtime.errors import InputError, ProvisioningError
from runtime.planner import Plan, build_plan
from runtime.settings import Settings
from schemas.catalog import catalog_dirs, load_catalog
from schemas.loader import load_workflow

app = typer.Typer(
    help="Batch workflow orchestrator for cloud infrastructure, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
batch = typer.Typer(help="Validate, plan, run and manage batch workflows.", no_args_is_help=True)
app.add_typer(batch, name="batch")

FileArg = Annotated[Path, typer.Argument(help="Workflow file (.ncl or .json).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory (default: $PROVISIONING_DATA_DIR or ~/.local/share/provisioning).",
    ),
]


def load_plan(file: Path, settings: Settings) -> Plan:
    workflow = load_workflow(file)
    catalog = load_catalog(catalog_dirs_for(settings))
    return build_plan(workflow, catalog)


def catalog_dirs_for(settings: Settings) -> list[Path]:
    return catalog_dirs({"PROVISIONING_TASKSERV_PATH": ":".join(map(str, settings.taskserv_path))})


@batch.command()
def validate(file: FileArg) -> None:
    """Check a workflow file against the contracts and the planner's rules."""
    plan = load_plan(file, Settings.from_env())
    out.print(
        f"[green]valid[/]: {plan.workflow.name}: {len(plan.operations)} operations, "
        f"{plan.item_count} items, {len(plan.waves)} waves"
    )
    for warning in plan.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")


@batch.command()
def plan(file: FileArg, as_json: JsonOpt = False) -> None:
    """Print the waves, item counts per provider, taskserv order and expected API calls."""
    p = load_plan(file, Settings.from_env())
    if as_json:
        print(json.dumps(p.to_json(), indent=2))
    else:
        print_plan(out, p)


@batch.command()
def run(
    file: Annotated[Path | None, typer.Argument(help="Workflow file (.ncl or .json).")] = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue an interrupted workflow by id.")
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray address to join (default: start one).")
    ] = None,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Run against the local stand-ins (UpCloud emulator, moto EC2, SSH endpoint), "
            "started for this run and stopped after it. No cloud account needed.",
        ),
    ] = False,
    upcloud_port: Annotated[int, typer.Option(help="Sandbox UpCloud emulator port.")] = 9091,
    ec2_port: Annotated[int, typer.Option(help="Sandbox moto EC2 port.")] = 9092,
    ssh_port: Annotated[int, typer.Option(help="Sandbox SSH endpoint port.")] = 9093,
) -> None:
    """Run a workflow in the foreground, without the API server, until it ends.

    Starts a local Ray instance (or joins --address / RAY_ADDRESS), shows progress per
    operation, prints a summary; exits 0 when Completed and 1 otherwise.
    """
    settings = Settings.from_env().with_data_dir(data_dir)
    if (file is None) == (resume is None):
        raise InputError("give a workflow FILE, or --resume ID (not both)")
    spec = None
    if file is not None:
        spec = load_plan(file, settings).workflow.model_dump(mode="json")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    stand_ins = None
    if sandbox:
        from runtime.sandbox.launcher import Sandbox, SandboxPorts

        ports = SandboxPorts(upcloud=upcloud_port, ec2=ec2_port, ssh=ssh_port)
        err.print(
            f"starting the sandbox (UpCloud :{upcloud_port}, EC2 :{ec2_port}, "
            f"SSH :{ssh_port}) under {settings.data_dir / 'sandbox'}"
        )
        stand_ins = Sandbox(settings.data_dir, ports).start()
        # The sandbox's endpoints and credentials replace the user's cloud settings.
        settings = replace(
            settings,
            provider_env=stand_ins.env(),
            poll_interval=0.25 if settings.poll_interval is None else settings.poll_interval,
        )
    from actors import runner  # Ray is imported only by commands that need it

    # Ray prints cluster events (a lost node, ...) to stdout: with --json, stdout must
    # carry the document alone, so everything else goes to stderr until it is printed.
    real_stdout = _stdout_to_stderr() if as_json else None
    runner.connect(address)
    try:
        orch = runner.start_orchestrator(settings, detached=False, resume=False)

        def announce(wid: str) -> None:
            # On stderr, unwrapped: scripts and operators need the id to --resume.
            print(
                f"workflow {wid} (resume with: provisioning batch run --resume {wid})",
                file=sys.stderr,
                flush=True,
            )

        if as_json:
            doc = runner.run_foreground(orch, spec, resume_id=resume, on_submit=announce)
        else:
            with WorkflowProgress(out) as bars:
                doc = runner.run_foreground(
                    orch, spec, resume_id=resume, on_status=bars.update, on_submit=announce
                )
    finally:
        runner.shutdown()
        if stand_ins is not None:
            stand_ins.stop()
        if real_stdout is not None:
            _restore_stdout(real_stdout)
    cli_remote.finish(doc, as_json)


# The service (`up`, `down`) and the commands that talk to it over REST live in their
# own modules; registered here so `python -m api.cli` and the console script agree.
app.command()(cli_service.up)
app.command()(cli_service.down)
for _name, _command in cli_remote.COMMANDS:
    batch.command(name=_name)(_command)


def _stdout_to_stderr() -> int:
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return saved


def _restore_stdout(saved: int) -> None:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def main() -> None:
    """Entry point: map errors to exit codes, never print a traceback for bad input."""
    try:
        app(standalone_mode=True)
    except ApiUnreachableError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_UNREACHABLE)
    except InputError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_INPUT)
    except ProvisioningError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
