"""Connecting ahead: a process that is about to call a host starts the SSH connection first, on a thread of
its own, and only then imports the rest of rx (a cold connection takes a few hundred milliseconds; the
imports, the project's scan, the archive and the workspace go on meanwhile).

Both ``rx run`` (from its raw command line, :mod:`remote_exec.cli.early`) and the first ``@task`` call of a
process (:func:`remote_exec.api.run_task`) use it. The coordinator adopts such a connection only when it
is for the very same host spec and backend it works out itself (:func:`adopt`); a head start
never decides anything.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EarlyConnection", "adopt", "adopt_or_connect", "connect_early"]

EarlyConnection = tuple[Any, str, Any]  # (HostSpec, backend name, Backend)


def _resolved(config: Any, remote: str, options: dict[str, Any]) -> tuple[Any, str] | None:
    """``(spec, backend name)`` of a direct host as the coordinator would work them out; None for a
    scheduler's host or settings that do not resolve (the run then reports that as it would have)."""
    try:
        where = config.remote(remote)
        if options.get("slurm_args") or (options.get("scheduler") or where.scheduler) != "direct":
            return None
        name = config.check_remote_backend(config.effective_backend(options.get("backend") or where.backend))
        return config.host_spec(where, options), name
    except Exception:  # only a head start: the run itself resolves the host and says what fails
        return None


def connect_early(config: Any, remote: str, options: dict[str, Any],
                  prestart_memo: tuple[str, tuple[str, ...]] | None = None) -> EarlyConnection | None:
    """Start connecting to ``remote`` (a direct host) in the background: ``(spec, backend name, backend)``
    for the coordinator to adopt; None when there is nothing to start (see :func:`_resolved`).
    ``prestart_memo``: the memo key of an ``rx run`` line and the files its configuration came from, for an
    OpenSSH backend to note its master under (:mod:`remote_exec.prestart`)."""
    resolved = _resolved(config, remote, options)
    if resolved is None:
        return None
    spec, name = resolved
    try:
        from .backends.registry import create

        backend = create(name, spec)
    except Exception:  # the run itself makes its backend and says what fails
        return None
    if prestart_memo is not None and hasattr(backend, "prestart_memo"):
        backend.prestart_memo = prestart_memo
    backend.connect_in_background()
    return spec, name, backend


def adopt(early: EarlyConnection | None, config: Any, remote: str,
          options: dict[str, Any]) -> EarlyConnection | None:
    """``early`` when it is for the same host spec and backend that ``config`` and ``options`` give, else
    None."""
    if early is not None and _resolved(config, remote, options) == early[:2]:
        return early
    return None


def adopt_or_connect(early: EarlyConnection | None, config: Any, remote: str,
                     options: dict[str, Any]) -> EarlyConnection | None:
    """The connection started from the raw words when it fits (:func:`adopt`), else a new head start."""
    return adopt(early, config, remote, options) or connect_early(config, remote, options)
