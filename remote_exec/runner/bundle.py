"""The runner's compiled code in one file per interpreter, so that a call's imports skip the import system's search.

A process-per-call runner imports some twenty modules of its archive on every call, and the task process
a few more. Each import through ``sys.path`` looks the name up in the path's directories, stats the
source and its ``.pyc``, opens and reads that: about 40 us a module beyond unmarshalling and running its
code, ~0.7 ms of every call on the host.

So the archive ships a *bundle* for the coordinator's interpreter, ``<archive>/.rx-code-<cache tag>-<magic>``:
the compiled code of the modules the remote side uses (:data:`REMOTE_SIDE`), built by :func:`pack` in a
fresh interpreter on the coordinator (:func:`remote_exec.packing._bundle`). A host whose interpreter is
another (its tag or magic differs, so it never opens that file) imports the usual way, and at the end of a
call served without a bundle the runner writes one for its interpreter, taken from the ``.pyc`` files
Python wrote while that call imported them, each checked against its source as the import system checks
it (no compiling here). Its layout: the index's length and the file's size (8 bytes each),
the index (a marshal of ``{module name: (is a package, path in the archive, offset, length)}`` and under
``""`` the code of :data:`FINDER`), then each module's marshalled code.

The bootstrap reads the index and runs the finder, which serves those modules (each read with one
``pread`` when imported; ``__file__``, ``__path__`` and tracebacks as from the archive's files);
everything else goes the usual way. A module whose code does not read or load is loaded from its file as
usual, and the bundle is removed (the next call's runner writes it again).

The bundle belongs to its archive (content-addressed, never changed after its install), so it is never
stale; it goes with the archive (gc, a damaged install). The archive's ``.rx-sizes`` leaves it out: it
checks its own size, and removing it never makes the archive look damaged. One that does not open (a file
of the wrong size) is passed over by the bootstrap and written again by that call's runner.
It is written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from typing import Any

__all__ = ["FINDER", "PREFIX", "REMOTE_SIDE", "bundle_name", "collect", "pack", "write_bundle"]

#: The size marker the bootstrap leaves in an installed archive (only such a directory gets a bundle).
SIZES = ".rx-sizes"
#: What a bundle's name starts with.
PREFIX = ".rx-code-"

#: The modules the remote side imports (paths in the archive; a folder: every module in it): the modules
#: the archive ships compiled (packing.REMOTE_MODULES, tested equal).
REMOTE_SIDE = ("remote_exec/__init__.py", "remote_exec/api.py", "remote_exec/lazy.py", "remote_exec/task.py",
               "remote_exec/session.py", "remote_exec/serialization.py", "remote_exec/errors.py",
               "remote_exec/protocol/__init__.py", "remote_exec/protocol/wire.py", "remote_exec/runner/")

#: The finder the bootstrap runs from a bundle. Its globals: ``codes`` (the index without its ``""`` entry),
#: ``p`` (the archive), ``bundle`` and ``fd`` (the bundle's path and descriptor) and ``base`` (where its code
#: starts). Standard library only, and Python 3.8's: it runs before anything else is imported.
FINDER = r"""
import sys
import marshal
_bootstrap = sys.modules["_frozen_importlib"]
_external = sys.modules["_frozen_importlib_external"]
_pread = sys.modules["posix"].pread
_fix_filename = sys.modules["_imp"]._fix_co_filename


class RxBundle:
    '''Serves the archive's modules from its bundle (see remote_exec.runner.bundle).'''

    rx_bundle = bundle

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        entry = codes.get(name)
        if entry is None:
            return None
        origin = p + "/" + entry[1]
        spec = _bootstrap.ModuleSpec(name, cls, origin=origin, is_package=entry[0])
        spec.has_location = True
        if entry[0]:
            spec.submodule_search_locations = [origin.rpartition("/")[0]]
        return spec

    @staticmethod
    def create_module(spec):
        return None

    @classmethod
    def exec_module(cls, module):
        spec = module.__spec__
        entry = codes.pop(spec.name)
        try:
            data = _pread(fd, entry[3], base + entry[2])
            if len(data) != entry[3]:
                raise ValueError("short read")
            code = marshal.loads(data)
            _fix_filename(code, spec.origin)  # as the import system does: the .pyc may name another place
        except (OSError, ValueError, EOFError, TypeError):  # from its file; the next runner writes it again
            try:
                sys.modules["posix"].unlink(bundle)
            except OSError:
                pass
            _external.SourceFileLoader(spec.name, spec.origin).exec_module(module)
            return
        exec(code, module.__dict__)


