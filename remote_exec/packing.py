"""The distribution archive: a zipapp holding the runner, the remote-side modules and the user's code.

A :class:`DistributionArchive` holds:

- ``__main__.py``: starts :func:`remote_exec.runner.main` (so ``python3 archive.pyz`` is the runner);
- remote_exec itself without its CLI: the runner and the modules it imports are standard library only
  (:data:`REMOTE_MODULES`); the rest is there for task modules that import the public API;
- cloudpickle, copied from the local installation (pure Python);
- the user's local code: the task's module or script and the project modules it imports, found by
  reading their import statements (a helper module next to a script just works), plus whatever
  :meth:`Configuration.add_modules_for_distribution` lists. Modules of the standard library and of
  site-packages are not shipped unless listed.

Archives are deterministic (sorted entries, fixed timestamps), named by the sha256 of their bytes, and
built once per content: a second call with unchanged code reuses the archive in the local cache, and the
remote keeps it by that hash.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import io
import logging
import os
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PackError
from .task import Task

__all__ = ["RECHECK_SECONDS", "REMOTE_MODULES", "DistributionArchive", "Packer", "default_cache_dir",
           "discover_modules", "prune_cache"]

logger = logging.getLogger(__name__)

#: The modules of remote_exec the runner imports: standard library only (tested with everything else
#: blocked). The rest of the package travels too, for task modules that import the public API.
#: Every module of ``remote_exec/runner/`` counts (the runner's rooms are imported per mode). ``api`` is
#: imported by the package itself (its ``task``). The host's code bundle takes the same modules
#: (:data:`remote_exec.runner.bundle.REMOTE_SIDE`, tested equal).
REMOTE_MODULES = ("__init__", "api", "errors", "lazy", "protocol/__init__", "protocol/wire", "serialization",
                  "session", "task",
                  *sorted(f"runner/{path.stem}" for path in (Path(__file__).parent / "runner").glob("*.py")))

_MAIN = b"import sys\nfrom remote_exec.runner import main\nsys.exit(main(sys.argv[1:]))\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)
# state: ast.parse is not thread-safe on CPython 3.11 (its recursion counter belongs to the interpreter, not
# the thread: gh-106905 raises "AST constructor recursion depth mismatch" when two threads parse at once), and
# a pool's slots, or two @task calls from two threads, may scan imports at the same moment.
_AST_LOCK = threading.Lock()
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".nox", ".venv", "venv", ".mypy_cache",
              ".pytest_cache", ".rx", "node_modules", ".eggs", "build", "dist"}


def _system_dirs() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    dirs = {Path(paths[key]).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        dirs.add((Path(prefix) / "lib").resolve())
    for entry in sys.path:
        if "site-packages" in entry or "dist-packages" in entry:
            dirs.add(Path(entry).resolve())
    return tuple(dirs)


def _is_under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


@dataclass(frozen=True)
class _Module:
    name: str            # top-level import name
    path: Path           # a .py file or a package directory
    root: Path           # the sys.path entry it was found under


def _imports_of(path: Path) -> set[tuple[str, int]]:
    """``(name, level)`` of every import statement in a file (relative ones with their level)."""
    try:
        source = path.read_bytes()
        with _AST_LOCK:
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, OSError) as exc:
        logger.debug("cannot scan imports of %s: %s", path, exc)
        return set()
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.add((base, node.level))
            found.update((f"{base}.{alias.name}" if base else alias.name, node.level) for alias in node.names)
    return found


def _find_top_level(name: str, search: list[Path]) -> _Module | None:
    top = name.split(".")[0]
    if not top or top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return None
    for root in search:
        package = root / top
        if (package / "__init__.py").is_file():
            return _Module(top, package, root)
        module = root / f"{top}.py"
        if module.is_file():
            return _Module(top, module, root)
    return None


def discover_modules(entry_files: Iterable[Path], roots: Iterable[Path]) -> list[_Module]:
    """The project modules that ``entry_files`` import, directly or through each other.

    Only modules found as files under ``roots`` (the script's folder, the project's source roots) count;
    the standard library, site-packages and remote_exec itself are left out.
    """
    queue = [Path(file).resolve() for file in entry_files]
    if not queue:
        return []
    search = [Path(root).resolve() for root in roots]
    system = _system_dirs()
    found: dict[str, _Module] = {}
    scanned: set[Path] = set()
    while queue:
        file = queue.pop()
        if file in scanned or not file.is_file():
            continue
        scanned.add(file)
        for name, level in _imports_of(file):
            if level:  # relative: inside a package we ship whole already
                continue
            module = _find_top_level(name, search)
            if module is None or module.name in found or module.name == "remote_exec":
                continue
            if _is_under(module.path.resolve(), system):
                continue
            found[module.name] = module
            if module.path.is_dir():
                queue.extend(module.path.rglob("*.py"))
            else:
                queue.append(module.path)
    return sorted(found.values(), key=lambda module: module.name)


def _package_files(module: _Module) -> list[tuple[str, Path]]:
    if module.path.is_file():
        return [(module.path.name, module.path)]
    files = []
    for directory, dirnames, filenames in os.walk(module.path):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if filename.endswith((".py", ".pyi", ".json", ".toml", ".txt", ".cfg", ".yaml", ".yml")):
                path = Path(directory) / filename
                files.append((path.relative_to(module.root).as_posix(), path))
    return files


def _import_path(name: str) -> _Module:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise PackError(f"cannot ship module {name!r}: {exc}") from exc
    if spec is None:
        raise PackError(f"cannot ship module {name!r}: no such module here",
                        hint="check the name, and that its folder is on sys.path")
    if spec.origin in (None, "built-in", "frozen"):
        raise PackError(f"cannot ship module {name!r}: it is not a module file",
                        hint="add_modules_for_distribution takes importable pure-Python modules or packages")
    origin = Path(spec.origin)
    top = name.split(".")[0]
    if spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        depth = name.count(".") + 1
        root = package
        for _ in range(depth):
            root = root.parent
        top_path = root / top
        return _Module(top, top_path, root)
    if "." in name:
        return _import_path(top)
    if origin.suffix != ".py":
        raise PackError(f"cannot ship module {name!r}: {origin.name} is not pure Python")
    return _Module(top, origin, origin.parent)


@dataclass(frozen=True)
class DistributionArchive:
    """A built archive.

    Attributes:
        path: The .pyz file in the local cache.
        sha256: sha256 of its bytes (its name on the remote).
        size: Its size in bytes.
        modules: The user modules it carries (top-level names).
        sources: Where they came from: (top-level name in the archive, local file or package folder);
            remote tracebacks are mapped back to the local files through these.
    """

    path: Path
    sha256: str
    size: int
    modules: tuple[str, ...]
    sources: tuple[tuple[str, str], ...] = ()

    def read(self) -> bytes:
        """The archive's bytes, checked against its sha256.

        Raises:
            PackError: The cached file changed since it was built (it is removed: the next build makes it
                again).
        """
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            self.path.unlink(missing_ok=True)
            raise PackError(f"the cached archive {self.path} changed on disk since it was built; it was removed",
                            hint="run again: rx builds it anew")
        return data

    @classmethod
    def build(cls, *, entry_files: Iterable[Path] = (), roots: Iterable[Path] = (),
              extra_modules: Iterable[str] = (), cache_dir: Path | None = None) -> DistributionArchive:
        """Build (or reuse) the archive for code that starts in ``entry_files`` (see :meth:`Packer.build`;
        this one remembers nothing between calls but the archive cache on disk)."""
        return Packer().build(entry_files=entry_files, roots=roots, extra_modules=extra_modules, cache_dir=cache_dir)


def default_cache_dir() -> Path:
    """The local cache for built archives."""
    from_env = os.environ.get("RX_CACHE_DIR")
    if from_env:
        return Path(from_env) / "archives"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "remote_exec" / "archives"


#: Seconds an unchanged build is trusted before its files are checked again (an edit shows within this).
RECHECK_SECONDS = 0.5
_DAY = 86400.0


def _cache_files(base: Path) -> list[tuple[Path, float, int, str]]:
    """(path, last use, size, kind) of the local caches: archives (last use: their access time, set when
    used), project stat caches (rewritten when used), temporaries."""
    found = []
    for folder, kind, pattern in ((base / "archives", "archive", "*.pyz"),
                                  (base / "projects", "stat cache", "*.idx"),
                                  (base / "archives", "temporary", ".*.tmp"),
                                  (base / "projects", "temporary", ".*.tmp")):
        for path in folder.glob(pattern):
            try:
                st = path.stat()
            except OSError:
                continue
            found.append((path, max(st.st_atime, st.st_mtime) if kind == "archive" else st.st_mtime, st.st_size, kind))
    return found


def _prune_plan(files: list[tuple[Path, float, int, str]], limit: int, days: float,
                now: float) -> list[tuple[Path, dict[str, Any]]]:
    """What to remove of ``files`` (oldest use first): the unused, then archives over the limit."""
    total = sum(size for _, _, size, kind in files if kind == "archive")
    plan = []
    for path, used, size, kind in sorted(files, key=lambda item: item[1]):
        old = now - used > (_DAY if kind == "temporary" else days * _DAY)
        over = kind == "archive" and total > limit and now - used > 3600
        if old or over:
            plan.append((path, {"kind": kind, "name": path.name, "bytes": size,
                                "reason": "unused" if old else "least recently used, over the cache limit"}))
            if kind == "archive":
                total -= size
    return plan


def prune_cache(limit: int, days: float, *, dry_run: bool = False, cache_dir: Path | None = None) -> dict[str, Any]:
    """Prune this machine's caches (under the archive cache's parent): archives and project stat caches
    unused for ``days``, temporaries older than a day, then the least recently used archives while they
    hold more than ``limit`` bytes. Under a lock: a second pruner does nothing. Returns a report.
    """
    import fcntl

    base = (cache_dir or default_cache_dir()).parent
    report: dict[str, Any] = {"cache": str(base), "busy": False, "removed": [], "freed_bytes": 0, "dry_run": dry_run}
    try:
        base.mkdir(parents=True, exist_ok=True)
        lock = os.open(base / "gc.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        return report
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return {**report, "busy": True}
        files = _cache_files(base)
        for path, entry in _prune_plan(files, limit, days, time.time()):
            report["removed"].append(entry)
            if not dry_run:
                path.unlink(missing_ok=True)
        report["freed_bytes"] = sum(entry["bytes"] for entry in report["removed"])
        report["kept_bytes"] = sum(size for _, _, size, _ in files) - report["freed_bytes"]
        if not dry_run:
            (base / "gc.stamp").touch()
        return report
    finally:
        os.close(lock)


def _prune_daily(cache_dir: Path) -> None:
    """Prune the local caches if the last time is a day old (when a new archive was just built)."""
    stamp = cache_dir.parent / "gc.stamp"
    try:
        if time.time() - stamp.stat().st_mtime < _DAY:
            return
    except FileNotFoundError:
        try:
            stamp.touch()
        except OSError:
            pass
        return
    except OSError:
        return
    from .config import Configuration

    config = Configuration()
    try:
        prune_cache(config.cache_limit, config.cache_days, cache_dir=cache_dir)
    except OSError:
        logger.debug("pruning %s failed", cache_dir, exc_info=True)


def _signature(files: Iterable[str]) -> tuple[tuple[int, int], ...]:
    signature = []
    for file in files:
        try:
            stat = os.stat(file)
        except OSError:
            signature.append((-1, -1))
        else:
            signature.append((stat.st_mtime_ns, stat.st_size))
    return tuple(signature)


@functools.lru_cache(maxsize=1)
def _base_paths() -> frozenset[Path]:
    return frozenset(source for _, source in _base_entries() if isinstance(source, Path))


@functools.lru_cache(maxsize=1)
def _base_entries_cached() -> tuple[tuple[str, Path | bytes], ...]:
    return tuple(_base_entries_uncached())


def _base_entries() -> list[tuple[str, Path | bytes]]:
    """The runner, the remote-side modules of remote_exec and cloudpickle (found once per process)."""
    return list(_base_entries_cached())


def _base_entries_uncached() -> list[tuple[str, Path | bytes]]:
    package = os.path.dirname(os.path.realpath(__file__))
    entries: list[tuple[str, Path | bytes]] = [("__main__.py", _MAIN)]
    # The whole library travels (but the CLI), so task modules may import its public API at the top;
    # only REMOTE_MODULES are imported by the runner itself.
    found: list[tuple[str, str]] = []
    for folder, dirs, files in os.walk(package):
        relative = os.path.relpath(folder, package).replace(os.sep, "/")
        dirs[:] = [name for name in dirs if name != "__pycache__" and not (relative == "." and name == "cli")]
        prefix = "remote_exec/" if relative == "." else f"remote_exec/{relative}/"
        found.extend((prefix + name, os.path.join(folder, name)) for name in files if name.endswith(".py"))
    entries.extend((arcname, Path(path)) for arcname, path in sorted(found))
    entries.append(("remote_exec/py.typed", b""))
    spec = importlib.util.find_spec("cloudpickle")  # where it is (importing it costs ~3 ms a plain run never needs)
    if spec is None or spec.origin is None:  # pragma: no cover - a dependency
        raise PackError("cloudpickle is not installed", hint="pip install cloudpickle")
    cp_dir = Path(spec.origin).resolve().parent
    for path in sorted(cp_dir.glob("*.py")):
        entries.append((f"cloudpickle/{path.name}", path))
    return entries




# Builds the bundle in a fresh interpreter: marshal's output depends on the reference counts of the process
# that writes it, so only a fresh, isolated one (fixed hash seed, no site) writes the same bytes every time,
# and the archive stays the same for the same sources, whoever builds it. It runs the archive's own
# remote_exec/runner/bundle.py (sent first), so the bundle is laid out by the code that reads it.
_BUNDLER = """
import marshal,sys
r=sys.stdin.buffer
exec(compile(r.read(int.from_bytes(r.read(8),'big')),'remote_exec/runner/bundle.py','exec',dont_inherit=True))
codes={}
while True:
    n=r.read(4)
    if not n:break
    name=r.read(int.from_bytes(n,'big')).decode();source=r.read(int.from_bytes(r.read(8),'big'))
    dotted,_,stem=name[:-3].replace('/','.').rpartition('.')
    codes[dotted if stem=='__init__' else dotted+'.'+stem]=(stem=='__init__',name,
        marshal.dumps(compile(source,name,'exec',dont_inherit=True)))
