"""Connecting ahead: a process that is about to call a host starts the SSH connection first, on a thread of
its own, and only then imports the rest of rx (a cold connection takes a few hundred milliseconds; the
imports, the project's scan, the archive and the workspace go on meanwhile).

Both ``rx run`` (from its raw command line, :mod:`remote_exec.cli.early`) and the first ``@task`` call of a
process (:func:`remote_exec.api.run_task`) use it. The coordinator adopts such a connection only when it
is for the very same host spec and backend it works out itself (:func:`adopt_or_connect`); a head start
never decides anything.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EarlyConnection", "adopt_or_connect", "connect_early"]

EarlyConnection = tuple[Any, str, Any]  # (HostSpec, backend name, Backend)


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
        from .backends.registry import create

        backend = create(name, spec)
    except Exception:  # only a head start: the run itself resolves the host and says what fails
        return None
    backend.connect_in_background()
    return spec, name, backend


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
