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

One small file per place in rx's cache directory (``places/<digest>``): the archives' sha256, one per line,
the latest last (at most :data:`KEEP`); or the single line :data:`NO_AHEAD`. Best effort: a cache; a file
that cannot be read or written is no record.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["AHEAD_LIMIT", "KEEP", "NO_AHEAD", "Place", "place"]

#: Largest archive sent unasked (rx's own is ~0.75 MB): a larger one waits to be asked for.
AHEAD_LIMIT = 2 << 20
#: Archives remembered per place.
KEEP = 8
#: The record of a place whose login shell replaced itself: nothing goes ahead there.
NO_AHEAD = "no-ahead"


def _folder() -> str:
    from ..prestart import memo_path

    return os.path.join(os.path.dirname(memo_path()), "places")


class Place:
    """The record of one place (see the module docstring)."""

    __slots__ = ("entries", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, encoding="ascii") as file:
                self.entries = file.read().split()
        except (OSError, ValueError):
            self.entries = []

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
        if entries == self.entries:
            return
        self.entries = entries
        from ..prestart import write_private

        write_private(self.path, "".join(f"{entry}\n" for entry in entries).encode("ascii"))


def place(backend: Backend, python: str, workdir: str) -> Place:
    """The record of where ``backend`` starts runners with ``python`` in ``workdir``."""
    import hashlib

    spec = backend.spec
    words = (type(backend).__name__, spec.host, spec.user or "", str(spec.port or ""), str(spec.ssh_config or ""),
             str(python), str(workdir))
    digest = hashlib.sha256("\0".join(words).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return Place(os.path.join(_folder(), digest))
