"""The words of an ``rx run`` line as the head starts read them, before any parser is imported
(:mod:`remote_exec.cli.early`, :mod:`remote_exec.prestart`). Nothing but built-ins: this runs
within a few milliseconds of the interpreter's start.
"""

from __future__ import annotations

__all__ = ["RUN_FLAGS", "leading_flags", "peek_run"]

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
           "-m": "module", "--module": "module", "--python": "python"}


def peek_run(words: list[str]) -> dict[str, str] | None:
    """``--remote``, ``--backend``, ``--ssh-config``, ``-m``, ``--python`` and the script of an ``rx run`` command line,
    read without the parser; None when the line is not ``run`` with a ``--remote`` among plain options before
    the script."""
    index, _ = leading_flags(words)
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


def leading_flags(words: list[str]) -> tuple[int, int]:
    """How many of the line's first words are ``rx``'s own flags (:data:`_ROOT_FLAGS`), and how many ``-v``
    they give."""
    index = count = 0
    while index < len(words) and words[index] in _ROOT_FLAGS:
        count += _ROOT_FLAGS[words[index]]
        index += 1
    return index, count
