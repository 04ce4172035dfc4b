"""The file list of a project: what git tracks or could add, else a walk under the ignore files.

In a git work tree the list is exactly ``git ls-files -co --exclude-standard`` (tracked files, and untracked
ones git does not ignore: git's own ignore semantics, ``.git/info/exclude`` and ``core.excludesFile``
included). Elsewhere a walk applies every ``.gitignore`` the way git would. In both cases the always-left-out
set (:mod:`.rules`), rx's own directories (its workspace, its cache, the home directory) and any
``.rxignore`` (gitignore syntax, nested like ``.gitignore``) take paths out, and include patterns put ignored
paths back.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .root import git_work_tree
from .rules import IgnoreFile, IgnoreStack, always_excluded_dir, always_excluded_file, read_ignore_file

__all__ = ["RXIGNORE", "Listing", "list_files", "literal_prefix", "submodule_files"]

logger = logging.getLogger(__name__)

#: The project's own exclusions (gitignore syntax), in any directory.
RXIGNORE = ".rxignore"
_GLOB = frozenset("*?[\\")


@dataclass(frozen=True)
class Listing:
    """The paths of a project that travel (before symlinks and sizes are looked at).

    Attributes:
        paths: Relative ``/``-separated paths, sorted, of regular files and symlinks.
        how: ``git`` or ``walk``.
        watched: Directories (and git's index) whose modification times tell whether the list may have
            changed: relative path -> ``st_mtime_ns``.
    """

    paths: tuple[str, ...]
    how: str
    watched: dict[str, int] = field(default_factory=dict)

    def still_valid(self, root: Path) -> bool:
        """True when no watched directory changed since (a new file or a deletion changes its directory)."""
        for relative, mtime in self.watched.items():
            try:
                if os.stat(root / relative).st_mtime_ns != mtime:
                    return False
            except OSError:
                return False
        return True


def list_files(root: Path, *, include: Sequence[str] = (), outside: Sequence[str] = (),
               use_git: bool = True) -> Listing:
    """What of ``root`` travels.

    Args:
        root: The project root.
        include: gitignore-syntax patterns of ignored paths that travel nevertheless.
        outside: Directories relative to ``root`` that never travel (rx's workspace and cache, the home
            directory, when they lie inside).
        use_git: Ask git when ``root`` is in a git work tree.
    """
    listing = None
    if use_git and git_work_tree(root) is not None:
        listing = _git_listing(root)
    if listing is None:
        paths, watched = _walk(root)
        listing = Listing(tuple(paths), "walk", watched)
    paths = _left_out(listing.paths, frozenset(outside))
    if listing.how == "git":
        paths = _rxignored(root, paths)
    if include:
        added, watched = _included(root, include, frozenset(outside))
        paths = sorted(set(paths) | set(added))
        listing.watched.update(watched)
    return Listing(tuple(paths), listing.how, listing.watched)


# -- git ---------------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=120, check=False,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("git in %s: %s", root, exc)
        return None
    if done.returncode != 0:
        logger.debug("git %s in %s failed: %s", " ".join(args), root, done.stderr.decode("utf-8", "replace")[-300:])
        return None
    return done.stdout


def _git_listing(root: Path) -> Listing | None:
    """``git ls-files -co --exclude-standard`` of ``root`` (a submodule shows as its directory: see
    :func:`submodule_files`)."""
    output = _git(root, "ls-files", "-co", "--exclude-standard", "-z")
    if output is None:
        return None
    paths = sorted(os.fsdecode(raw) for raw in output.split(b"\0") if raw)
    watched: dict[str, int] = {}
    for directory in {"", *(path.rpartition("/")[0] for path in paths)}:
        _watch(watched, root, directory)
    index = _git(root, "rev-parse", "--git-path", "index")
    if index is not None:
        _watch(watched, root, os.fsdecode(index.strip()))
    return Listing(tuple(paths), "git", watched)


def submodule_files(root: Path, relative: str) -> list[str]:
    """The files of the git submodule at ``relative`` (what its own git lists), relative to ``root``."""
    listing = _git_listing(root / relative)
    if listing is None:
        return []
    return [f"{relative}/{path}" for path in _left_out(listing.paths, frozenset())]


def _watch(watched: dict[str, int], root: Path, relative: str) -> None:
    key = relative if os.path.isabs(relative) else relative.rstrip("/") or "."
    try:
        watched[key] = os.stat(os.path.join(root, relative)).st_mtime_ns
    except OSError:
        pass


def _left_out(paths: Sequence[str], outside: frozenset[str]) -> list[str]:
    """``paths`` without the always-left-out set, rx's own directories and what is inside a virtualenv."""
    venvs = {path.rpartition("/")[0] for path in paths if path.endswith("/pyvenv.cfg")}
    out: dict[str, bool] = {}

    def excluded(directory: str) -> bool:
        verdict = out.get(directory)
        if verdict is None:
            parent, _, name = directory.rpartition("/")
            verdict = out[directory] = bool(directory) and (
                always_excluded_dir(name) or directory in outside or directory in venvs or excluded(parent))
        return verdict

    kept = []
    for path in paths:
        directory, _, name = path.rpartition("/")
        if name.endswith((".pyc", ".pyo")) or name == ".git" or path in outside:  # always_excluded_file
            continue
        verdict = out.get(directory)
        if verdict is None:
            verdict = excluded(directory)
        if not verdict:
            kept.append(path)
    return kept


def _rxignored(root: Path, paths: list[str]) -> list[str]:
    """``paths`` without what the ``.rxignore`` files among them exclude (git mode: git listed them)."""
    files = {}
    for path in paths:
        if path == RXIGNORE or path.endswith("/" + RXIGNORE):
            base = path.rpartition("/")[0]
            rules = read_ignore_file(root / path, base)
            if rules is not None:
                files[base] = rules
    if not files:
        return paths
    verdicts: dict[str, tuple[bool, IgnoreStack]] = {"": (False, IgnoreStack((files[""],)) if "" in files
                                                            else IgnoreStack())}
    kept = []
    for path in paths:
        excluded, stack = _directory(path.rpartition("/")[0], files, verdicts)
        if not excluded and not stack.excluded(path, False):
            kept.append(path)
    return kept


def _directory(directory: str, files: dict[str, IgnoreFile],
               verdicts: dict[str, tuple[bool, IgnoreStack]]) -> tuple[bool, IgnoreStack]:
    """(excluded, the ignore files in force) for ``directory``, from its parent's (memoized)."""
    known = verdicts.get(directory)
    if known is not None:
        return known
    parent_excluded, stack = _directory(directory.rpartition("/")[0], files, verdicts)
    excluded = parent_excluded or stack.excluded(directory, True)
    verdicts[directory] = (excluded, stack.push(files.get(directory)))
    return verdicts[directory]


# -- a walk, where there is no git -------------------------------------------------------------------


def _walk(root: Path) -> tuple[list[str], dict[str, int]]:
    """Files and symlinks under ``root`` that no ``.gitignore`` or ``.rxignore`` excludes."""
    paths: list[str] = []
    watched: dict[str, int] = {}
    pending: list[tuple[str, IgnoreStack, IgnoreStack]] = [("", IgnoreStack(), IgnoreStack())]
    while pending:
        directory, gitignore, rxignore = pending.pop()
        folder = root / directory if directory else root
        entries = _entries(folder, watched, directory)
        if entries is None or (directory and any(name == "pyvenv.cfg" for name, _ in entries)):
            continue
        names = {name for name, _ in entries}
        if ".gitignore" in names:
            gitignore = gitignore.push(read_ignore_file(folder / ".gitignore", directory))
        if RXIGNORE in names:
            rxignore = rxignore.push(read_ignore_file(folder / RXIGNORE, directory))
        for relative, is_dir in _kept(directory, entries, gitignore, rxignore):
            if is_dir:
                pending.append((relative, gitignore, rxignore))
            else:
                paths.append(relative)
    paths.sort()
    return paths, watched


def _kept(directory: str, entries: list[tuple[str, bool]], gitignore: IgnoreStack,
          rxignore: IgnoreStack) -> Iterator[tuple[str, bool]]:
    """(relative path, is a directory) of the entries of ``directory`` that nothing leaves out."""
    for name, is_dir in entries:
        relative = f"{directory}/{name}" if directory else name
        if always_excluded_dir(name) if is_dir else always_excluded_file(name):
            continue
        if not gitignore.excluded(relative, is_dir) and not rxignore.excluded(relative, is_dir):
            yield relative, is_dir


def _entries(folder: Path, watched: dict[str, int], directory: str) -> list[tuple[str, bool]] | None:
    """(name, is a real directory) of ``folder``'s entries; None when it cannot be read."""
    try:
        with os.scandir(folder) as scan:
            entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]
        watched[directory or "."] = os.stat(folder).st_mtime_ns
    except OSError as exc:
        logger.debug("cannot list %s: %s", folder, exc)
        return None
    return entries


