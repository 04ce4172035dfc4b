"""What to try when the two sides of a call differ: a module one has and the other lacks, a package at
different versions. Coordinator side only; the words live here, in one place each.

- :func:`import_hint`: the task could not import a module that is installed here (install it there), or
  a module of the project that was not shipped (it is imported by name at run time:
  ``distribution_modules``);
- :func:`arguments_hint`: the host could not read the call's arguments (a package at another version);
- :func:`unreadable_value`: this side could not read the task's result (the same, the other way).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import SerializationError
from .serialization import package_versions, referenced_packages

__all__ = ["arguments_hint", "import_hint", "unreadable_value"]

_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def _installed_here(name: str) -> Path | None:
    """Where the top-level module ``name`` is here (None: it is not)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin and spec.origin not in ("built-in", "frozen") else None


def _install_there(name: str, version: str | None, host: str, python: str) -> str:
    """The hint for a package installed here and not on ``host``."""
    here = f"{name} {version}" if version else name
    pinned = f"{name}=={version}" if version else name
    return (f"{name} is installed here ({here}), not on {host}: have rx build it an environment there "
            f"(rx run --deps {pinned!r}, @task(deps=[...]) or [tool.rx] deps), install it there ({python} -m pip "
            f"install {name}), or run with --python set to an interpreter of {host} that has it")


def import_hint(message: str, *, host: str, python: str, shipped: Iterable[str], project: Path) -> str | None:
    """What to try when the task failed with ``No module named 'X'`` (``message``), if this side knows.

    Args:
        message: The exception's message.
        host: Where the task ran.
        python: The interpreter it ran with there.
        shipped: The project modules the archive carried (top-level names).
        project: The project's folder (modules below it are the project's, not installed packages).
    """
    match = _NO_MODULE.search(message)
    if match is None:
        return None
    name = match[1].partition(".")[0]
    where = _installed_here(name)
    if where is None or name in set(shipped):
        return None
    version = package_versions([name])[name]
    if version is None and project in where.parents:
        return (f"{name} is a module of your project that was not shipped (imported by name at run time, "
                f"where rx does not see it): add it to distribution_modules in [tool.rx], or import it plainly "
                f"in the code that uses it")
    return _install_there(name, version, host, python)


def _differing(remote: Mapping[str, str | None], local: Mapping[str, str | None]) -> list[str]:
    """``numpy 2.1.0 here, 1.26.4 on the host`` for each package the two sides have at other versions."""
    return [name for name in local if remote.get(name) != local[name]]


def arguments_hint(remote: Mapping[str, str | None], host: str) -> str | None:
    """What to try when ``host`` could not read the call's arguments: the packages they need, at the
    versions each side has (``remote``: the host's)."""
    local = package_versions(remote)
    names = _differing(remote, local)
    if not names:
        return None
    versions = "; ".join(f"{name} {local[name] or '(none)'} here, {remote[name] or 'not installed'} on {host}"
                         for name in names)
    return (f"the arguments hold objects of {', '.join(names)}, which {host} cannot read at its version "
            f"({versions}): use the same version on both sides")


def unreadable_value(error: BaseException, value: bytes, *, task: str, host: str,
                     remote: Mapping[str, str | None] | None) -> SerializationError:
    """The error for a result this side cannot unpickle (``error``): the packages it needs and the
    versions of both sides (``remote``: what the host said it wrote them with)."""
    names = referenced_packages(value) or list(remote or {})
    local = package_versions(names)
    there = dict(remote or {})
    parts = [f"{name} {there.get(name) or '?'} on {host}, {local[name] or 'not installed'} here" for name in names
             if there.get(name) != local[name]]
    if not parts:
        return SerializationError(f"the result of {task} cannot be read here: {type(error).__name__}: {error}")
    return SerializationError(f"the result of {task} holds objects written with {'; '.join(parts)}, which "
                              f"cannot read them ({type(error).__name__}: {error})",
                              hint="use the same version on both sides")
