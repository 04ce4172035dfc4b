"""A project tree as it travels: its entries, its id, its manifest, and the guardrails on its size."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from ..errors import SyncError
from ..protocol import wire

__all__ = ["LARGE_FILE", "LARGE_TREE_BYTES", "LARGE_TREE_FILES", "MAX_TREE_BYTES", "Tree", "TreeFile", "guard",
           "human_size", "refuse"]

#: A file larger than this is named in a warning.
LARGE_FILE = 10 << 20
#: A tree larger than this (bytes or files) gets a warning naming its largest files.
LARGE_TREE_BYTES = 256 << 20
LARGE_TREE_FILES = 10_000
#: A tree larger than this is refused unless forced.
MAX_TREE_BYTES = 2 << 30


def human_size(size: float) -> str:
    """``1.5 MiB``, ``312 B``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - unreachable


class TreeFile(NamedTuple):
    """One entry of a tree (a named tuple: a scan makes one per file).

    Attributes:
        path: Relative to the project root, ``/``-separated.
        mode: 0o100644, 0o100755 (executable) or 0o120000 (a symlink).
        size: Bytes (a symlink: its target's length).
        digest: sha256 of the content (a symlink: of its target).
        link: A symlink's target (relative, inside the tree); empty for a file.
        source: The local file the content is read from (a followed symlink: its target); None for a link.
        stamp: The source's (mtime_ns, ctime_ns, inode) when its digest was taken: the same stamp when it is
            sent means the same content (no need to hash it again).
    """

    path: str
    mode: int
    size: int
    digest: bytes
    link: str = ""
    source: str | None = None
    stamp: tuple[int, int, int] | None = None

    @property
    def is_link(self) -> bool:
        return self.mode == wire.LINK_MODE


@dataclass(frozen=True)
class Tree:
    """A scanned project: what travels, content-addressed.

    Attributes:
        root: The project root.
        entries: Sorted by path.
        how: ``git`` (git's file list) or ``walk``.
        outside: Symlinks that were followed out of the tree (path, target).
    """

    root: Path
    entries: tuple[TreeFile, ...]
    how: str = "walk"
    outside: tuple[tuple[str, str], ...] = field(default=())

    @cached_property
    def wire_entries(self) -> list[tuple[str, int, int, bytes, str]]:
        """The entries as the manifest carries them."""
        return [entry[:5] for entry in self.entries]

    @cached_property
    def tree_id(self) -> str:
        """sha256 over the sorted (path, mode, blob hash) list (see :func:`remote_exec.protocol.wire.tree_id`)."""
        return wire.tree_id(self.wire_entries)

    @cached_property
    def manifest(self) -> bytes:
        """The manifest's bytes (M frames)."""
        return wire.dump_manifest(self.wire_entries)

    @cached_property
    def sources(self) -> dict[bytes, TreeFile]:
        """One file per distinct content, by digest (what is read when that blob is asked for)."""
        found: dict[bytes, TreeFile] = {}
        for entry in self.entries:
            if not entry.is_link:
                found.setdefault(entry.digest, entry)
        return found

    @property
    def files(self) -> int:
        """How many entries (files and symlinks)."""
        return len(self.entries)

    @cached_property
    def total_bytes(self) -> int:
        """The bytes of every file (each counted where it appears)."""
        return sum(entry.size for entry in self.entries if not entry.is_link)

    def largest(self, count: int = 10) -> list[TreeFile]:
        """The ``count`` largest files, largest first."""
        import heapq

        files = (entry for entry in self.entries if entry.mode != wire.LINK_MODE)
        return heapq.nsmallest(count, files, key=lambda entry: (-entry.size, entry.path))

    def contains(self, path: str) -> bool:
        """Whether ``path`` (relative) is an entry."""
        return any(entry.path == path for entry in self.entries)


def _named(entries: list[TreeFile]) -> str:
    return ", ".join(f"{entry.path} ({human_size(entry.size)})" for entry in entries)


def refuse(tree: Tree, *, force: bool = False, limit: int = MAX_TREE_BYTES) -> None:
    """Refuse a tree larger than ``limit`` (unless ``force``).

    Raises:
        SyncError: It is.
    """
    total = tree.total_bytes
    if total > limit and not force:
        raise SyncError(f"the project {tree.root} is {human_size(total)} in {tree.files:,} files, over the "
                        f"{human_size(limit)} rx ships; largest: {_named(tree.largest(5))}",
                        hint="leave files out with .rxignore, or pass --force")


def guard(tree: Tree, *, force: bool = False, limit: int = MAX_TREE_BYTES) -> list[str]:
    """The warnings a tree of this size deserves (one line each).

    Raises:
        SyncError: Larger than ``limit`` and not ``force``.
    """
    refuse(tree, force=force, limit=limit)
    total, count = tree.total_bytes, tree.files
    warnings = []
    if total > LARGE_TREE_BYTES or count > LARGE_TREE_FILES:
        warnings.append(f"the project is large ({count:,} files, {human_size(total)}); largest: "
                        f"{_named(tree.largest(3))} (see rx sync --dry-run; leave files out with .rxignore)")
    else:
        large = [entry for entry in tree.largest(3) if entry.size > LARGE_FILE]
        if large:
            warnings.append(f"large files in the project: {_named(large)} (they travel when they change; "
                            "leave them out with .rxignore)")
    return warnings