# -- include patterns ----------------------------------------------------------------------------------


def literal_prefix(pattern: str) -> str:
    """The directory a gitignore-syntax pattern can only match below (``""``: anywhere)."""
    body = pattern.strip().lstrip("!")
    anchored = "/" in body.rstrip("/")
    if not anchored:
        return ""
    parts = body.strip("/").split("/")
    literal = []
    for part in parts if body.endswith("/") else parts[:-1]:
        if _GLOB & set(part) or part == "**":
            break
        literal.append(part)
    return "/".join(literal)


def _included(root: Path, patterns: Sequence[str], outside: frozenset[str]) -> tuple[list[str], dict[str, int]]:
    """Files and symlinks matching the include patterns (whatever ignores them; never the always-left-out
    set or rx's own directories)."""
    matcher = IgnoreFile("", patterns)
    found: list[str] = []
    watched: dict[str, int] = {}
    prefixes = sorted({literal_prefix(pattern) for pattern in patterns if pattern.strip()})
    starts = [prefix for prefix in prefixes if not any(prefix.startswith(other + "/") for other in prefixes
                                                       if other and other != prefix)]
    if "" in starts:
        starts = [""]
    for start in starts:
        if start and any(always_excluded_dir(part) for part in start.split("/")):
            continue
        found.extend(_matching(root, start, matcher, outside, watched))
    return found, watched


def _matching(root: Path, start: str, matcher: IgnoreFile, outside: frozenset[str],
              watched: dict[str, int]) -> Iterator[str]:
    pending = [(start, False)]
    while pending:
        directory, inside = pending.pop()
        entries = _entries(root / directory if directory else root, watched, directory)
        if entries is None or (directory and any(name == "pyvenv.cfg" for name, _ in entries)):
            continue
        for relative, is_dir, verdict in _verdicts(directory, entries, matcher, outside):
            matched = inside if verdict is None else verdict
            if is_dir and verdict is not False:  # a negated directory (``!data/big/``) stays out whole
                pending.append((relative, matched))
            elif not is_dir and matched:
                yield relative


def _verdicts(directory: str, entries: list[tuple[str, bool]], matcher: IgnoreFile,
              outside: frozenset[str]) -> Iterator[tuple[str, bool, bool | None]]:
    """(relative path, is a directory, what the include patterns say) of the entries that may travel."""
    for name, is_dir in entries:
        relative = f"{directory}/{name}" if directory else name
        if (always_excluded_dir(name) if is_dir else always_excluded_file(name)) or relative in outside:
            continue
        yield relative, is_dir, matcher.check(relative, is_dir)