name=bundle_name().encode()
sys.stdout.buffer.write(len(name).to_bytes(4,'big')+name+pack(codes))
"""


def _bundle(contents: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The runner's code bundle for a remote Python of this version (:mod:`remote_exec.runner.bundle`): its
    modules' compiled code in one file, which the bootstrap serves them from.

    A host's first call would otherwise compile them (tens of milliseconds), or extract a ``.pyc`` file
    each and look each up through ``sys.path``. An interpreter of this version takes the bundle as it is
    (its name carries this interpreter's cache tag and magic number); any other passes it over, compiles
    the sources, and its runner writes a bundle of its own. It is derived from the sources, so the
    archive's content key (and the cached .pyz) does not depend on it. Without a usable interpreter to
    compile in, there is none.
    """
    import subprocess

    wanted = {f"remote_exec/{name}.py" for name in REMOTE_MODULES}
    sources = dict(contents)
    request = b"".join([len(sources["remote_exec/runner/bundle.py"]).to_bytes(8, "big"),
                        sources["remote_exec/runner/bundle.py"],
                        *(len(arcname).to_bytes(4, "big") + arcname.encode() + len(source).to_bytes(8, "big") + source
                          for arcname, source in contents if arcname in wanted)])
    try:
        done = subprocess.run([sys.executable, "-S", "-s", "-c", _BUNDLER], input=request, capture_output=True,
                              env={"PYTHONHASHSEED": "0"}, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("no code bundle in the archive: %s", exc)
        return []
    size = int.from_bytes(done.stdout[:4], "big")
    return [(done.stdout[4:4 + size].decode(), done.stdout[4 + size:])]


def _entries(entry_files: tuple[Path, ...], roots: tuple[Path, ...], extra_modules: tuple[str, ...]
             ) -> tuple[list[tuple[str, Path | bytes]], tuple[str, ...]]:
    """The archive's entries (rx's own files, then the user's modules) and the user modules' names."""
    entries = list(_base_entries())
    by_name = {module.name: module for module in discover_modules(entry_files, roots)}
    for name in extra_modules:
        # A project module under the roots first (the cwd of `rx run -m` need not be on sys.path).
        module = _find_top_level(name, [root.resolve() for root in roots]) or _import_path(name)
        by_name.setdefault(module.name, module)
    seen = {arcname for arcname, _ in entries}
    for module in sorted(by_name.values(), key=lambda m: m.name):
        for arcname, path in _package_files(module):
            if arcname not in seen:
                seen.add(arcname)
                entries.append((arcname, path))
    return entries, tuple(sorted(by_name))


def _entry_points(task: Task, cwd: str) -> tuple[list[Path], list[Path]]:
    """The files whose imports define the code to ship, and the roots project modules live under."""
    here = Path(cwd)
    if task.kind == "script" and task.filename:
        script = (here / task.filename).resolve()
        return [script], [script.parent, here]
    if task.kind == "module":
        return ([Path(task.filename)] if task.filename else []), [here]
    module_name = task.module or "__main__"
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return [], [here]
    path = Path(file).resolve()
    if module_name == "__main__":
        return [path], [path.parent, here]
    root = path.parent
    for _ in range(module_name.count(".") + (1 if path.name == "__init__.py" else 0)):
        root = root.parent
    return [path], [root, here]


def _sources(entries: list[tuple[str, Path | bytes]]) -> tuple[tuple[str, str], ...]:
    """(top-level name in the archive, its local file or package folder) of each user module shipped."""
    base = _base_paths()
    found: dict[str, str] = {}
    for arcname, source in entries:
        if isinstance(source, Path) and source not in base:
            parts = arcname.split("/")
            top = source
            for _ in parts[1:]:
                top = top.parent
            found.setdefault(parts[0], str(top))
    return tuple(sorted(found.items()))


class Packer:
    """Builds distribution archives and remembers what it built, so that a sweep's calls of unchanged code
    cost a dictionary lookup (and, at most every :data:`RECHECK_SECONDS`, a few ``stat`` calls).

    One per coordinator; thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Archives by cache dir and the (name, source, mtime, size) of every entry.
        self._archives: dict[tuple[str, tuple[tuple[str, str, int, int], ...]], DistributionArchive] = {}
        #: The last build per request, with the signature of the files it read.
        self._builds: dict[tuple[Any, ...],
                           tuple[DistributionArchive, tuple[tuple[int, int], ...], tuple[str, ...], str]] = {}
        self._checked: dict[tuple[Any, ...], float] = {}
        self._entries: dict[tuple[str, str | None, str | None, str], tuple[list[Path], list[Path]]] = {}
        self._touched: dict[Path, float] = {}

    def archive_for(self, task: Task, distribution_modules: Iterable[str] = (),
                    cwd: str | None = None) -> DistributionArchive:
        """The archive carrying ``task``'s code and ``distribution_modules`` (built once per content);
        ``cwd``: the current directory (default: this process's)."""
        cwd = cwd or os.getcwd()
        where = (task.kind, task.module, task.filename, cwd)
        entry = self._entries.get(where)
        if entry is None:
            entry = self._entries[where] = _entry_points(task, cwd)
        files, roots = entry
        extra = list(distribution_modules)
        if task.kind == "module" and task.module:
            extra.append(task.module)
        elif task.kind == "function" and task.module and task.module != "__main__":
            extra.append(task.module.split(".")[0])
        return self.build(entry_files=files, roots=roots, extra_modules=extra)

    def build(self, *, entry_files: Iterable[Path] = (), roots: Iterable[Path] = (),
              extra_modules: Iterable[str] = (), cache_dir: Path | None = None) -> DistributionArchive:
        """Build (or reuse) the archive for code that starts in ``entry_files``.

        A build is reused while the files it read are unchanged (size and modification time, checked at
        most every :data:`RECHECK_SECONDS`, so a sweep's calls do not stat them each time).

        Args:
            entry_files: The task's script or module file(s); their project imports are found.
            roots: Where project modules live (the script's folder, source roots).
            extra_modules: Modules or packages to ship in any case.
            cache_dir: Local archive cache (default: the user cache dir of remote_exec).

        Raises:
            PackError: A listed module cannot be shipped, or the cache is not writable.
        """
        entry_files = tuple(entry_files)
        roots = tuple(roots)
        extra_modules = tuple(extra_modules)
        environ = os.environ
        where = (str(cache_dir) if cache_dir is not None
                 else (environ.get("RX_CACHE_DIR"), environ.get("XDG_CACHE_HOME"), environ.get("HOME")))
        memo_key = (tuple(map(str, entry_files)), tuple(map(str, roots)), extra_modules, where)
        hit = self._unchanged(memo_key)
        if hit is not None:
            return self._used(hit)
        entry_files = tuple(Path(file) for file in entry_files)
        roots = tuple(Path(root) for root in roots)
        entries, modules = _entries(entry_files, roots, extra_modules)
        archive = self._cached_build(entries, modules, cache_dir or default_cache_dir())
        # Remember what this build read, so an unchanged call skips discovery (stat calls only).
        user_files = tuple(str(source) for _, source in entries if isinstance(source, Path)
                           and source not in _base_paths()) + tuple(map(str, entry_files))
        self._builds[memo_key] = (archive, _signature(user_files), user_files, str(archive.path))
        return self._used(archive)

    def _used(self, archive: DistributionArchive) -> DistributionArchive:
        """Record the archive's use in its file's access time (at most hourly; set explicitly, whatever the
        file system's atime policy): the cache's pruning goes by it."""
        now = time.monotonic()
        if now - self._touched.get(archive.path, -3600.0) >= 3600:
            self._touched[archive.path] = now
            try:
                os.utime(archive.path, ns=(time.time_ns(), archive.path.stat().st_mtime_ns))
            except OSError:
                pass
        return archive

    def _unchanged(self, memo_key: tuple[Any, ...]) -> DistributionArchive | None:
        """The archive of an earlier build of the same request, if the files it read are unchanged."""
        hit = self._builds.get(memo_key)
        if hit is None:
            return None
        now = time.monotonic()
        if now - self._checked.get(memo_key, 0.0) < RECHECK_SECONDS:
            return hit[0]  # checked a moment ago: a sweep's call does not stat the files again
        if hit[1] == _signature(hit[2]) and os.path.isfile(hit[3]):
            self._checked[memo_key] = now
            return hit[0]  # unchanged code: a few stat calls, no discovery
        return None

    def _cached_build(self, entries: list[tuple[str, Path | bytes]], modules: tuple[str, ...],
                      cache_dir: Path) -> DistributionArchive:
        stat_key = tuple((arcname, str(source), *_mtime_size(source)) for arcname, source in entries)
        with self._lock:
            hit = self._archives.get((str(cache_dir), stat_key))
            if hit is not None and hit.path.is_file():
                return hit
        memo = _BuildMemo(cache_dir, stat_key)
        built = memo.lookup()
        if built is None:
            built = _write_archive(entries, modules, cache_dir)
            memo.store(*built)
        path, sha256, size = built
        archive_obj = DistributionArchive(path=path, sha256=sha256, size=size, modules=modules,
                                          sources=_sources(entries))
        with self._lock:
            self._archives[(str(cache_dir), stat_key)] = archive_obj
        return archive_obj


def _write_archive(entries: list[tuple[str, Path | bytes]], modules: tuple[str, ...],
                   cache_dir: Path) -> tuple[Path, str, int]:
    """The archive of ``entries`` in ``cache_dir`` (written unless it is there): its path, sha256 and size."""
    contents = [(arcname, source.read_bytes() if isinstance(source, Path) else source)
                for arcname, source in entries]
    contents.sort(key=lambda item: item[0])
    key = hashlib.sha256()
    for arcname, data in contents:
        key.update(arcname.encode() + b"\0" + hashlib.sha256(data).digest())
    key.update(b"bundle+lazy\0" + sys.implementation.cache_tag.encode() + importlib.util.MAGIC_NUMBER)
    content_key = key.hexdigest()
    target = cache_dir / f"{content_key}.pyz"
    if not target.is_file():
        data = _zip(*_split_lazy(contents + _bundle(contents)))
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            temporary = cache_dir / f".{content_key}.{os.getpid()}.{threading.get_ident()}.tmp"
            temporary.write_bytes(data)
            os.replace(temporary, target)
        except OSError as exc:
            raise PackError(f"cannot write the archive cache {cache_dir}: {exc}") from exc
        logger.debug("built archive %s (%d bytes, modules: %s)", target.name, len(data), ", ".join(modules))
        _prune_daily(cache_dir)
    data = target.read_bytes()
    return target, hashlib.sha256(data).hexdigest(), len(data)


def _zip(contents: list[tuple[str, bytes]], stored: frozenset[str] = frozenset()) -> bytes:
    """A zip of ``contents`` in name order, the same bytes for the same contents (fixed timestamps and
    modes): each entry deflated, but those named in ``stored`` (already compressed) kept as they are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for arcname, data in sorted(contents, key=lambda item: item[0]):
            info = zipfile.ZipInfo(arcname, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_STORED if arcname in stored else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _split_lazy(contents: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], frozenset[str]]:
    """``contents`` with the modules of remote_exec that only a coordinator uses moved into one stored
    entry, :data:`remote_exec.lazy.NAME`, which a host unpacks only when one of them is imported there
    (:mod:`remote_exec.lazy`): its first call extracts half the bytes and a third of the files. Returns the
    entries and the names to store uncompressed."""
    from .lazy import NAME

    remote = {f"remote_exec/{name}.py" for name in REMOTE_MODULES}
    lazy = [(arcname, data) for arcname, data in contents
            if arcname.startswith("remote_exec/") and arcname.endswith(".py") and arcname not in remote]
    if not lazy:
        return contents, frozenset()
    names = {arcname for arcname, _ in lazy}
    return [*(item for item in contents if item[0] not in names), (NAME, _zip(lazy))], frozenset({NAME})


def _mtime_size(source: Path | bytes) -> tuple[int, int]:
    if isinstance(source, bytes):
        return 0, len(source)
    stat = source.stat()
    return stat.st_mtime_ns, stat.st_size


class _BuildMemo:
    """What an earlier process built from the very same files (paths, modification times and sizes, for
    this interpreter's bytecode): the archive's name, sha256 and size, kept in ``.memo.json`` of the cache
    directory. A process's first build then reads none of the ~120 files and hashes nothing (~4 ms of every
    ``rx run`` and of a process's first ``@task`` call). The archive's bytes are checked against the sha256
    when they are read to be sent (:meth:`DistributionArchive.read`)."""

    LIMIT = 64  # entries kept, the most recent

    def __init__(self, cache_dir: Path, stat_key: tuple[tuple[Any, ...], ...]) -> None:
        self.path = cache_dir / ".memo.json"
        digest = hashlib.sha256(repr((stat_key, sys.implementation.cache_tag, importlib.util.MAGIC_NUMBER)).encode())
        self.key = digest.hexdigest()

    def _entries(self) -> dict[str, list[Any]]:
        import json

        try:
            found = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def lookup(self) -> tuple[Path, str, int] | None:
        """``(archive file, sha256, size)`` when an earlier build of these files is in the cache, else None."""
        entry = self._entries().get(self.key)
        try:
            content_key, sha256, size = entry[:3]  # type: ignore[index]
            target = self.path.parent / f"{content_key}.pyz"
            if target.stat().st_size == size and len(sha256) == 64:
                return target, str(sha256), int(size)
        except (TypeError, ValueError, OSError):
            pass
        return None

    def store(self, path: Path, sha256: str, size: int) -> None:
        """Remember a build (a lost race with another process loses an entry, nothing else)."""
        import json

        entries = self._entries()
        entries.pop(self.key, None)
        entries[self.key] = [path.stem, sha256, size]
        kept = dict(list(entries.items())[-self.LIMIT:])
        temporary = self.path.parent / f".memo.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            temporary.write_text(json.dumps(kept))
            os.replace(temporary, self.path)
        except OSError:
            logger.debug("cannot write %s", self.path, exc_info=True)
            temporary.unlink(missing_ok=True)
