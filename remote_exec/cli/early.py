"""Connecting before the command line is parsed: ``rx run --remote HOST ...`` starts its SSH connection
from the raw arguments, before typer and the rest of rx are imported (~50 ms a cold connection no longer
waits for).

It is only a head start. The words are read conservatively (:func:`peek_run`): anything but a plain
``rx run [OPTIONS] SCRIPT`` line, or an option that changes how the host is reached, and nothing starts
here. ``rx run`` then works out the host from the parsed options as always and adopts this connection only
when it is for the very same host spec and backend (:func:`connect_early`); otherwise it starts its own.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RUN_FLAGS", "EarlyConnection", "adopt_or_connect", "connect_early", "connect_from_argv", "peek_run"]

#: ``rx run``'s options that take no value (tests/unit/test_cli_lean.py keeps this true to the command).
RUN_FLAGS = frozenset({
    "--detach", "--dry-run", "--follow-symlinks", "--force", "--inherit-site", "--insecure-no-host-key-check",
    "--json", "--keep-queued", "--keep-remote", "--no-pull", "--offline", "--help", "-d",
})
#: Options after which a head start is not taken: they change how the host is reached, or make the run a
#: scheduler's job or something other than a run.
_NOT_PLAIN = frozenset({"--insecure-no-host-key-check", "--connect-timeout", "--slurm", "--dry-run", "--detach",
                        "-d", "--help", "--deps", "--requirements"})

EarlyConnection = tuple[Any, str, Any]  # (HostSpec, backend name, Backend)


def peek_run(words: list[str]) -> dict[str, str] | None:
    """``--remote``, ``--backend`` and ``--ssh-config`` of an ``rx run`` command line, read without the
    parser; None when the line is not ``run`` with a ``--remote`` among plain options before the script."""
    if not words or words[0] != "run":
        return None
    found: dict[str, str] = {}
    index = 1
    while index < len(words):
        word = words[index]
        if word == "--" or word == "-" or not word.startswith("-"):
            break  # the script (or -m's module's arguments): what follows is not rx's
        name, eq, value = word.partition("=")
        if name in _NOT_PLAIN or (not name.startswith("--") and len(name) != 2):
            return None  # -rHOST, bundled short flags: not plain
        if name in RUN_FLAGS:
            index += 1
            continue
        if not eq:
            if index + 1 >= len(words):
                return None
            value = words[index + 1]
            index += 1
        index += 1
        key = {"-r": "remote", "--remote": "remote", "--backend": "backend", "--ssh-config": "ssh_config"}.get(name)
        if key is not None:
            found[key] = value
    return found if found.get("remote") else None


def connect_early(config: Any, remote: str, options: dict[str, Any]) -> EarlyConnection | None:
    """Start connecting to ``remote`` (a direct host) in the background: ``(spec, backend name, backend)``
    for the coordinator to adopt; None when it is a scheduler's or the settings do not resolve (the run
    then reports that as it would have)."""
    try:
        where = config.remote(remote)
        if options.get("slurm_args") or (options.get("scheduler") or where.scheduler) != "direct":
            return None
        name = config.check_remote_backend(config.effective_backend(options.get("backend") or where.backend))
        spec = config.host_spec(where, options)
        from ..backends.registry import create

        backend = create(name, spec)
    except Exception:  # only a head start: the run itself resolves the host and says what fails
        return None
    backend.connect_in_background()
    return spec, name, backend


def connect_from_argv(words: list[str]) -> EarlyConnection | None:
    """:func:`connect_early` from the raw words of an ``rx run`` line (see :func:`peek_run`)."""
    seen = peek_run(words)
    if seen is None:
        return None
    try:
        from pathlib import Path

        from ..config import Configuration

        config = Configuration.load()
    except Exception:  # a broken pyproject.toml: the run says so
        return None
    options: dict[str, Any] = {"backend": seen.get("backend")}
    if seen.get("ssh_config"):
        options["ssh_config"] = Path(seen["ssh_config"])  # as typer makes it
    return connect_early(config, seen["remote"], options)


def adopt_or_connect(early: EarlyConnection | None, config: Any, remote: str,
                     options: dict[str, Any]) -> EarlyConnection | None:
    """The connection started from the raw words when it is for the same host spec and backend that the
    parsed options give, else a new head start."""
    if early is not None:
        try:
            where = config.remote(remote)
            same = (config.host_spec(where, options) == early[0]
                    and config.effective_backend(options.get("backend") or where.backend) == early[1])
        except Exception:
            same = False
        if same:
            return early
    return connect_early(config, remote, options)
