"""The host's environments (standard library only): ``envprobe`` says what the host is (interpreter, ABI,
platform, glibc, free disk, uv, whether an index answers); ``env`` makes sure ``envs/<key>/`` exists.

An environment is built once per key (the coordinator's sha256 over the lock, the interpreter and the
platform): in ``envs/.tmp-<key>-<pid>``, by ``uv venv`` and ``uv pip sync --require-hashes`` (offline from
the shipped wheels, whose blobs come through the project store's missing-blob exchange, or online from the
configured index), then renamed to ``envs/<key>`` with ``.rx-complete`` written last: a build killed
midway leaves a temporary directory no later run looks at (the garbage collector removes it). Builders of
one key take ``envs/<key>.lock`` with ``O_EXCL`` (it names the owner's host and pid; works on NFS homes);
one whose owner is dead on this host, or older than an hour elsewhere, is taken over.

The ``env`` exchange: G ``{"key"}`` -> P ``{"event": "env", "state": "ready", "python"}`` when it exists;
else (the lock taken) P ``{"state": "build", "uv"}`` -> G ``{"lock", "tree", "uv", "offline",
"index_url", "inherit_site"}`` (the tree's blobs fetched as a project's: T, M, N, D) -> P ``{"state":
"ready", "python", "built": true, "seconds"}``. With ``"check"`` in the first G (``rx env``), an absent
environment is only reported (``"state": "absent"``), a present one with its size.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from ..protocol import wire
from .channel import Out

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    from typing import Any

__all__ = ["host_uv", "probe_env", "serve_env", "serve_env_probe"]

#: uv older than this is not used (``uv pip sync --require-hashes --offline``, ``uv venv --relocatable``).
MIN_UV = (0, 4, 0)
#: A lock file whose owner is on another host is stale after this many seconds.
STALE_ELSEWHERE = 3600.0
COMPLETE = ".rx-complete"


def host_uv(cache_dir: str) -> tuple[str, str]:
    """The host's own uv when recent enough: (path, version), else ("", version or "")."""
    path = shutil.which("uv") or ""
    if not path:
        return "", ""
    try:
        text = subprocess.run([path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=10, check=False).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return "", ""
    version = text.split()[1] if len(text.split()) > 1 else ""
    try:
        parts = tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        return "", version
    return (path if parts >= MIN_UV else ""), version


def _index_reachable(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.5).close()
    except (OSError, ValueError):
        return False
    return True


def probe_env(cache_dir: str, index: str = "") -> dict[str, Any]:
    """What the coordinator resolves for: the interpreter (implementation, version, ABI), the machine, the
    C library, free disk under the workdir, the host's uv, and whether ``index`` (host:port) answers."""
    import platform
    import sysconfig

    libc, libc_version = "", ""
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION") or ""
        libc, _, libc_version = found.partition(" ")
    except (ValueError, OSError, AttributeError):
        pass
    if not libc:
        libc = "musl" if any(name.startswith("ld-musl") for name in _lib_names()) else ""
    os.makedirs(cache_dir, exist_ok=True)
    disk = os.statvfs(cache_dir)
    uv_path, uv_version = host_uv(cache_dir)
    return {
        "event": "envprobe", "implementation": sys.implementation.name,
        "python": ".".join(str(part) for part in sys.version_info[:3]),
        "soabi": sysconfig.get_config_var("SOABI") or "",
        "executable": sys.executable, "machine": platform.machine(), "system": platform.system().lower(),
        "libc": libc.lower(), "libc_version": libc_version, "free": disk.f_bavail * disk.f_frsize,
        "uv": uv_path, "uv_version": uv_version, "index": _index_reachable(index) if index else None,
        "workdir": cache_dir,
    }


def _lib_names() -> list[str]:
    try:
        return os.listdir("/lib")
    except OSError:
        return []


def serve_env_probe(cache_dir: str, args: list[str], out: Out) -> int:
    """``envprobe [HOST:PORT]``: one P event with :func:`probe_env`'s answer."""
    out.event(probe_env(cache_dir, args[0] if args else ""))
    return 0


def _owner_alive(text: str) -> bool:
    """Whether the builder named by a lock file (``host pid started``) may still be at it."""
    import socket

    parts = text.split()
    if len(parts) < 3:
        return False
    host, pid, started = parts[0], parts[1], parts[2]
    if host != socket.gethostname():
        try:
            return time.time() - float(started) < STALE_ELSEWHERE
        except ValueError:
            return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _take_lock(lock: str, done: str, inbox: Any) -> bool:
    """Hold ``lock`` (True), or wait while another builder holds it until ``done`` appears (False)."""
    import socket

    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if os.path.exists(done):
                return False
            try:
                with open(lock) as stream:
                    owner = stream.read()
            except OSError:
                continue
            if not _owner_alive(owner):
                _take_over(lock, owner)
                continue
            inbox.alive()
            time.sleep(0.2)
            continue
        os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():f}\n".encode())
        os.close(fd)
        if os.path.exists(done):  # built while we looked
            os.unlink(lock)
            return False
        return True


