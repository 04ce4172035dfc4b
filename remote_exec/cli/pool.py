"""``rx map``: a script over a grid of argument values, across hosts and their GPUs (see
:mod:`remote_exec.pool.sweep`)."""

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError
from .application import app
from .complete import complete_hosts

__all__ = ["map_command"]


@app.command("map", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                      "allow_interspersed_args": False})
# shape: typer declares each option as a parameter; the body is 30 lines
def map_command(
    ctx: typer.Context,
    target: Annotated[list[str] | None, typer.Argument(
        metavar="[SCRIPT] [ARGS]...",
        help="SCRIPT and its ARGS; ':::' starts an axis: --lr ::: 0.1 0.01 runs once with each value.",
        show_default=False)] = None,
    module: Annotated[str | None, typer.Option("-m", "--module", help="Run MODULE as `python -m MODULE`.")] = None,
    remote: Annotated[list[str] | None, typer.Option(
        "--remote", "-r", help="A host of the pool; repeatable.", autocompletion=complete_hosts)] = None,
    per_host: Annotated[int | None, typer.Option(
        "--per-host", min=1, help="Runs at a time per host (default: one per --gpus GPUs, else 1).")] = None,
    gpus: Annotated[int, typer.Option(
        min=0, help="GPUs per run; the run sees them as CUDA_VISIBLE_DEVICES.")] = 0,
    grid: Annotated[Path | None, typer.Option(
        help="More axes or whole combinations from a JSON, TOML or CSV file.")] = None,
    retries: Annotated[int, typer.Option(
        min=0, help="Tries again after a failure that was not the script's (a host that dropped).")] = 2,
    backend: Annotated[str | None, typer.Option(help="SSH backend: openssh or paramiko.")] = None,
    python: Annotated[str | None, typer.Option(help="Remote interpreter (default python3).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop each run after SECONDS (exit 124).", min=0.001)] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the runs; repeatable.")] = None,
    pull: Annotated[list[str] | None, typer.Option(
        help="Bring back only files matching GLOB; repeatable.")] = None,
    no_pull: Annotated[bool, typer.Option("--no-pull", help="Bring back no files.")] = False,
    workspace: Annotated[Path | None, typer.Option(help="Workspace dir (default RX_WORKSPACE or ./.rx).")] = None,
    ssh_config: Annotated[Path | None, typer.Option(
        help="ssh_config file (default RX_SSH_CONFIG or ~/.ssh/config).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the combinations; run nothing.")] = False,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="A live table (default when stderr is a terminal) or a line per run.",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sweep's record as JSON at the end.")] = False,
) -> None:
    """Run SCRIPT (or -m MODULE) once per combination of the ':::' axes, on the hosts given with -r.

    \b
    rx map -r gpu1 -r gpu2 --gpus 1 train.py --lr ::: 0.1 0.01 --seed ::: 1 2
    (4 runs: every combination of the two axes)

    One parent run records the sweep (rx show PARENT: a line per combination), each combination is a
    child run of its own. Exit status: 0 every run finished with exit 0; 1 some did not; 130
    interrupted; 255 every host lost.
    """
    from ..config import Configuration, check_pull, check_remote_backend, check_timeout
    from ..pool.sweep import SweepPlan, parse_grid, read_grid_file
    from ..workspace import Workspace
    from .run import load_task, parse_env, unknown_option
    from .sweeps import run_plan

    words = list(target or [])
    if words and words[0].startswith("-") and words[0] != "-":
        raise unknown_option(ctx, words[0])
    if not remote:
        raise ConfigError("rx map needs hosts", hint="rx map -r gpu1 -r gpu2 SCRIPT ARGS ::: VALUES")
    if backend is not None:
        check_remote_backend(backend)
    task, args, _, name = load_task(words, module)
    layout = parse_grid(args)
    if grid is not None:
        layout = read_grid_file(grid, layout)
    combinations = layout.combinations()
    if dry_run:
        for combination in combinations:
            typer.echo(f"{combination.index}\t{combination.label}\t{' '.join(combination.args)}")
        return
    options: dict[str, Any] = {
        "backend": backend, "python": python, "timeout": check_timeout(timeout), "env": parse_env(env or []),
        "pull": list(check_pull(pull or [])), "no_pull": no_pull, "ssh_config": ssh_config}
    options = {key: value for key, value in options.items() if value not in (None, [], {}, False)}
    plan = SweepPlan(task=task, grid=layout, combinations=tuple(combinations), hosts=tuple(remote),
                     per_host=per_host, gpus=gpus, retries=retries, options=options,
                     argv=tuple(target or []), target=name, progress=progress)
    config = Configuration.load().with_workspace(workspace)  # (its runs never travel with the project)
    raise typer.Exit(run_plan(plan, Workspace.resolve(config.workspace), config, as_json))
