"""Resolution on the coordinator: a task's declared dependencies (:class:`EnvSpec`) locked for the host's
interpreter and platform (``uv pip compile --python-version --python-platform --generate-hashes``, cached
by a hash of the spec and the target), the environment's key, the wheels of an offline host (``pip
download --only-binary=:all: --platform ... --python-version ...``, cached per lock) and the uv binary
shipped to a host without one."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, EnvError
from ..sync.tree import Tree, TreeFile

__all__ = ["EnvSpec", "HostTarget", "binary_from_wheel", "env_key", "lock_for", "project_requirements",
           "uv_binary", "uv_for_host", "uv_lock_pins", "wheel_tree"]


@dataclass(frozen=True)
class EnvSpec:
    """What a task declares it needs on its host.

    Attributes:
        deps: Requirement strings (``numpy>=2``).
        requirements: Requirements files (their lines are read at resolution).
        index_url: The index to resolve from (None: uv's default, PyPI).
        find_links: Local wheel directories (or URLs) resolved from too.
        offline: Ship the wheels; the host installs with no index (also when the probe finds none).
        inherit_site: The environment sees the host interpreter's own site-packages.
    """

    deps: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    index_url: str | None = None
    find_links: tuple[str, ...] = ()
    offline: bool = False
    inherit_site: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any], settings: Mapping[str, Any],
                     base: Path | None = None) -> EnvSpec | None:
        """The spec of a call: its task's or command line's ``options`` (``deps``, ``requirements``,
        ``offline``, ``inherit_site``, ``find_links``) over the configuration's ``settings`` (the same keys of
        ``[tool.rx]``, paths relative to ``base``); None when nothing is declared.

        Raises:
            UsageError: ``deps`` is not a list of strings.
        """
        deps = _strings(options.get("deps"), "deps=") or _strings(settings.get("deps"), "[tool.rx] deps")
        files = _strings(options.get("requirements"), "requirements=") \
            or _strings(settings.get("requirements"), "[tool.rx] requirements")
        if not deps and not files:
            return None
        root = base or Path.cwd()
        links = _strings(options.get("find_links"), "find_links=") or _strings(settings.get("find_links"),
                                                                               "[tool.rx] find_links")
        return cls(
            deps=tuple(deps), requirements=tuple(str((root / item).resolve()) for item in files),
            index_url=options.get("index_url") or settings.get("index_url"),
            find_links=tuple(item if "://" in item else str((root / item).resolve()) for item in links),
            offline=bool(options.get("offline") or settings.get("offline")),
            inherit_site=bool(options.get("inherit_site") or settings.get("inherit_site")))

    def source_text(self) -> str:
        """The requirements as uv reads them: the deps, then every requirements file's lines."""
        lines = list(self.deps)
        for name in self.requirements:
            try:
                lines.append(Path(name).read_text())
            except OSError as exc:
                raise ConfigError(f"requirements file {name}: {exc.strerror or exc}") from exc
        return "\n".join(lines) + "\n"


def project_requirements(root: Path) -> dict[str, Any]:
    """The project's own dependencies as options: the pins of its ``uv.lock`` (still resolved for the host
    afterwards, so a pin the host's Python cannot have fails there by name), else ``[project]
    dependencies`` of its pyproject.toml, else its ``requirements.txt``; empty when it has none of them
    (the host's interpreter as it is).

    Raises:
        EnvError: The project has a uv.lock that uv cannot export (out of date, damaged).
    """
    pins = uv_lock_pins(root) if (root / "uv.lock").is_file() else []
    if pins:
        return {"deps": pins}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

    try:
        table = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        table = {}
    deps = (table.get("project") or {}).get("dependencies") if isinstance(table.get("project"), dict) else None
    if isinstance(deps, list) and deps and all(isinstance(item, str) for item in deps):
        return {"deps": list(deps)}
    if (root / "requirements.txt").is_file():
        return {"requirements": [str(root / "requirements.txt")]}
    return {}