def _take_over(lock: str, owner: str) -> None:
    """Remove the stale ``lock`` of a dead ``owner``; a lock another taker made meanwhile is put back."""
    stale = f"{lock}.stale-{os.getpid()}"
    try:
        os.rename(lock, stale)
    except OSError:
        return
    try:
        with open(stale) as stream:
            if stream.read() != owner:  # not the dead one's: a live builder's, taken by mistake
                os.link(stale, lock)
    except OSError:
        pass
    finally:
        try:
            os.unlink(stale)
        except OSError:
            pass


def _ready(out: Out, path: str, **extra: Any) -> None:
    os.utime(os.path.join(path, COMPLETE))  # its mtime: the environment's last use (the collector's LRU)
    python = os.path.join(path, "bin", "python")
    out.event({"event": "env", "state": "ready", "python": python, "path": path, **extra})


def serve_env(cache_dir: str, out: Out) -> int:
    """The ``env`` exchange (see the module docstring)."""
    from .store import first_options

    inbox, options = first_options(out.send)
    key = str(options["key"])
    if not key.isalnum():
        raise RuntimeError(f"protocol: a bad environment key {key!r}")
    envs = os.path.join(cache_dir, "envs")
    path = os.path.join(envs, key)
    if os.path.exists(os.path.join(path, COMPLETE)):
        if options.get("check"):
            from .gc import size_of

            _ready(out, path, built=False, bytes=size_of(path))
        else:
            _ready(out, path, built=False)
        return 0
    if options.get("check"):  # rx env: only say whether it is there
        out.event({"event": "env", "state": "absent", "path": path})
        return 0
    os.makedirs(envs, mode=0o700, exist_ok=True)
    lock = path + ".lock"
    if not _take_lock(lock, os.path.join(path, COMPLETE), inbox):
        _ready(out, path, built=False)
        return 0
    try:
        uv_path, uv_version = host_uv(cache_dir)
        out.event({"event": "env", "state": "build", "uv": uv_path, "uv_version": uv_version})
        kind, payload = inbox.next()
        if kind != b"G":
            raise RuntimeError(f"protocol: {kind!r} frame instead of the build's G frame")
        build = wire.load_options(payload)
        started = time.monotonic()
        _build(cache_dir, path, build, uv_path, inbox)
        _ready(out, path, built=True, seconds=time.monotonic() - started)
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
    return 0


def _shipped_uv(cache_dir: str, entries: list[tuple[str, int, int, bytes, str]]) -> str:
    """The uv binary the coordinator shipped in the tree, made executable under ``tools/``."""
    from .store import blob_path

    for name, _mode, _size, digest, _link in entries:
        if name == "uv":
            tools = os.path.join(cache_dir, "tools")
            os.makedirs(tools, mode=0o700, exist_ok=True)
            target = os.path.join(tools, "uv-" + digest.hex()[:16])
            if not os.path.exists(target):
                tmp = f"{target}.tmp-{os.getpid()}"
                shutil.copyfile(blob_path(cache_dir, digest), tmp)
                os.chmod(tmp, 0o755)
                os.rename(tmp, target)
            return target
    return ""


