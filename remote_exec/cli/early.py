"""Connecting before the command line is parsed: ``rx run --remote HOST SCRIPT ...`` starts its SSH
connection from the raw arguments, then the runner on the host, before typer and the command's own code
are imported (~50 ms a cold connection no longer waits for; over a live connection the runner is up by the
time the run is recorded).

It is only a head start. The words are read conservatively (:func:`peek_run`): anything but a plain
``rx run [OPTIONS] SCRIPT`` line, or an option that changes how the host is reached, and nothing starts
here. ``rx run`` then works out the host from the parsed options as always and adopts this connection only
when it is for the very same host spec and backend (:func:`remote_exec.early.adopt_or_connect`), and the
runner only when the run would have started the very same one
(:meth:`~remote_exec.coordinator.Coordinator.runner_ahead`); otherwise it starts its own (the runner started
here is stopped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..early import EarlyConnection, connect_early

__all__ = ["RUN_FLAGS", "HeadStart", "connect_from_argv", "peek_run", "run_session"]

#: ``rx run``'s options that take no value (tests/unit/test_cli_lean.py keeps this true to the command).
RUN_FLAGS = frozenset({
    "--detach", "--dry-run", "--follow-symlinks", "--force", "--inherit-site", "--insecure-no-host-key-check",
    "--json", "--keep-queued", "--keep-remote", "--no-pull", "--offline", "--help", "-d",
})
#: Options after which a head start is not taken: they change how the host is reached, or make the run a
#: scheduler's job or something other than a run.
_NOT_PLAIN = frozenset({"--insecure-no-host-key-check", "--connect-timeout", "--slurm", "--dry-run", "--detach",
                        "-d", "--help", "--deps", "--requirements"})
#: ``rx``'s own options that may come before ``run`` (flags only), with how many ``-v`` each is.
_ROOT_FLAGS = {"-v": 1, "-vv": 2, "-vvv": 3, "--verbose": 1}
#: The options :func:`peek_run` reports (the rest it only steps over).
_PEEKED = {"-r": "remote", "--remote": "remote", "--backend": "backend", "--ssh-config": "ssh_config",
           "-m": "module", "--module": "module"}


def peek_run(words: list[str]) -> dict[str, str] | None:
    """``--remote``, ``--backend``, ``--ssh-config``, ``-m`` and the script of an ``rx run`` command line,
    read without the parser; None when the line is not ``run`` with a ``--remote`` among plain options before
    the script."""
    index, _ = _leading_flags(words)
    if index >= len(words) or words[index] != "run":
        return None
    found: dict[str, str] = {}
    index += 1
    while index < len(words) and words[index] not in ("--", "-") and words[index].startswith("-"):
        option = _option(words, index)  # (what follows the script, or -m's module, is not rx's)
        if option is None:
            return None
        name, value, index = option
        if name in _PEEKED:
            found[_PEEKED[name]] = value
    if index < len(words) and words[index] not in ("--", "-"):
        found["script"] = words[index]
    return found if found.get("remote") else None


def _option(words: list[str], index: int) -> tuple[str, str, int] | None:
    """The option at ``words[index]``: (name, value, index of the next word); None when it is not plain
    (-rHOST, bundled short flags, a value missing, an option in :data:`_NOT_PLAIN`)."""
    name, eq, value = words[index].partition("=")
    if name in _NOT_PLAIN or (not name.startswith("--") and len(name) != 2):
        return None
    if name in RUN_FLAGS or eq:
        return name, value, index + 1
    if index + 1 >= len(words):
        return None
    return name, words[index + 1], index + 2


def _leading_flags(words: list[str]) -> tuple[int, int]:
    """How many of the line's first words are ``rx``'s own flags (:data:`_ROOT_FLAGS`), and how many ``-v``
    they give."""
    index = count = 0
    while index < len(words) and words[index] in _ROOT_FLAGS:
        count += _ROOT_FLAGS[words[index]]
        index += 1
    return index, count


@dataclass
class HeadStart:
    """What ``rx run`` started from its raw words: the connection (adopted as
    :func:`~remote_exec.early.adopt_or_connect` says), the configuration it read (the run's own: same
    directory, same moment) and maybe the script's runner (see :meth:`close`)."""

    connection: EarlyConnection
    config: Any
    runner: Any = None  # a RunnerAhead, or None

    def take_runner(self) -> Any:
        """The runner started here (once; None if none)."""
        runner, self.runner = self.runner, None
        return runner

    def close(self) -> None:
        """Stop the runner started here unless the run took it (a usage error ends ``rx run`` first)."""
        runner = self.take_runner()
        if runner is not None:
            runner.close()


def run_session(task: Any, args: list[str], remote: str | None, options: dict[str, Any], config: Any) -> Any:
    """The session of an ``rx run`` of ``task`` with ``args`` (the run's, and its head start's: the two must
    not differ but in the options the head start could not read)."""
    from ..session import Session
    from ..task import Execution

    session = Session(task=task, execution=Execution.create(task, tuple(args)), serializer="pickle",
                      context={"remote": remote, "options": options, "origin": "cli", "cwd": os.getcwd()})
    session.config = config
    return session


def connect_from_argv(words: list[str]) -> HeadStart | None:
    """:func:`connect_early` from the raw words of an ``rx run`` line (see :func:`peek_run`), and for a
    script, its runner (see :func:`_runner_head`)."""
    seen = peek_run(words)
    if seen is None:
        return None
    from .logs import configure

    configure(_leading_flags(words)[1])  # what connecting logs goes to rx's log, as it would after the parse
    try:
        from ..config import Configuration

        config = Configuration.load()
    except Exception:  # a broken pyproject.toml: the run says so
        return None
    options: dict[str, Any] = {"backend": seen.get("backend")}
    if seen.get("ssh_config"):
        options["ssh_config"] = Path(seen["ssh_config"])  # as typer makes it
    connection = connect_early(config, seen["remote"], options)
    if connection is None:
        return None
    head = HeadStart(connection, config)
    if seen.get("script") and not seen.get("module"):
        head.runner = _runner_head(config, seen["remote"], options, connection, seen["script"])
    return head


def _runner_head(config: Any, remote: str, options: dict[str, Any], connection: EarlyConnection,
                 script: str) -> Any:
    """Start the runner of ``script``'s run on ``remote`` as the coordinator would for it with these
    options (the command line's others may still make it unfit: the run then stops it); None when there is
    none to start or anything fails (the run itself says what)."""
    try:
        from ..coordinator import Coordinator
        from ..task import Task

        session = run_session(Task.from_script(Path(script)), [], remote, options, config)
        session.local["backend_ahead"] = connection
        coordinator = Coordinator.current()
        target = coordinator.resolve_target(session)
        if target.spec != connection[0]:
            return None
        plan = coordinator.plan_for(session)
        return coordinator.runner_ahead(session, target, plan.spec.root if plan is not None else None)
    except Exception:  # only a head start
        return None