def uv_lock_pins(root: Path) -> list[str]:
    """The third-party pins of the project's ``uv.lock`` as requirement strings with their markers
    (``uv export --frozen``: the lock as it is, without the project itself, its workspace members or its
    dev group; no hashes, the host's lock makes its own).

    Raises:
        EnvError: uv could not export the lock.
    """
    argv = [uv_binary(), "export", "--format", "requirements-txt", "--frozen", "--no-emit-project",
            "--no-emit-workspace", "--no-dev", "--no-hashes", "--no-header", "--no-annotate", "--offline",
            "--directory", str(root)]
    done = subprocess.run(argv, capture_output=True, env=_uv_env(), check=False)
    if done.returncode:
        raise EnvError(f"reading the pins of {root / 'uv.lock'} failed: {_lines(done.stderr)}",
                       hint="run `uv lock` in the project, or declare the dependencies with --deps")
    lines = (line.strip() for line in done.stdout.decode("utf-8", "replace").splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def _strings(value: Any, label: str) -> list[str]:
    from ..errors import UsageError

    if value is None or value == [] or value == ():
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise UsageError(f"{label} must be a list of requirement strings, not {value!r}")
    return list(value)


@dataclass(frozen=True)
class HostTarget:
    """The interpreter and platform a lock is made for (from the host's probe).

    Attributes:
        implementation: ``cpython``.
        python: ``3.11.2``.
        machine: ``x86_64``, ``aarch64``.
        libc: ``glibc`` or ``musl``.
        libc_version: ``2.36``.
        soabi: ``cpython-311-x86_64-linux-gnu``.
        executable: The host interpreter the environment is made from.
    """

    implementation: str
    python: str
    machine: str
    libc: str
    libc_version: str
    soabi: str = ""
    executable: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_probe(cls, probe: Mapping[str, Any]) -> HostTarget:
        return cls(implementation=str(probe.get("implementation", "cpython")), python=str(probe["python"]),
                   machine=str(probe.get("machine") or "x86_64"), libc=str(probe.get("libc") or "glibc"),
                   libc_version=str(probe.get("libc_version") or ""), soabi=str(probe.get("soabi") or ""),
                   executable=str(probe.get("executable") or ""), extra=dict(probe))

    @property
    def minor(self) -> str:
        """``3.11``."""
        return ".".join(self.python.split(".")[:2])

    @property
    def uv_platform(self) -> str:
        """uv's ``--python-platform`` (``x86_64-manylinux_2_36``, ``x86_64-unknown-linux-musl``)."""
        if self.libc == "musl":
            return f"{self.machine}-unknown-linux-musl"
        major, _, minor = (self.libc_version or "2.17").partition(".")
        number = min(max(int(minor or 17) if major == "2" else 17, 17), 40)  # the range uv knows
        return f"{self.machine}-manylinux_2_{number}"

    @property
    def pip_platforms(self) -> list[str]:
        """pip download's ``--platform`` tags: every manylinux the host's glibc runs, newest first (pip
        does not add the older ones to a ``manylinux_2_X`` tag itself)."""
        if self.libc == "musl":
            return [f"musllinux_1_2_{self.machine}", f"musllinux_1_1_{self.machine}"]
        newest = int(self.uv_platform.rpartition("_")[2])
        tags = [f"manylinux_2_{minor}_{self.machine}" for minor in range(newest, 16, -1)]
        return [*tags, f"manylinux2014_{self.machine}", f"linux_{self.machine}"]

    def describe(self) -> str:
        """``cpython 3.11 x86_64-manylinux_2_36``."""
        return f"{self.implementation} {self.minor} {self.uv_platform}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _link_listing(links: Sequence[str]) -> str:
    """What the local wheel directories hold (a new wheel there is a new resolution)."""
    names = []
    for link in links:
        if "://" not in link and os.path.isdir(link):
            names.extend(sorted(os.listdir(link)))
    return "\n".join(names)


def uv_binary() -> str:
    """The coordinator's own uv (the ``uv`` dependency's binary, else one on PATH).

    Raises:
        EnvError: None is installed.
    """
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise EnvError("uv is not installed here (rx resolves dependencies with it)", hint="pip install uv")


def _uv_env() -> dict[str, str]:
    """uv's environment here: quiet, no Python downloads, no active virtualenv."""
    env = dict(os.environ, UV_NO_PROGRESS="1", NO_COLOR="1", UV_PYTHON_DOWNLOADS="never")
    env.pop("VIRTUAL_ENV", None)
    return env


def _index_args(spec: EnvSpec) -> list[str]:
    args: list[str] = []
    if spec.index_url:
        args += ["--index-url", spec.index_url]
    elif spec.find_links:
        args.append("--no-index")
    for link in spec.find_links:
        args += ["--find-links", link]
    return args


def lock_for(spec: EnvSpec, target: HostTarget, cache: Path, host: str) -> str:
    """The lock (``name==version`` with every ``--hash``) of ``spec`` for ``target``: cached by a hash of
    the spec and the target, else made by ``uv pip compile`` for the host's Python and platform.

    Raises:
        EnvError: uv could not resolve it (its lines name the package).
    """
    source = spec.source_text()
    key = _digest("rx-lock-1", source, target.describe(), spec.index_url or "", "\n".join(spec.find_links),
                  _link_listing(spec.find_links), str(spec.offline))
    path = cache / "locks" / f"{key}.txt"
    try:
        return path.read_text()
    except OSError:
        pass
    argv = [uv_binary(), "pip", "compile", "-", "--quiet", "--no-header", "--no-annotate", "--generate-hashes",
            "--python-version", target.minor, "--python-platform", target.uv_platform, *_index_args(spec)]
    if spec.offline:
        argv += ["--only-binary", ":all:"]
    if not spec.index_url and spec.find_links and not any("://" in link for link in spec.find_links):
        argv.append("--offline")  # local wheel folders only: uv asks the network nothing (it waits seconds)
    done = subprocess.run(argv, input=source.encode(), capture_output=True, env=_uv_env(), check=False)
    if done.returncode:
        said = done.stderr.decode("utf-8", "replace")
        missing = _NO_WHEEL.search(said)
        if missing:
            raise EnvError(f"{host}: no wheel of {missing.group(1).strip('`')} for {target.describe()}",
                           hint="pick a version that has one, or give the host an index (no --offline)")
        raise EnvError(f"{host}: resolving the dependencies for {target.describe()} failed: "
                       f"{_lines(done.stderr)}", hint="check the names and versions in --deps / requirements")
    lock = done.stdout.decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, lock.encode())
    return lock