def _build(cache_dir: str, path: str, build: dict[str, Any], uv_path: str, inbox: Any) -> None:
    """Build the environment in a temporary directory and rename it to ``path``."""
    from .store import StoreError, blob_path, ensure_tree, forget_tree

    entries: list[tuple[str, int, int, bytes, str]] = []
    if build.get("tree"):
        tree_id = str(build["tree"])
        entries = list(ensure_tree(cache_dir, tree_id, inbox))
        if not _blobs_present(cache_dir, entries):  # removed behind rx's back: have them sent again
            forget_tree(cache_dir, tree_id)
            entries = list(ensure_tree(cache_dir, tree_id, inbox, refetch=True))
    uv = _shipped_uv(cache_dir, entries) or uv_path
    if not uv:
        raise StoreError("no uv on this host and none was shipped")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ, UV_CACHE_DIR=os.path.join(cache_dir, "uv-cache"), UV_NO_PROGRESS="1",
               VIRTUAL_ENV="", UV_PYTHON_DOWNLOADS="never")
    wheels = [(name[len("wheels/"):], blob_path(cache_dir, digest)) for name, _mode, _size, digest, _link in entries
              if name.startswith("wheels/")]
    try:
        _install(uv, tmp, build, wheels, env, inbox)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing (a killed one: the collector)
        raise
    with open(os.path.join(tmp, COMPLETE), "w") as stream:
        stream.write(wire.json_text({"key": os.path.basename(path), "built": time.time()}) + "\n")
    os.rename(tmp, path)


def _blobs_present(cache_dir: str, entries: list[tuple[str, int, int, bytes, str]]) -> bool:
    """Whether every blob of the wheel tree is stored here at its size (a few dozen stats)."""
    from .store import blob_path

    for _name, _mode, size, digest, link in entries:
        if link:  # a symlink: no blob
            continue
        try:
            if os.stat(blob_path(cache_dir, digest)).st_size != size:
                return False
        except OSError:
            return False
    return True


def _install(uv: str, tmp: str, build: dict[str, Any], wheels: list[tuple[str, str]], env: dict[str, str],
             inbox: Any) -> None:
    """``uv venv`` in ``tmp``, then ``uv pip sync`` of the lock into it (offline: from ``wheels``, each a
    file name and the blob holding it)."""
    venv = [uv, "venv", "--quiet", "--relocatable", "--python", sys.executable, tmp]
    if build.get("inherit_site"):
        venv.insert(3, "--system-site-packages")
    _run(venv, env, inbox)
    lock_file = os.path.join(tmp, ".rx-lock.txt")
    with open(lock_file, "w") as stream:
        stream.write(str(build["lock"]))
    sync = [uv, "pip", "sync", "--quiet", "--require-hashes", "--python", os.path.join(tmp, "bin", "python")]
    if build.get("offline"):
        folder = os.path.join(tmp, ".rx-wheels")
        os.mkdir(folder)
        for name, blob in wheels:
            os.symlink(blob, os.path.join(folder, name))
        sync += ["--offline", "--no-index", "--find-links", folder]
    elif build.get("index_url"):
        sync += ["--index-url", str(build["index_url"])]
    for link in build.get("find_links") or ():
        if not build.get("offline"):
            sync += ["--find-links", str(link)]
    _run([*sync, lock_file], env, inbox)
    shutil.rmtree(os.path.join(tmp, ".rx-wheels"), ignore_errors=True)


def _run(argv: list[str], env: dict[str, str], inbox: Any) -> None:
    """Run uv, heartbeats going out meanwhile; its last lines of stderr name what failed."""
    import tempfile

    from .store import StoreError

    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
        while True:
            try:
                code = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                inbox.alive()
        if code:
            err.seek(0)
            lines = [line for line in err.read().decode("utf-8", "replace").splitlines() if line.strip()]
            said = " / ".join(line.strip() for line in lines[-3:])
            raise StoreError(f"building the environment failed: {' '.join(argv[:3])}: {said}")
