"""Where a project starts: the first directory up from a file holding a project marker, never the home
directory or anything above it (a dotfiles repository in ``~`` must not make the whole home a project)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MARKERS", "find_project_root", "git_work_tree", "home_directory"]

#: What makes a directory a project's root (the first one found walking up wins).
MARKERS = (".git", "pyproject.toml", "setup.py", "setup.cfg")


def home_directory() -> Path | None:
    """The user's home directory (resolved), or None when it cannot be told."""
    home = os.environ.get("HOME") or os.path.expanduser("~")
    if not home or home == "~":
        return None
    try:
        return Path(home).resolve()
    except OSError:
        return None


def _candidates(start: Path, home: Path | None) -> list[Path]:
    """``start`` and its parents, stopping before ``home`` (when ``start`` is in it) and before ``/``."""
    here = start.resolve()
    inside_home = home is not None and (here == home or home in here.parents)
    found = []
    for directory in (here, *here.parents):
        if inside_home and directory == home:
            break
        if directory.parent == directory:  # the file system's root is nobody's project
            break
        found.append(directory)
    return found


def find_project_root(start: Path, *, home: Path | None = None) -> Path | None:
    """The nearest directory at or above ``start`` (a file's directory, or a directory) holding one of
    :data:`MARKERS`; None when there is none below the home directory.

    Args:
        start: A file (its directory is where the walk starts) or a directory.
        home: Where the walk stops (default: the user's home directory).
    """
    home = home if home is not None else home_directory()
    origin = start if start.is_dir() else start.parent
    for directory in _candidates(origin, home):
        if any(os.path.lexists(directory / marker) for marker in MARKERS):
            return directory
    return None


def git_work_tree(root: Path, *, home: Path | None = None) -> Path | None:
    """The top of the git work tree ``root`` is in (``root`` itself or a parent holding ``.git``, below the
    home directory), or None: then git's view of the files does not apply."""
    home = home if home is not None else home_directory()
    for directory in _candidates(root, home):
        if os.path.lexists(directory / ".git"):
            return directory
    return None
