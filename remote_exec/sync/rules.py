"""What never travels, and gitignore-syntax files (``.gitignore``, ``.rxignore``, include lists) as matchers.

The patterns are read by pathspec's gitignore implementation (git's own rules: anchoring by a slash,
``**``, negation, a trailing slash for directories); :class:`IgnoreFile` adds a combined regular
expression in front of them, so the common case (a path no pattern matches) costs one match instead of
one per pattern. Precedence is git's: within a file the last matching pattern decides; a deeper file
overrides a shallower one; nothing under an excluded directory can be re-included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "ALWAYS_EXCLUDED_DIRS",
    "IgnoreFile",
    "IgnoreStack",
    "always_excluded_dir",
    "always_excluded_file",
    "read_ignore_file",
]

#: Directories that never travel, wherever they are: version control, virtualenvs, caches, node_modules,
#: notebook checkpoints and rx's own workspace (``.rx``). Also left out: ``.*_cache`` directories (pytest,
#: mypy, ruff), any directory holding a ``pyvenv.cfg`` (a virtualenv by another name), ``*.pyc`` files.
ALWAYS_EXCLUDED_DIRS = frozenset({".git", ".hg", ".svn", ".venv", "venv", "__pycache__", "node_modules",
                                  ".ipynb_checkpoints", ".rx"})
_NAMED_GROUP = re.compile(r"\(\?P<[^>]+>")


def always_excluded_dir(name: str) -> bool:
    """A directory of this name never travels."""
    return name in ALWAYS_EXCLUDED_DIRS or (name.startswith(".") and name.endswith("_cache"))


def always_excluded_file(name: str) -> bool:
    """A file (or symlink) of this name never travels."""
    return name.endswith((".pyc", ".pyo")) or name == ".git"


class IgnoreFile:
    """The patterns of one gitignore-syntax file, which apply below its directory.

    Args:
        base: The file's directory relative to the project root (``""`` for the root), without a slash.
        lines: Its lines.
    """

    def __init__(self, base: str, lines: Iterable[str]) -> None:
        from pathspec import GitIgnoreSpec

        self.base = base
        self.prefix = f"{base}/" if base else ""
        spec = GitIgnoreSpec.from_lines([line for line in lines if line.strip()])
        self.patterns: list[tuple[re.Pattern[str], bool]] = [
            (pattern.regex, bool(pattern.include)) for pattern in spec.patterns
                         if pattern.include is not None and pattern.regex is not None]
        self.any = re.compile("|".join(f"(?:{_NAMED_GROUP.sub('(?:', regex.pattern)})"
                                       for regex, _ in self.patterns)) if self.patterns else None

    def __bool__(self) -> bool:
        return self.any is not None

    def check(self, relative: str, is_dir: bool) -> bool | None:
        """True: ``relative`` (from the project root) is matched by an excluding pattern; False: by a
        negated one (``!pattern``); None: by none, or it is not below this file's directory."""
        if self.any is None or not relative.startswith(self.prefix):
            return None
        path = relative[len(self.prefix):] + ("/" if is_dir else "")
        if not self.any.match(path):
            return None
        for regex, include in reversed(self.patterns):
            if regex.match(path):
                return include
        return None


def read_ignore_file(path: Path, base: str) -> IgnoreFile | None:
    """The patterns of the file at ``path`` (None when it is missing, unreadable or empty)."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None
    rules = IgnoreFile(base, text.splitlines())
    return rules if rules else None


class IgnoreStack:
    """The ignore files that apply in one directory, shallowest first."""

    def __init__(self, files: tuple[IgnoreFile, ...] = ()) -> None:
        self.files = files

    def push(self, file: IgnoreFile | None) -> IgnoreStack:
        """This stack with ``file`` (of a deeper directory) on top."""
        return self if file is None else IgnoreStack((*self.files, file))

    def excluded(self, relative: str, is_dir: bool) -> bool:
        """Whether the deepest file with a pattern matching ``relative`` excludes it."""
        for file in reversed(self.files):
            verdict = file.check(relative, is_dir)
            if verdict is not None:
                return verdict
        return False
