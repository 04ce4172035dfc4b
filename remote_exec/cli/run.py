"""``rx run`` and ``rx rerun``: run a script or module, locally or on a host, and record it."""

import importlib.util
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import click
import typer

from ..config import check_env, check_pull, check_remote_backend, check_secret_env, check_timeout
from ..early import adopt_or_connect
from ..errors import (
    ConfigError,
    Interrupted,
    LocalDiskFull,
    RemoteExecError,
    RunBusy,
    UsageError,
    WorkspaceError,
    printable,
)
from .application import app
from .complete import complete_hosts, complete_runs
from .early import HeadStart, run_session
from .say import say

__all__ = [
    "DetachedRun",
    "JobStatusLine",
    "attach_run",
    "env_options",
    "forwarded_stdin",
    "load_detached_run",
    "load_task",
    "parse_env",
    "rerun",
    "run",
    "unknown_option",
]


def parse_env(values: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` options as a dict."""
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        env[name] = value
    return check_env(env)


def _module_origin(module: str) -> Path | None:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"-m {module}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(cwd)
    if spec is None:
        raise ConfigError(f"no module named {module!r}", hint="run rx from the folder that holds it")
    if spec.submodule_search_locations is not None:
        main = importlib.util.find_spec(f"{module}.__main__")
        return Path(main.origin) if main and main.origin else None
    return Path(spec.origin) if spec.origin and spec.origin not in ("built-in", "frozen") else None


def _project(session: Any, target: str, dry_run: bool, as_json: bool, detach: bool = False) -> bool:
    """Scan the run's project now (its summary line or warnings on stderr); with ``dry_run`` list what would
    travel. Returns True when the run is to go ahead. A remote's target is resolved first: a job's
    scheduler options are checked before anything is scanned or connects."""
    from ..coordinator import Coordinator
    from ..protocol.options import root_of
    from .sync import describe_project, print_listing

    coordinator = Coordinator.current()
    if session.context.get("remote"):
        where = coordinator.resolve_target(session)
        if not dry_run and not where.launcher.schedules:  # connect while the tree is scanned (its failure,
            where.backend.connect_in_background()        # if any, is the first start's)
    project, warnings = coordinator.project_for(session)
    session.local["project"] = (project, warnings)
    if session.context.get("remote") and not dry_run and not detach:  # the runner starts while the run is
        session.local["runner_ahead"] = coordinator.runner_ahead(  # recorded
            session, where, root_of(project),
            started=session.local.pop("runner_head", None))
    describe_project(project, warnings, what=target)
    if dry_run and project is not None:
        print_listing(project, as_json=as_json)
    return not dry_run


def load_task(words: list[str], module: str | None) -> tuple[Any, list[str], str, str]:
    """The task of ``SCRIPT ARGS...`` (or ``-m MODULE ARGS...``): (task, args, kind, name). A script that
    does not compile is reported as Python would, before anything travels (exit 1).

    Raises:
        ConfigError: Nothing to run, or the script cannot be read.
    """
    from ..task import Task

    if module is None and not words:
        raise ConfigError("nothing to run", hint="rx run SCRIPT [ARGS]... or rx run -m MODULE [ARGS]...")
    if module is not None:
        task = Task.from_module(module, _module_origin(module))
        if task.filename:
            _refuse_syntax_errors(Path(task.filename).read_text(encoding="utf-8", errors="replace"),
                                  Path(os.path.relpath(task.filename)))
        return task, words, "module", f"-m {module}"
    script = Path(words[0])
    if not script.is_file():
        raise ConfigError(f"no such script: {script}")
    try:
        task = Task.from_script(script)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {script}: {exc}") from exc
    _refuse_syntax_errors(task.source or "", script)
    return task, words[1:], "script", str(script)


def execute_run(*, task: Any, args: list[str], remote: str | None, options: dict[str, Any],
                workspace: Path | None, kind: str, target: str, as_json: bool,
                parent: str | None = None, detach: bool = False, dry_run: bool = False,
                early: HeadStart | None = None) -> int:
    """Create a run, execute it through the pipeline, record its outcome; return the exit status (with
    ``dry_run``, only list what of the project would travel; ``early``: what ``cli.main`` started from the
    raw command line, a connection adopted when it is for the same host and maybe the script's runner,
    taken when it fits)."""
    from ..config import Configuration

    config = (early.config if early is not None else Configuration.load()).with_workspace(workspace)
    # connecting starts before the rest of rx is imported (or was started from the raw command line by
    # cli.main, see cli/early.py): it is what takes longest
    connection = early.connection if early is not None else None
    ahead = adopt_or_connect(connection, config, remote, options) if remote and not dry_run else None
    session = run_session(task, args, remote, options, config)
    session.local["backend_ahead"] = ahead
    session.local["runner_head"] = early.take_runner() if early is not None else None
    try:
        if not _project(session, target, dry_run, as_json, detach):
            return 0
        from ..workspace import Workspace

        ws = Workspace.resolve(config.workspace)

        def saved(run_id: str) -> bytes:  # in the run before it is listed: a listed run can be rerun
            session.run_id = run_id
            return bytes(session.dumps())

        run = ws.new_run(target=target, kind=kind, argv=list(args), remote=remote, parent=parent,
                         backend=config.effective_backend(options.get("backend")) if remote else "local",
                         running=not detach, session=saved)
        return _record_and_run(session, run, detach=detach, as_json=as_json)
    finally:
        for name in ("runner_head", "runner_ahead"):
            runner = session.local.pop(name, None)
            if runner is not None:  # not taken: the run ended before its call
                runner.close()


def _record_and_run(session: Any, run: Any, *, detach: bool, as_json: bool) -> int:
    """Run ``session`` (saved in ``run`` when it was made) or start it detached, and record how it ended."""
    from ..advice import run_chain
    from ..advices.remote import RemoteAdvice
    from ..workspace.recorder import RunRecorder
    from .sync import SyncBar

    bar = session.local["on_progress"] = SyncBar()
    session.local["on_env"] = _env_line
    if detach:
        return _detach(run, session, as_json)
    # (new_run made it running) --json: stdout carries the record only; the script's output goes to stderr
    # (and to stdout.log)
    recorder = RunRecorder(run, host=session.context.get("remote") or "local",
                           stdout=sys.stderr if as_json else None, stdin=forwarded_stdin(),
                           log_cap=session.config.log_cap)
    session.local["recorder"] = recorder
    session.local["on_job"] = JobStatusLine()
    came_back = False
    try:
        result = run_chain(session, [RemoteAdvice()])
        came_back = True
        bar.close()
    except LocalDiskFull as exc:
        uncollected(run, exc, exc.kept)
        raise
    except Interrupted as exc:
        if not session.local.get("job_left"):  # a job left queued stays the run's: rx attach collects it
            run.set_status("cancelled", exit_code=130, error=str(exc))
        raise
    except KeyboardInterrupt:
        run.set_status("cancelled", exit_code=130, error="interrupted")
        raise Interrupted("interrupted") from None
    except RemoteExecError as exc:
        if not session.local.get("job_left"):  # a job whose follower lost the login node goes on
            run.set_status("failed", exit_code=exc.exit_code, error=str(exc))
        raise
    finally:
        bar.close()
        recorder.close(record=not came_back)  # the run's end records them: one state rewrite less
    return finish_run(run, result, session.local.get("outcome"), as_json, actions=recorder.take_phases())


def forwarded_stdin() -> BinaryIO | None:
    """What ``rx run`` forwards to the task's stdin: its own stdin when that is a pipe or a file
    (``echo hi | rx run ...``, ``rx run ... < data``); None for a terminal (rx does not read the keyboard:
    the task's stdin is empty) or a device such as /dev/null."""
    stream = sys.stdin
    try:
        fd = stream.fileno()
        if os.isatty(fd) or stat.S_ISCHR(os.fstat(fd).st_mode):
            return None
    except (AttributeError, OSError, ValueError):  # no stdin, or not a file descriptor
        return None
    return stream.buffer


def _refuse_stdin_for_detached() -> None:
    """A detached run outlives this process, so it cannot read this process's stdin: say so when there is
    something on it, rather than give the task an empty stdin silently."""
    stream = forwarded_stdin()
    if stream is None:
        return
    fd = stream.fileno()
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        waiting = os.fstat(fd).st_size > os.lseek(fd, 0, os.SEEK_CUR)
    else:
        import select

        waiting = bool(select.select([fd], [], [], 0)[0]) and bool(os.read(fd, 1))
    if waiting:
        raise UsageError("stdin cannot be forwarded to a detached run (it outlives rx and its stdin)",
                         hint="have the script read a file, or run it without --detach")


def uncollected(run: Any, exc: LocalDiskFull, kept: dict[str, Any] | None) -> None:
    """Record a run whose result could not land (the local disk was full) as failed to collect, with where
    its host keeps the result, so that ``rx attach RUN`` collects it once there is room."""
    exc.hint = (f"the host keeps it: free some space, then rx attach {run.id}" if kept
                else "the host did not keep it")
    try:
        if kept:
            run.update(detached=kept, coordinator=None, collect_failed=True)
        run.set_status("failed", exit_code=exc.exit_code, error=str(exc))
    except RemoteExecError:  # the disk may be too full even for state.json: the error line says it all
        pass


def finish_run(run: Any, result: Any, outcome: Any, as_json: bool,
               actions: list[tuple[str, str, str | None, str]] | None = None) -> int:
    """Record a run's result and final status (with ``actions``' events not yet recorded); print its
    summary (or its JSON); return its exit status."""
    from ..workspace.outcome import result_record, run_outcome

    if outcome is not None:
        record = result_record(result, header=outcome.header, phases=outcome.phases, uploaded=outcome.uploaded,
                               files=outcome.files, run_dir=run.dir, synced=outcome.synced)
    else:
        record = result_record(result)
    run.store.write_bytes("result.json", json.dumps(record, indent=1).encode())
    ended = run_outcome(result)
    run.set_status(ended.status, exit_code=ended.exit_code, error=ended.error, actions=actions)
    info = run.info()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return ended.exit_code
    files = len(outcome.files) if outcome is not None else 0
    where = os.path.relpath(run.dir) if not os.path.relpath(run.dir).startswith("..") else str(run.dir)
    message = f"rx: run {run.id} {ended.status}"
    if result.status == "timeout":
        message += f" ({ended.error})"
    elif result.status not in ("finished", "raised") and result.detail:
        message += f" ({result.detail})"
    message += f", exit {ended.exit_code}, {info.get('duration') or 0:.2f} s; {files} file(s) in {where}/files"
    say(printable(message), "dim" if ended.status == "finished" else "yellow")
    if not _left_behind(outcome) and outcome is not None and outcome.header.get("kept"):
        say(printable(f"rx: the run directory is kept on {run.info().get('remote') or 'local'}: "
                      f"{outcome.header['kept']}"), "dim")
    return ended.exit_code


def _left_behind(outcome: Any) -> bool:
    """A yellow line naming the files over the pull limit, and where they stay on the host; True when there
    were any."""
    over = (outcome.header.get("over_limit") or []) if outcome is not None else []
    if not over:
        return False
    from ..sync.tree import human_size

    count = int(outcome.header.get("over_limit_count") or len(over))
    names = ", ".join(f"{entry['path']} ({human_size(entry['size'])})" for entry in over[:3])
    more = f" and {count - 3} more" if count > 3 else ""
    kept = outcome.header.get("kept")
    say(printable(f"rx: warning: not brought back, over the pull limit: {names}{more}; "
                  + (f"they stay on the host in {kept}" if kept else "raise it with --pull-limit SIZE")), "yellow")
    return True


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False})
# shape: typer declares each option as a parameter; the body is 20 lines
def run(
    ctx: typer.Context,
    target: Annotated[list[str] | None, typer.Argument(
        metavar="[SCRIPT] [ARGS]...", help="SCRIPT and its ARGS (with -m: only ARGS).", show_default=False)] = None,
    module: Annotated[str | None, typer.Option("-m", "--module", help="Run MODULE as `python -m MODULE`.")] = None,
    remote: Annotated[str | None, typer.Option(
        "--remote", "-r", autocompletion=complete_hosts,
        help="Host: ssh_config alias, [tool.rx.remotes] name or [user@]host[:port]. "
                               "Without it the run is a local subprocess.")] = None,
    backend: Annotated[str | None, typer.Option(
        help="SSH backend: openssh or paramiko (default: RX_BACKEND, [tool.rx] backend, openssh).")] = None,
    python: Annotated[str | None, typer.Option(help="Remote interpreter (default python3).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop the task after SECONDS (exit 124).")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the task; repeatable.")] = None,
    secret_env: Annotated[list[str] | None, typer.Option(
        "--secret-env", help="Pass local variable NAME to the task over the channel only (never on a "
                             "command line, in logs or state); repeatable.")] = None,
    pull: Annotated[list[str] | None, typer.Option(
        help="Bring back only files matching GLOB (relative to the project root); repeatable.")] = None,
    no_pull: Annotated[bool, typer.Option("--no-pull", help="Bring back no files.")] = False,
    pull_limit: Annotated[str | None, typer.Option(
        help="Bring back at most SIZE of files (default [tool.rx] pull_limit, 2GiB); the rest stays on the "
             "host, kept.")] = None,
    project: Annotated[Path | None, typer.Option(
        help="The project root (default: found from the script: the first .git, pyproject.toml, setup.py or "
             "setup.cfg above it).")] = None,
    include: Annotated[list[str] | None, typer.Option(
        help="Ship ignored paths matching GLOB (gitignore syntax, e.g. data/) too; repeatable.")] = None,
    follow_symlinks: Annotated[bool, typer.Option(
        "--follow-symlinks", help="Ship what symlinks leading out of the project point to.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Ship a project over the 2 GiB limit.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what of the project would travel (the total, the ten largest files); run "
                          "nothing.")] = False,
    keep_remote: Annotated[bool, typer.Option("--keep-remote",
                                              help="Keep the run directory on the host; rx says where.")] = False,
    workspace: Annotated[Path | None, typer.Option(help="Workspace dir (default RX_WORKSPACE or ./.rx).")] = None,
    ssh_config: Annotated[Path | None, typer.Option(
        help="ssh_config file (default RX_SSH_CONFIG or ~/.ssh/config).")] = None,
    connect_timeout: Annotated[float | None, typer.Option(help="Seconds to connect (default 10).")] = None,
    insecure_no_host_key_check: Annotated[bool, typer.Option(
        "--insecure-no-host-key-check", help="Do not check the host's key (prints a warning).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's record as JSON on stdout at the end; "
                                                           "the script's output goes to stderr.")] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", "-d", help="Start the run so that it survives this process and the connection; print "
                               "its id and return (follow with rx logs -f, collect with rx attach).")] = False,
    slurm: Annotated[str | None, typer.Option(
        "--slurm", help="Submit the run to Slurm through --remote (a login node), with these sbatch options "
                        "(one string, split as a shell would, each word passed to sbatch as it is), e.g. "
                        "\"--gres=gpu:1 --time=1:00:00\".", metavar="OPTIONS")] = None,
    keep_queued: Annotated[bool, typer.Option(
        "--keep-queued", help="On a scheduler: Ctrl-C stops following and leaves the job queued or running "
                              "(collect it with rx attach) instead of cancelling it.")] = False,
    deps: Annotated[list[str] | None, typer.Option(
        "--deps", help="A requirement the task needs on the host (\"numpy>=2\"); repeatable. rx resolves them "
                       "for the host's Python and builds an environment there once (uv).", metavar="REQ")] = None,
    requirements: Annotated[list[Path] | None, typer.Option(
        "--requirements", help="A requirements file the task needs on the host; repeatable.")] = None,
    find_links: Annotated[list[str] | None, typer.Option(
        "--find-links", help="A local folder of wheels (or URL) to resolve --deps from; repeatable.",
        metavar="DIR")] = None,
    offline: Annotated[bool, typer.Option(
        "--offline", help="The host has no index: the wheels travel from here.")] = False,
    inherit_site: Annotated[bool, typer.Option(
        "--inherit-site", help="The environment sees the host interpreter's own packages (a preinstalled "
                               "torch/CUDA stack).")] = False,
) -> None:
    """Run SCRIPT (or -m MODULE) with ARGS through rx: on --remote HOST over SSH, else locally.

    The task runs in a snapshot of its project (what git tracks or could add, .rxignore left out), in the
    same directory of it as yours; output streams live; the files it creates or changes land in the run's
    files/, at their paths in the project.

    Exit status: the script's own; 124 timeout; 130 interrupted; 255 connection, authentication or
    host-key failure; 3 any other rx failure.
    """
    words = list(target or [])
    if words and words[0].startswith("-") and words[0] != "-":
        raise unknown_option(ctx, words[0])
    if backend is not None:
        check_remote_backend(backend)
    task, args, kind, name = load_task(words, module)
    check_secret_env(secret_env or [])  # before a run is recorded: a usage error records nothing
    options: dict[str, Any] = {
        "backend": backend, "python": python, "timeout": check_timeout(timeout), "env": parse_env(env or []),
        "secret_env": list(secret_env or []), "pull": list(check_pull(pull or [])), "no_pull": no_pull,
        "keep": keep_remote, "ssh_config": ssh_config, "connect_timeout": connect_timeout,
        "host_key_policy": "off" if insecure_no_host_key_check else None,
        **_project_options(project, include, follow_symlinks, force, pull_limit),
        **env_options(deps, requirements, find_links, offline, inherit_site),
    }
    if detach:
        _refuse_stdin_for_detached()
    if slurm is not None:
        if not remote:
            raise ConfigError("--slurm needs --remote: the cluster's login node")
        options["slurm_args"] = _slurm_words(slurm)
    if keep_queued:
        options["keep_queued"] = True
    code = execute_run(task=task, args=args, remote=remote, options=options, workspace=workspace,
                       kind=kind, target=name, as_json=as_json, detach=detach, dry_run=dry_run,
                       early=(ctx.obj or {}).get("early"))
    raise typer.Exit(code)


def _project_options(project: Path | None, include: list[str] | None, follow_symlinks: bool, force: bool,
                     pull_limit: str | None) -> dict[str, Any]:
    """The project options of ``rx run`` (only those given: a rerun keeps the same)."""
    from ..config import parse_size

    options: dict[str, Any] = {}
    if project is not None:
        if not project.is_dir():
            raise ConfigError(f"--project {project}: no such directory")
        options["project"] = str(project.resolve())
    if include:
        options["include"] = list(include)
    if follow_symlinks:
        options["follow_symlinks"] = True
    if force:
        options["force"] = True
    if pull_limit is not None:
        options["pull_limit"] = parse_size(pull_limit, what="--pull-limit")
    return options


def _env_line(line: str) -> None:
    """What the building of a task's environment is at (nothing when it exists already)."""
    from ..errors import printable

    sys.stderr.write(f"rx: {printable(line)}\n")
    sys.stderr.flush()


def env_options(deps: list[str] | None, requirements: list[Path] | None, find_links: list[str] | None,
                 offline: bool, inherit_site: bool) -> dict[str, Any]:
    """The dependency options of ``rx run`` (only those given); files made absolute."""
    options: dict[str, Any] = {}
    if deps:
        options["deps"] = list(deps)
    if requirements:
        for path in requirements:
            if not path.is_file():
                raise ConfigError(f"--requirements {path}: no such file")
        options["requirements"] = [str(path.resolve()) for path in requirements]
    if find_links:
        options["find_links"] = [link if "://" in link else str(Path(link).resolve()) for link in find_links]
    if offline:
        options["offline"] = True
    if inherit_site:
        options["inherit_site"] = True
    return options


def unknown_option(ctx: typer.Context, word: str) -> click.NoSuchOption:
    """The usage error (exit 2) for ``word``, an option before the script that this command does not know,
    with the closest known ones (``--timout``: did you mean ``--timeout``)."""
    import difflib

    name = word.partition("=")[0]
    known = [opt for param in ctx.command.params for opt in (*param.opts, *param.secondary_opts)
             if opt.startswith("-")]
    return click.NoSuchOption(name, possibilities=difflib.get_close_matches(name, known, n=1), ctx=ctx)


def _refuse_syntax_errors(source: str, path: Path) -> None:
    """A script that does not compile is reported here, as Python would, before anything travels (exit 1)."""
    try:
        compile(source, str(path), "exec", dont_inherit=True)
        return
    except (SyntaxError, ValueError):  # (a null byte) said as Python says it, by the traceback mapper
        from ..tracebacks import syntax_error

        problem = syntax_error(source, str(path))
    if problem is not None:
        typer.echo(problem, err=True, nl=False)
        raise typer.Exit(1)


@app.command()
def rerun(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run id, unique prefix, or 'latest'.",
                                           autocompletion=complete_runs)],
    failed: Annotated[bool, typer.Option("--failed", help="Run only the tasks (or a sweep's combinations) that "
                                                          "did not finish; merge the done results in.")] = False,
    remote: Annotated[str | None, typer.Option("--remote", "-r", help="Run on this host instead.",
                                               autocompletion=complete_hosts)] = None,
    workspace: Annotated[Path | None, typer.Option(help="Workspace dir (default RX_WORKSPACE or ./.rx).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new run's record as JSON on stdout; the "
                                                           "script's output goes to stderr.")] = False,
) -> None:
    """Run a recorded run again as a new run (same code, arguments and host)."""
    from ..session import Session
    from ..workspace import Workspace

    ws = Workspace.resolve(workspace)
    previous = ws.run(run_ref)
    info = previous.info()
    if info.get("kind") == "task":
        from .rerun_tasks import rerun_tasks

        raise typer.Exit(rerun_tasks(ws, previous, failed=failed, remote=remote, as_json=as_json))
    if info.get("kind") == "sweep":
        from .sweeps import rerun_sweep

        raise typer.Exit(rerun_sweep(ws, previous, failed=failed, remote=remote, as_json=as_json))
    if failed and info.get("status") == "finished":
        typer.echo(f"rx: run {previous.id} finished; nothing to rerun", err=True)
        raise typer.Exit(0)
    if not previous.session_path.is_file():
        raise WorkspaceError(f"run {previous.id} has no saved session to rerun")
    with previous.session_path.open("rb") as stream:
        session = Session.restore(stream)
    options = dict(session.context.get("options") or {})
    target_remote = remote or session.context.get("remote")
    code = execute_run(task=session.task, args=[str(a) for a in session.execution.args], remote=target_remote,
                       options=options, workspace=workspace, kind=info.get("kind") or "script",
                       target=info.get("target") or session.task.name, as_json=as_json, parent=previous.id)
    raise typer.Exit(code)


def _slurm_words(text: str) -> list[str]:
    """The words of ``--slurm "..."`` (split as a shell would split them; nothing is expanded)."""
    import shlex

    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--slurm {text!r}: {exc}", hint="quote it as you would on a shell's command line") from None


class JobStatusLine:
    """Tells the user where their job is, on stderr, each time it changes: ``pending (Resources),
    position 2 in gpu``, ``running on c1``, ``completed``."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, job: Any, state: Any) -> None:
        from ..launchers.slurm import job_summary

        line = f"rx: {job.scheduler} job {job.job_id} {job_summary(state)}"
        if line != self.last:
            self.last = line
            say(printable(line), "dim")


def _detach(run: Any, session: Any, as_json: bool) -> int:
    """Start the run detached on its host; record where it runs; print its id."""
    from ..coordinator import Coordinator
    from ..workspace.recorder import RunRecorder

    coordinator = Coordinator.current()
    target = coordinator.resolve_target(session)
    recorder = RunRecorder(run, host=target.host)
    try:
        detached = coordinator.start_detached(session, target, recorder)
    except RemoteExecError as exc:
        run.set_status("failed", exit_code=exc.exit_code, error=str(exc))
        raise
    finally:
        recorder.close()
    # No local process owns the run now: it is never "lost" for want of one.
    run.update(detached=detached, coordinator=None)
    run.set_status("running")
    if detached.get("job"):
        run.update(job=detached["job"])
    if as_json:
        typer.echo(json.dumps(run.info(), indent=2))
        return 0
    typer.echo(run.id)
    job = detached.get("job")
    where = (f"submitted as {job['scheduler']} job {job['job_id']} through {target.host}" if job
             else f"detached on {target.host}")
    typer.echo(f"rx: run {run.id} {where}; follow: rx logs -f {run.id}; collect: rx attach {run.id}; "
               f"stop: rx cancel {run.id}", err=True)
    return 0


@dataclass(frozen=True)
class DetachedRun:
    """A run started with ``--detach``, as ``rx attach``, ``rx cancel`` and ``rx logs -f`` need it.

    Attributes:
        run: Its workspace run.
        session: Its saved session (with the configuration in force).
        target: Where it runs.
        info: Its record (``info["detached"]``: where on the host).
        coordinator: The coordinator that follows, collects or cancels it.
    """

    run: Any
    session: Any
    target: Any
    info: dict[str, Any]
    coordinator: Any


def load_detached_run(workspace: Path | None, run_ref: str) -> DetachedRun:
    """The detached run ``run_ref`` of ``workspace``.

    Raises:
        WorkspaceError: No such run, or it was not started with ``--detach``.
    """
    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..session import Session
    from ..workspace import Workspace

    ws = Workspace.resolve(workspace)
    run = ws.run(run_ref)
    info = run.info()
    if not info.get("detached"):
        raise WorkspaceError(f"run {run.id} was not started with --detach")
    with run.session_path.open("rb") as stream:
        session = Session.restore(stream)
    session.config = Configuration.load()
    # Secrets went to the host when the run started; following, collecting or cancelling it needs none.
    session.context["options"] = {key: value for key, value in (session.context.get("options") or {}).items()
                                  if key != "secret_env"}
    coordinator = Coordinator.current()
    return DetachedRun(run=run, session=session, target=coordinator.resolve_target(session), info=info,
                       coordinator=coordinator)


def attach_run(detached: DetachedRun, as_json: bool) -> int:
    """Wait for a detached run, stream its output, and collect its result into the workspace.

    One attach of a run at a time (its logs would get every line twice): another one holding it is a
    :class:`RunBusy` naming it. Ctrl-C or SIGTERM only stops following: the run goes on, and says so.
    """
    from ..workspace.recorder import RunRecorder

    run = detached.run
    with run.exclusive("attach"):
        info = run.info()  # read under the lock: an attach that just ended may have collected it
        # A detached run belongs to its host's supervisor, not to a local process: attaching never makes
        # this process its coordinator, so an attach that is killed leaves the run attachable (and a run
        # an older rx marked lost can still be collected).
        if info.get("status") not in ("running", "pending", "lost") and not info.get("collect_failed"):
            typer.echo(f"rx: run {run.id} is {info.get('status')} (exit {info.get('exit_code')}); nothing to "
                       "attach", err=True)
            return int(info.get("exit_code") or 0)
        recorder = RunRecorder(run, host=detached.target.host, stdout=sys.stderr if as_json else None,
                               log_cap=detached.session.config.log_cap)
        detached.session.local["on_job"] = JobStatusLine()
        try:
            with run.action("attach", host=detached.target.host):
                outcome = detached.coordinator.attach(detached.session, detached.target, info["detached"],
                                                      recorder, recorder.offsets)
        except (KeyboardInterrupt, Interrupted):
            typer.echo(f"rx: detached; still running: rx attach {run.id} (stop it: rx cancel {run.id})", err=True)
            return 130
        except LocalDiskFull as exc:
            uncollected(run, exc, info["detached"] if exc.kept else None)
            raise
        finally:
            recorder.close()
        if info.get("collect_failed"):
            run.update(collect_failed=None)
        return finish_run(run, outcome.result, outcome, as_json)


@app.command()
def attach(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run id, unique prefix, or 'latest'.",
                                           autocompletion=complete_runs)],
    workspace: Annotated[Path | None, typer.Option(help="Workspace dir (default RX_WORKSPACE or ./.rx).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's record as JSON on stdout at the end; "
                                                           "the run's output goes to stderr.")] = False,
) -> None:
    """Wait for a detached run, stream its output, and collect its result and files into the workspace.

    One attach of a run at a time. Ctrl-C (or SIGTERM) only detaches: the run goes on (rx cancel stops it).
    Exit status: the run's own, as rx run would have exited; 130 when detached by Ctrl-C; 3 when another
    rx attach holds the run.
    """
    raise typer.Exit(attach_run(load_detached_run(workspace, run_ref), as_json))


@app.command()
def cancel(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run id, unique prefix, or 'latest'.",
                                           autocompletion=complete_runs)],
    workspace: Annotated[Path | None, typer.Option(help="Workspace dir (default RX_WORKSPACE or ./.rx).")] = None,
) -> None:
    """Stop a detached run (its whole process group on the host; a Slurm run: scancel), then collect what it
    left."""
    detached = load_detached_run(workspace, run_ref)
    run, info = detached.run, detached.info
    if info.get("status") not in ("running", "pending", "lost"):
        typer.echo(f"rx: run {run.id} is already {info.get('status')}", err=True)
        raise typer.Exit(0)
    detached.coordinator.cancel(detached.target, info["detached"])
    try:
        code = attach_run(detached, as_json=False)
    except RunBusy as exc:  # the attach that holds the run collects it
        typer.echo(f"rx: run {run.id} cancelled on its host; {exc.message}, which collects it", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(130 if run.info().get("status") == "cancelled" else code)
