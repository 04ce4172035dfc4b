"""What this user's rx has seen installed where, kept across processes: per *place* a runner starts (the
backend, the host as named with its user, port and ssh_config, the interpreter and the workdir), the
archives whose bootstrap answered there at once with the archive in place.

A process's first call to a place uses it as the process's later calls use what they saw themselves (see
:func:`remote_exec.protocol.call.dispatch`), each sparing the round trip of waiting for the bootstrap's
first answer:

* an archive seen there: the call's frames go right behind the runner's command;
* a small archive (at most :data:`AHEAD_LIMIT` bytes) not seen there: it goes right behind the command,
  unasked, the call's frames behind it (a new host, a new version of rx, an edited module). Where the host
  has it after all (installed by another machine sharing its home), the bootstrap skips those bytes.

A place whose login shell did not run rx's command itself (an ``exec`` in ``~/.bashrc``: the runner was
resumed through stdin), or whose runner took longer than ``RESUME_AFTER`` to answer (what went ahead is
given up then, and the start made again), is noted as such, and nothing goes ahead there. A record that is
wrong costs what it would have saved (a second start, or an archive sent for nothing), and the answer
corrects it.

The record also holds the project trees a call there ran in (their ids, the latest last, at most
:data:`KEEP`): a call whose tree is not among them sends its manifest, and the blobs that are new since the
latest one (at most :data:`TREE_AHEAD_LIMIT` bytes of them), right behind its G frame, unasked (see
:func:`remote_exec.protocol.tree.ahead_frames`), sparing the two round trips of the runner asking for them
(``T``, then ``N``). The manifests sent so are kept (``manifests/<tree id>``, the latest :data:`MANIFESTS`)
to tell the next tree's new blobs.

One small file per place in rx's cache directory (``places/<digest>``): the archives' sha256, one per line,
the latest last (at most :data:`KEEP`), or the single line :data:`NO_AHEAD`; then the trees, a line
``tree <id>`` each. Best effort: a cache; a file that cannot be read or written is no record.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..sync.tree import Tree

__all__ = ["AHEAD_LIMIT", "KEEP", "MANIFESTS", "NO_AHEAD", "PLACES", "TREE_AHEAD_LIMIT", "Place", "load_manifest",
           "place", "save_manifest"]

#: Largest archive sent unasked (rx's own is ~0.75 MB): a larger one waits to be asked for.
AHEAD_LIMIT = 2 << 20
#: Archives remembered per place.
KEEP = 8
#: The record of a place whose login shell replaced itself: nothing goes ahead there.
NO_AHEAD = "no-ahead"
#: Most bytes of blobs sent unasked with a call's tree (a manifest larger than this waits to be asked for).
TREE_AHEAD_LIMIT = 1 << 20
#: Manifests kept to tell which blobs of a new tree are new.
MANIFESTS = 32
#: Places whose record is kept (the least recently changed go first: a benchmark's or a test's fresh
#: workdirs would otherwise pile up).
PLACES = 256
_TREE = "tree"


def _folder() -> str:
    from ..prestart import memo_path

    return os.path.join(os.path.dirname(memo_path()), "places")


class Place:
    """The record of one place (see the module docstring)."""

    __slots__ = ("entries", "path", "trees")

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, encoding="ascii") as file:
                lines = file.read().splitlines()
        except (OSError, ValueError):
            lines = []
        #: The archives' sha256 (or :data:`NO_AHEAD`), the latest last.
        self.entries = [line for line in lines if line and not line.startswith(_TREE)]
        #: The ids of the trees calls here ran in, the latest last.
        self.trees = [line.split()[-1] for line in lines if line.startswith(_TREE + " ")]

    @property
    def ahead(self) -> bool:
        """Whether anything may go ahead of the bootstrap's answer here."""
        return NO_AHEAD not in self.entries

    def has(self, sha256: str) -> bool:
        """Whether a runner here answered at once with the archive ``sha256`` in place."""
        return self.ahead and sha256 in self.entries

    def send_ahead(self, sha256: str, size: int) -> bool:
        """Whether the archive (``sha256``, ``size`` bytes) goes right behind the command, unasked."""
        return self.ahead and sha256 not in self.entries and size <= AHEAD_LIMIT

    def note(self, sha256: str, *, prompt: bool) -> None:
        """Record how a runner started here with ``sha256`` in place: at once (``prompt``), or through a
        login shell that replaced itself."""
        entries = [sha256] if prompt else [NO_AHEAD]
        if prompt:
            entries = [entry for entry in self.entries if entry not in (sha256, NO_AHEAD)][-(KEEP - 1):] + entries
        if entries != self.entries:
            self.entries = entries
            self._write()

    def has_tree(self, tree_id: str) -> bool:
        """Whether a call here ran in the tree ``tree_id`` (so the host has it stored)."""
        return tree_id in self.trees

    def note_tree(self, tree: Tree) -> None:
        """Record that ``tree`` is stored here (a call ran in it, or ``rx sync`` stored it), and keep its
        manifest to tell the next tree's new blobs."""
        tree_id = tree.tree_id
        if self.trees[-1:] != [tree_id]:
            self.trees = [*[known for known in self.trees if known != tree_id][-(KEEP - 1):], tree_id]
            self._write()
            save_manifest(tree_id, tree.manifest)

    def _write(self) -> None:
        from ..prestart import write_private

        new = not os.path.exists(self.path)
        lines = [*self.entries, *(f"{_TREE} {tree}" for tree in self.trees)]
        write_private(self.path, "".join(f"{line}\n" for line in lines).encode("ascii"))
        if new:
            _prune(os.path.dirname(self.path), PLACES)


def place(backend: Backend, python: str, workdir: str) -> Place:
    """The record of where ``backend`` starts runners with ``python`` in ``workdir``."""
    import hashlib

    spec = backend.spec
    words = (type(backend).__name__, spec.host, spec.user or "", str(spec.port or ""), str(spec.ssh_config or ""),
             str(python), str(workdir))
    digest = hashlib.sha256("\0".join(words).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return Place(os.path.join(_folder(), digest))


def _manifest_path(tree_id: str) -> str:
    return os.path.join(os.path.dirname(_folder()), "manifests", tree_id)


def save_manifest(tree_id: str, manifest: bytes) -> None:
    """Keep the manifest of a tree sent unasked (the oldest beyond :data:`MANIFESTS` go). Best effort."""
    from ..prestart import write_private

    path = _manifest_path(tree_id)
    try:
        os.utime(path)
        return
    except OSError:
        pass
    write_private(path, manifest)
    _prune(os.path.dirname(path), MANIFESTS)


def _prune(folder: str, keep: int) -> None:
    """Remove all but the ``keep`` latest files of ``folder`` (by modification time; temporaries aside)."""
    try:
        names = [name for name in os.listdir(folder) if "." not in name]
        if len(names) > keep:
            aged = sorted(names, key=lambda name: os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in aged[:len(names) - keep]:
                os.unlink(os.path.join(folder, name))
    except OSError:  # (another process pruned it meanwhile)
        pass


def load_manifest(tree_id: str) -> bytes | None:
    """The manifest :func:`save_manifest` kept of ``tree_id``, or None."""
    try:
        with open(_manifest_path(tree_id), "rb") as file:
            return file.read()
    except OSError:
        return None