def _lines(data: bytes, count: int = 4) -> str:
    text = data.decode("utf-8", "replace")
    lines = [line.strip(" \u00d7\u2570\u2500\u25b6\u2502").removeprefix("error: ") for line in text.splitlines()]
    return " / ".join(line for line in lines if line and not line.startswith("hint:"))[-600:] or "no reason given"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def env_key(lock: str, target: HostTarget, spec: EnvSpec) -> str:
    """sha256 over the normalized lock, the interpreter (implementation, version, ABI, executable) and the
    platform: the environment's name on the host."""
    lines = sorted(line.strip() for line in lock.replace("\\\n", " ").splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
    return _digest("rx-env-1", "\n".join(lines), target.implementation, target.python, target.soabi,
                   target.executable, target.uv_platform, str(spec.inherit_site))


_NO_WHEEL = re.compile(r"Because (\S+) has no (?:usable )?wheels")
_MISSING = re.compile(r"No matching distribution found for (\S+)")


def _wheels(lock: str, spec: EnvSpec, target: HostTarget, cache: Path, host: str) -> Path:
    """The wheels of ``lock`` for ``target`` (pip download, checked against the lock's hashes), cached per
    lock and target."""
    folder = cache / "wheels" / _digest("rx-wheels-1", lock, target.describe())
    if (folder / ".rx-complete").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        lock_file = Path(tmp) / "lock.txt"
        lock_file.write_text(lock)
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                "--only-binary=:all:", "--require-hashes", "-r", str(lock_file), "-d", str(Path(tmp) / "w"),
                "--python-version", target.minor, "--implementation", "cp", *_index_args(spec)]
        for platform in target.pip_platforms:
            argv += ["--platform", platform]
        done = subprocess.run(argv, capture_output=True, check=False)
        if done.returncode:
            missing = _MISSING.search(done.stderr.decode("utf-8", "replace"))
            if missing:
                raise EnvError(f"{host}: no wheel of {missing.group(1)} for {target.describe()}",
                               hint="pick a version that has one, or drop --offline on a host with an index")
            raise EnvError(f"{host}: downloading the wheels for {target.describe()} failed: {_lines(done.stderr)}")
        (Path(tmp) / "w" / ".rx-complete").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(Path(tmp) / "w", folder)
    return folder


