"""On a host, the modules of remote_exec that only a coordinator uses: unpacked the first time one is imported.

The archive carries them in one stored file beside the package, :data:`NAME` (built by
:func:`remote_exec.packing._split_lazy`), so a host's first call extracts only what the runner and the task
process import: half of the archive's bytes and a third of its files (~3 ms of that call on the testbed).
Most tasks never import the rest. One that does (``from remote_exec import Executor`` at the top of a task
module, a task that calls other tasks from the host) gets it through :class:`LazyModules`, last on
``sys.meta_path`` and so asked only for a module the usual search did not find. It unpacks the whole file
beside the package once (then leaves :data:`UNPACKED` there), and the import goes on as usual: from then on
those modules are files like the others, compiled once and cached, and a module asked for that is in
neither place costs nothing more.

Unpacking is safe with any number of processes at it: everything is written under a temporary folder
first, then each folder the package lacks is renamed into place whole and each file of a folder it has
is renamed in one by one (a rename replaces atomically), so no process ever sees half a folder or half a
file. A process killed meanwhile leaves its ``.tmp-lazy-*`` folder, which goes with the archive (gc).

Standard library only. The package imports this module wherever it is imported (one ``stat`` each time),
but installs the finder only where the folder above the package has the file: never on the coordinator.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at run time: the package is imported on every call on a host
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from typing import Any

__all__ = ["NAME", "UNPACKED", "LazyModules", "install", "unpack"]

#: The file beside the package (in the archive's folder) that holds the modules only a coordinator uses.
NAME = ".rx-lazy.zip"
#: Left beside it once it was unpacked in full: a module asked for after that is in neither place.
UNPACKED = ".rx-lazy-unpacked"


def install(package_dir: str) -> None:
    """Put :class:`LazyModules` last on ``sys.meta_path`` (once) when the folder holding the package at
    ``package_dir`` has :data:`NAME` (an installed archive on a host); else do nothing."""
    archive = os.path.dirname(package_dir)
    if os.path.isfile(os.path.join(archive, NAME)) and not any(
            getattr(finder, "rx_lazy", None) == archive for finder in sys.meta_path):
        sys.meta_path.append(LazyModules(archive))


class LazyModules:
    """Finds ``remote_exec``'s modules that are still in :data:`NAME`: unpacks it, then finds them as usual."""

    def __init__(self, archive: str) -> None:
        self.rx_lazy = archive
        self.tried = False  # unpacked in this process already: what is still missing is not in the file

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if (self.tried or not name.startswith("remote_exec.") or not os.path.isfile(os.path.join(self.rx_lazy, NAME))
                or os.path.exists(os.path.join(self.rx_lazy, UNPACKED))):
            return None
        self.tried = True
        try:
            unpack(self.rx_lazy)
        except Exception as exc:  # OSError (a read-only or full disk), zipfile.BadZipFile (a damaged file)
            raise ImportError(f"rx: cannot unpack {NAME} in {self.rx_lazy} for {name}: {exc}", name=name) from exc
        from importlib.machinery import PathFinder

        PathFinder.invalidate_caches()  # the folders just changed: no listing of them may be trusted
        return PathFinder.find_spec(name, path, target)

    def invalidate_caches(self) -> None:
        pass


def unpack(archive: str) -> None:
    """Unpack :data:`NAME` beside the package of ``archive`` (see the module docstring). What is already in
    place stays; a file or folder another process put there first wins.

    Raises:
        OSError: The archive's folder cannot take the files (read-only, full).
    """
    import shutil
    import zipfile

    temporary = os.path.join(archive, f".tmp-lazy-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with zipfile.ZipFile(os.path.join(archive, NAME)) as lazy:
            for entry in lazy.namelist():
                if entry.startswith("/") or ".." in entry.split("/") or "\\" in entry:
                    raise OSError(f"rx: a bad entry in {NAME}: {entry!r}")
            lazy.extractall(temporary)
        _move_in(temporary, archive)
        with open(os.path.join(archive, UNPACKED), "wb"):
            pass
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _move_in(source: str, target: str) -> None:
    """Move the contents of folder ``source`` into folder ``target``: a folder ``target`` lacks whole, a file
    over what is there (the same bytes), the contents of a folder it has one by one."""
    for name in sorted(os.listdir(source)):
        here, there = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(here) and os.path.isdir(there):
            _move_in(here, there)
            continue
        try:
            os.rename(here, there)
        except OSError:
            if not os.path.isdir(there):  # a folder: another process moved it in first (ENOTEMPTY, EEXIST)
                raise
