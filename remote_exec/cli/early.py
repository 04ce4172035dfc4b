"""Connecting before the command line is parsed: ``rx run --remote HOST ...`` starts its SSH connection
from the raw arguments, before typer and the rest of rx are imported (~50 ms a cold connection no longer
waits for).

It is only a head start. The words are read conservatively (:func:`peek_run`): anything but a plain
``rx run [OPTIONS] SCRIPT`` line, or an option that changes how the host is reached, and nothing starts
here. ``rx run`` then works out the host from the parsed options as always and adopts this connection only
when it is for the very same host spec and backend (:func:`remote_exec.early.adopt_or_connect`); otherwise
it starts its own.
"""

from __future__ import annotations

from typing import Any

from ..early import EarlyConnection, connect_early

__all__ = ["RUN_FLAGS", "connect_from_argv", "peek_run"]

#: ``rx run``'s options that take no value (tests/unit/test_cli_lean.py keeps this true to the command).
RUN_FLAGS = frozenset({
    "--detach", "--dry-run", "--follow-symlinks", "--force", "--inherit-site", "--insecure-no-host-key-check",
    "--json", "--keep-queued", "--keep-remote", "--no-pull", "--offline", "--help", "-d",
})
#: Options after which a head start is not taken: they change how the host is reached, or make the run a
#: scheduler's job or something other than a run.
_NOT_PLAIN = frozenset({"--insecure-no-host-key-check", "--connect-timeout", "--slurm", "--dry-run", "--detach",
                        "-d", "--help", "--deps", "--requirements"})


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