sys.meta_path.insert(0, RxBundle)
"""


def bundle_name() -> str | None:
    """This interpreter's bundle name, or None where there is none (not CPython's ``.pyc`` files)."""
    from _frozen_importlib_external import MAGIC_NUMBER

    tag = sys.implementation.cache_tag
    return f"{PREFIX}{tag}-{MAGIC_NUMBER.hex()}" if tag and tag.startswith("cpython-") else None


def _package_dir() -> str:
    """The archive's ``remote_exec`` directory."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_of(source: str, cached: str, magic: bytes) -> bytes | None:
    """The marshalled code of the ``.pyc`` ``cached`` when the import system would take it for ``source``,
    else None: this interpreter's magic, and a timestamp header with the source's mtime and size, or a
    hash-based one (PEP 552) checked against the source as ``_imp.check_hash_based_pycs`` says."""
    try:
        with open(cached, "rb") as stream:
            data = stream.read()
        if len(data) < 16 or data[:4] != magic:
            return None
        flags = int.from_bytes(data[4:8], "little")
        if flags == 0:
            st = os.stat(source)
            if (int.from_bytes(data[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                    or int.from_bytes(data[12:16], "little") != st.st_size & 0xFFFFFFFF):
                return None
        elif flags in (1, 3):
            import _imp

            check = _imp.check_hash_based_pycs
            if check != "never" and (flags == 3 or check == "always"):
                from _frozen_importlib_external import _RAW_MAGIC_NUMBER  # type: ignore[attr-defined]

                with open(source, "rb") as stream:
                    if _imp.source_hash(_RAW_MAGIC_NUMBER, stream.read()) != data[8:16]:
                        return None
            elif not os.path.isfile(source):
                return None
        else:
            return None
    except OSError:
        return None
    return data[16:]


def collect(package_dir: str, wanted: tuple[str, ...] = REMOTE_SIDE) -> dict[str, tuple[bool, str, bytes]]:
    """``{module name: (is a package, path in the archive, marshalled code)}`` for the modules of the
    package at ``package_dir`` that ``wanted`` names (paths from the package's parent; a folder: all its
    modules) and have a ``.pyc`` of this interpreter the import system would take."""
    from _frozen_importlib_external import MAGIC_NUMBER

    tag = sys.implementation.cache_tag
    top = os.path.dirname(package_dir)
    found: dict[str, tuple[bool, str, bytes]] = {}
    for folder, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(name for name in dirs if name != "__pycache__" and not name.startswith("."))
        relative = os.path.relpath(folder, top).replace(os.sep, "/")
        for name in sorted(files):
            path = f"{relative}/{name}"
            if not name.endswith(".py") or not any(path == want or (want.endswith("/") and path.startswith(want)
                                                                        and "/" not in path[len(want):])
                                                   for want in wanted):
                continue
            stem = name[:-3]
            code = _code_of(os.path.join(folder, name), os.path.join(folder, "__pycache__", f"{stem}.{tag}.pyc"),
                            MAGIC_NUMBER)
            if code is not None:
                dotted = relative.replace("/", ".")
                found[dotted if stem == "__init__" else f"{dotted}.{stem}"] = (stem == "__init__", path, code)
    return found


def pack(codes: dict[str, tuple[bool, str, bytes]]) -> bytes:
    """The bundle of ``codes`` (see the module docstring for its layout)."""
    index: dict[str, Any] = {"": compile(FINDER, "<rx bundle finder>", "exec", dont_inherit=True)}
    offset = 0
    for name, (package, path, code) in codes.items():
        index[name] = (package, path, offset, len(code))
        offset += len(code)
    head = marshal.dumps(index)
    size = 16 + len(head) + offset
    return b"".join([len(head).to_bytes(8, "big"), size.to_bytes(8, "big"), head,
                     *(code for _, _, code in codes.values())])


def write_bundle() -> str | None:
    """Write this archive's bundle for this interpreter (see the module docstring); its path, or None when
    this runner does not run from an installed archive, or the archive cannot take it (not writable)."""
    name = bundle_name()
    package_dir = _package_dir()
    archive = os.path.dirname(package_dir)
    if name is None or not os.path.isfile(os.path.join(archive, SIZES)) or not os.access(archive, os.W_OK):
        return None
    data = pack(collect(package_dir))
    target = os.path.join(archive, name)
    temporary = f"{target}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, target)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return None
    return target