def _file_entry(path: Path, name: str, mode: int = 0o100644) -> TreeFile:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return TreeFile(name, mode, path.stat().st_size, digest.digest(), source=str(path))


def wheel_tree(lock: str, spec: EnvSpec, target: HostTarget, cache: Path, host: str, *,
               uv: Path | None = None) -> Tree:
    """What an offline host needs shipped: the lock's wheels (``wheels/<file>``) and, for a host without
    uv, uv's binary (``uv``); as a tree, so only the blobs the host lacks travel."""
    entries: list[TreeFile] = []
    if spec.offline:
        folder = _wheels(lock, spec, target, cache, host)
        entries = [_file_entry(path, f"wheels/{path.name}") for path in sorted(folder.glob("*.whl"))]
    if uv is not None:
        entries.append(_file_entry(uv, "uv", 0o100755))
    return Tree(root=cache, entries=tuple(sorted(entries, key=lambda entry: entry.path)))


def uv_for_host(target: HostTarget, cache: Path, configured: str | None = None) -> Path:
    """The uv binary to ship to a host without one: ``configured`` (``RX_UV_BINARY``, ``[tool.rx]
    uv_binary``), else this machine's own (uv's manylinux binary) when the host is a glibc >= 2.17 Linux of
    the same machine, else the static musl binary of uv's wheel for the host's machine (``pip download``
    on the coordinator, its sha256 checked against the wheel's RECORD, cached under ``tools/``).

    Raises:
        EnvError: It could not be fetched.
    """
    if configured:
        return Path(configured).expanduser()
    if _local_uv_fits(target):
        return Path(uv_binary())
    version = _uv_version()
    binary = cache / "tools" / f"uv-{version}-{target.machine}-musl"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                "--only-binary=:all:", "--platform", f"musllinux_1_1_{target.machine}", "-d", tmp,
                f"uv=={version}"]
        done = subprocess.run(argv, capture_output=True, check=False)
        wheels = list(Path(tmp).glob("uv-*.whl"))
        if done.returncode or not wheels:
            raise EnvError(f"fetching uv {version} for {target.machine} failed: {_lines(done.stderr)}",
                           hint="install uv on the host, or set RX_UV_BINARY to a static uv binary")
        data = binary_from_wheel(wheels[0])
    binary.parent.mkdir(parents=True, exist_ok=True)
    _write(binary, data)
    binary.chmod(0o755)
    return binary


def _local_uv_fits(target: HostTarget) -> bool:
    """Whether this machine's uv (a glibc Linux binary: uv's manylinux wheel) runs on ``target``."""
    import platform

    try:
        local_libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        local_libc = ""
    major, _, minor = target.libc_version.partition(".")
    return (sys.platform == "linux" and local_libc.startswith("glibc") and platform.machine() == target.machine
            and target.libc == "glibc" and major == "2" and minor.isdigit() and int(minor) >= 17)


def _uv_version() -> str:
    done = subprocess.run([uv_binary(), "--version"], capture_output=True, check=False)
    words = done.stdout.decode().split()
    return words[1] if len(words) > 1 else "0"


def binary_from_wheel(wheel: Path) -> bytes:
    """uv's binary out of its wheel, checked against the sha256 the wheel's RECORD gives it."""
    import base64
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith("/scripts/uv")]
        record = next(name for name in archive.namelist() if name.endswith(".dist-info/RECORD"))
        if not names:
            raise EnvError(f"{wheel.name} holds no uv binary")
        data = archive.read(names[0])
        for line in archive.read(record).decode().splitlines():
            path, _, rest = line.partition(",")
            if path == names[0]:
                expected = rest.split(",")[0].removeprefix("sha256=")
                actual = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                if actual != expected:
                    raise EnvError(f"{wheel.name}: the uv binary does not match its sha256 in RECORD")
                return data
    raise EnvError(f"{wheel.name}: the uv binary is not in its RECORD")
