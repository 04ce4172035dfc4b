"""Configuration: advice chains, extensions, remotes, and defaults, from code or ``[tool.rx]``.

A :class:`Configuration` is built in code or loaded from the ``[tool.rx]`` table of the nearest
``pyproject.toml`` (searched from the current directory upwards)::

    [tool.rx]
    backend = "openssh"                      # or "paramiko"; RX_BACKEND overrides
    serializer = "pickle"                    # or "json"
    distribution_modules = ["mypkg"]         # shipped in the archive besides what is found
    chains.cached = ["remote_exec.advices.cache:CachingAdvice", "remote_exec.advices.remote:RemoteAdvice"]
    log_cap = "100MiB"                       # the most a run's stdout.log and stderr.log keep (0: all)
    project = "."                            # the project root (default: found from the script); false: none
    include = ["data/"]                      # ignored paths that travel nevertheless (gitignore syntax)
    cache_limit = "10GiB"                    # the host's caches: least recently used go above this
    cache_days = 30                          # ... and anything unused this long
    pull_limit = "2GiB"                      # a run brings back at most this much (the rest stays, kept)

    [tool.rx.remotes.gpu1]
    host = "gpu1.lab.example.org"            # an ssh_config alias, a host name or [user@]host[:port]
    user = "me"
    python = "/opt/conda/bin/python"
    env = { CUDA_VISIBLE_DEVICES = "0" }

    [tool.rx.remotes.cluster]                # a Slurm cluster: each call an sbatch job
    host = "login1"
    scheduler = "slurm"
    slurm = { partition = "gpu", time = "1:00:00", gres = "gpu:1", extra = ["--constraint=a100"] }

Nothing is registered by importing modules named in environment variables: chains name their advice
classes explicitly, and environment variables only choose among options (``RX_BACKEND``,
``RX_SSH_CONFIG``, ``RX_WORKSPACE``). This module imports no advice: chains given as ``"module:Class"``
strings are loaded, and the built-in ones made, by :func:`remote_exec.chains.chain_for`.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, UsageError

if TYPE_CHECKING:
    from .advice import Advice, Extension
    from .backends.base import HostSpec

__all__ = [
    "DEFAULT_CHAINS",
    "Configuration",
    "Remote",
    "check_env",
    "check_pull",
    "check_remote_backend",
    "check_secret_env",
    "check_timeout",
    "find_pyproject",
    "parse_size",
]

#: The default ``[tool.rx] log_cap``: the most a run's stdout.log (or stderr.log) keeps.
DEFAULT_LOG_CAP = 100 << 20

DEFAULT_WORKDIR = "~/.cache/remote_exec"
# A bare letter is binary (as in ``ulimit`` and Slurm's ``--mem``), ``KB``/``MB`` decimal, ``KiB`` binary.
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from ``1048576``, ``"10GiB"``, ``"500 MB"``, ``"1.5k"`` (binary and decimal units).

    Raises:
        ConfigError: Not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number):]
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a size", hint="bytes, or a number with KiB, MiB, GiB, MB, GB") \
            from None
    if not 0 <= size < float(1 << 62):  # negative, NaN or infinite
        raise ConfigError(f"{what} {value!r} is not a size")
    return int(size)


_REMOTE_KEYS = {"host", "user", "port", "python", "workdir", "env", "backend", "keep_warm", "identity_file",
                "timeout", "restricted", "allow_unpickle", "scheduler", "slurm", "offline", "inherit_site"}


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# -- the checks of values a user gives: on the command line, in @task(...) and in [tool.rx] -----------------
# Each names what it checks as the user wrote it (``--timeout``, ``timeout=``, ``[tool.rx.remotes.gpu1] timeout``).


def check_timeout(value: Any, label: str = "--timeout") -> float | None:
    """``value`` as seconds (None: no limit).

    Raises:
        UsageError: Not a number, or not positive and finite (``nan`` or ``inf`` would silently mean no limit).
    """
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{label} {value!r}: expected a number of seconds") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"{label} {value!r}: expected a positive, finite number of seconds",
                         hint="leave it out for no limit")
    return seconds


def check_env(env: Mapping[str, Any], label: str = "--env") -> dict[str, str]:
    """``env`` checked: names a shell and ``os.environ`` accept, values strings without NUL.

    Raises:
        UsageError: A name such as ``A B`` or an empty one, a value that is no string or holds NUL.
    """
    checked: dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise UsageError(f"{label} {name!r}: not a valid variable name",
                             hint="letters, digits and _, not starting with a digit")
        if not isinstance(value, str) or "\0" in value:
            raise UsageError(f"{label} {name}: the value must be a string without NUL bytes")
        checked[name] = value
    return checked


def check_pull(globs: Iterable[Any], label: str = "--pull") -> tuple[str, ...]:
    """File globs to bring back, relative to the task's directory (``./`` and doubled ``/`` dropped).

    Raises:
        UsageError: An absolute glob, one that climbs out with ``..``, or one that can never match a file
            (empty, ending in ``/``, holding NUL).
    """
    checked = []
    for glob in globs:
        if not isinstance(glob, str):
            raise UsageError(f"{label} {glob!r}: expected a glob string")
        parts = [part for part in glob.split("/") if part not in ("", ".")]
        if glob.startswith(("/", "~")):
            raise UsageError(f"{label} {glob!r}: absolute globs never match",
                             hint="globs are relative to the task's working directory")
        if ".." in parts:
            raise UsageError(f"{label} {glob!r}: a glob cannot climb out of the task's directory with ..",
                             hint="only files under the task's working directory come back")
        if not parts or glob.endswith("/") or "\0" in glob:
            raise UsageError(f"{label} {glob!r}: this glob can never match a file",
                             hint="name files, e.g. 'out/*.csv'")
        checked.append("/".join(parts))
    return tuple(checked)




def check_secret_env(names: Iterable[str], label: str = "--secret-env") -> dict[str, str]:
    """The values of the named local environment variables (they travel over the channel only).

    Raises:
        UsageError: A name that is not set in the local environment.
    """
    values: dict[str, str] = {}
    for name in names:
        if name not in os.environ:
            raise UsageError(f"{label} {name}: no such variable in the local environment")
        values[name] = os.environ[name]
    return values


@dataclass(frozen=True)
class Remote:
    """A configured remote host.

    Attributes:
        name: The name tasks and ``rx run --remote`` use.
        host: ssh_config alias, host name, or ``[user@]host[:port]``.
        user: Login user (overrides ssh_config).
        port: SSH port (overrides ssh_config).
        python: The remote interpreter.
        workdir: Remote cache and run directory root (created 0700).
        env: Environment variables for the task.
        backend: ``openssh`` or ``paramiko``; None for the configuration's default.
        keep_warm: Keep a persistent worker on the host for many small calls.
        identity_file: Key file (overrides ssh_config).
        timeout: Default task timeout in seconds.
        restricted: Unpickle results from this host through an allow-list (a host you do not fully
            trust): plain data and built-in exceptions, plus ``allow_unpickle``.
        allow_unpickle: Modules or ``module.name`` globals restricted mode accepts besides those.
        scheduler: How the runner is started on the host: a launcher's name (``direct``, the default: one
            exec over the connection; ``slurm``: each call an sbatch job submitted through this login node).
        offline: The host reaches no index: a task's dependencies travel as wheels from here.
        inherit_site: A task's environment there sees the interpreter's own site-packages.
        slurm: The Slurm launcher's settings (``partition``, ``time``, ``gres``, ``mem``, ``account``,
            ``qos``, ``cpus_per_task``, ``extra`` sbatch words, ``signal``, ``requeue``, ``poll_interval``,
            ``poll_max``); giving them makes ``slurm`` the scheduler.
    """

    name: str
    host: str
    user: str | None = None
    port: int | None = None
    python: str = "python3"
    workdir: str = DEFAULT_WORKDIR
    env: Mapping[str, str] = field(default_factory=dict)
    backend: str | None = None
    keep_warm: bool = False
    identity_file: str | None = None
    timeout: float | None = None
    restricted: bool = False
    allow_unpickle: tuple[str, ...] = ()
    scheduler: str = "direct"
    slurm: Mapping[str, Any] = field(default_factory=dict)
    offline: bool = False
    inherit_site: bool = False

    @property
    def launcher_options(self) -> dict[str, Any]:
        """The settings of this remote's launcher (none for ``direct``)."""
        return dict(self.slurm) if self.scheduler == "slurm" else {}

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any]) -> Remote:
        """A remote from its ``[tool.rx.remotes.NAME]`` table.

        Raises:
            ConfigError: Unknown keys or values of the wrong type.
        """
        unknown = set(table) - _REMOTE_KEYS
        if unknown:
            raise ConfigError(f"[tool.rx.remotes.{name}]: unknown key(s) {', '.join(sorted(unknown))}",
                              hint=f"known keys: {', '.join(sorted(_REMOTE_KEYS))}")
        values = dict(table)
        values.setdefault("host", name)
        if "allow_unpickle" in values:
            values["allow_unpickle"] = tuple(values["allow_unpickle"])
        if not isinstance(values["host"], str):
            raise ConfigError(f"[tool.rx.remotes.{name}]: host must be a string")
        if "port" in values and not isinstance(values["port"], int):
            raise ConfigError(f"[tool.rx.remotes.{name}]: port must be an integer")
        if "env" in values and not (isinstance(values["env"], dict)
                                    and all(isinstance(v, str) for v in values["env"].values())):
            raise ConfigError(f"[tool.rx.remotes.{name}]: env must be a table of strings")
        _check_values(name, values)
        if "slurm" in values:
            values.setdefault("scheduler", "slurm")
            _check_slurm_table(name, values["slurm"])
        if "scheduler" in values:
            from .launchers.registry import check_launcher_name

            try:
                check_launcher_name(values["scheduler"])
            except ConfigError as exc:
                raise ConfigError(f"[tool.rx.remotes.{name}]: {exc.message}", hint=exc.hint) from None
        if values.get("backend") is not None:
            check_remote_backend(values["backend"], where=f"[tool.rx.remotes.{name}]: ")
        return cls(name=name, **values)

    def spec(self, **options: Any) -> HostSpec:
        """How to reach this remote (``options`` go to :class:`HostSpec`, e.g. ``ssh_config``)."""
        from .backends.base import HostSpec

        spec = HostSpec.parse(self.host, **options)
        changes: dict[str, Any] = {}
        if self.user:
            changes["user"] = self.user
        if self.port:
            changes["port"] = self.port
        if self.identity_file:
            changes["identity_file"] = Path(self.identity_file).expanduser()
        return replace(spec, **changes) if changes else spec


def _check_slurm_table(name: str, table: object) -> None:
    """Refuse a ``slurm`` table the Slurm launcher would refuse, when the configuration loads."""
    if not isinstance(table, dict):
        raise ConfigError(f"[tool.rx.remotes.{name}]: slurm must be a table, e.g. slurm = {{ partition = \"gpu\" }}")
    from .launchers.registry import create_launcher

    try:
        create_launcher("slurm", table)
    except ConfigError as exc:
        raise ConfigError(f"[tool.rx.remotes.{name}]: {exc.message}", hint=exc.hint) from None


def _check_values(name: str, values: dict[str, Any]) -> None:
    """A remote table's env and timeout, checked as the command line's are (in place).

    Raises:
        ConfigError: A bad variable name or timeout, named with the table it is in.
    """
    try:
        values["env"] = check_env(values.get("env") or {}, f"[tool.rx.remotes.{name}] env")
        values["timeout"] = check_timeout(values.get("timeout"), f"[tool.rx.remotes.{name}] timeout")
    except UsageError as exc:
        raise ConfigError(exc.message, hint=exc.hint) from None


def check_remote_backend(name: str, *, where: str = "") -> str:
    """``name`` if it is a backend a remote host may use (the backend registry decides).

    Raises:
        ConfigError: No such backend (the hint lists the choices).
    """
    from .backends.registry import check_backend_name

    try:
        return check_backend_name(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc.message}", hint=exc.hint) from None


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` from ``start`` (default: the current directory) upwards."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    try:
        with path.open("rb") as stream:
            data: dict[str, Any] = tomllib.load(stream)
            return data
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


#: The built-in advice chains, as ``"module:Class"`` specs (loaded by :func:`remote_exec.chains.chain_for`).
DEFAULT_CHAINS: dict[str, tuple[str, ...]] = {
    "default": ("remote_exec.advices.log:LoggingAdvice", "remote_exec.advices.remote:RemoteAdvice"),
    "cached": ("remote_exec.advices.cache:CachingAdvice", "remote_exec.advices.remote:RemoteAdvice"),
}


def _advice_spec(spec: object) -> str:
    """A ``"module:Class"`` advice spec from ``[tool.rx] chains``, checked now (its module imported, its
    class found) so that a typo is an error when the configuration loads, not at the first call."""
    if not isinstance(spec, str) or not all(spec.partition(":")[::2]):
        raise ConfigError(f"advice {spec!r} must be written module:Class")
    module_name, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot create advice {spec!r}: {exc}") from exc
    if not callable(found):
        raise ConfigError(f"cannot create advice {spec!r}: not a class")
    return spec


def _project_settings(path: Path, table: Mapping[str, Any]) -> dict[str, Any]:
    """The project and cache keys of ``[tool.rx]``, checked."""
    settings: dict[str, Any] = {}
    project = table.get("project")
    if project is False:
        settings["use_project"] = False
    elif isinstance(project, str):
        settings["project"] = (path.parent / Path(project).expanduser()).resolve()
    elif project is not None:
        raise ConfigError(f"{path}: [tool.rx] project must be a path or false")
    include = table.get("include", [])
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise ConfigError(f"{path}: [tool.rx] include must be a list of strings")
    settings["include"] = list(include)
    for key in ("cache_limit", "pull_limit"):
        if key in table:
            settings[key] = parse_size(table[key], what=f"{path}: [tool.rx] {key}")
    if "cache_days" in table:
        days = table["cache_days"]
        if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
            raise ConfigError(f"{path}: [tool.rx] cache_days must be a positive number")
        settings["cache_days"] = float(days)
    return settings


_ENV_KEYS = ("deps", "requirements", "index_url", "find_links", "offline", "inherit_site", "uv_binary",
             "project_deps")


def _string_list(value: Any, label: str) -> list[str]:
    """``value`` (a string or a list of strings) as a list.

    Raises:
        ConfigError: It is neither.
    """
    if isinstance(value, str):
        return [value]
    if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise ConfigError(f"{label} must be a list of strings")
    return list(value)


def _env_settings(path: Path, table: Mapping[str, Any]) -> dict[str, Any]:
    """The dependency keys of ``[tool.rx]``, checked; paths made absolute (relative to ``path``'s folder)."""
    settings = {key: table[key] for key in _ENV_KEYS if key in table}
    for key in ("deps", "requirements", "find_links"):
        settings[key] = _string_list(settings.get(key, []), f"{path}: [tool.rx] {key}")
    for key in ("requirements", "find_links"):
        settings[key] = [item if "://" in item else str((path.parent / item).expanduser().resolve())
                         for item in settings.get(key, [])]
    if "uv_binary" in settings:
        settings["uv_binary"] = str((path.parent / str(settings["uv_binary"])).expanduser())
    for key in ("offline", "inherit_site", "project_deps"):
        if key in settings and not isinstance(settings[key], bool):
            raise ConfigError(f"{path}: [tool.rx] {key} must be true or false")
    return settings


@dataclass
class Configuration:
    """Advice chains, extensions, remotes and defaults.

    Attributes:
        chains: Advice chains by name, as advices or ``"module:Class"`` specs (made into advices on first
            use by :func:`remote_exec.chains.chain_for`); the built-in ``default`` and ``cached`` chains
            (:data:`DEFAULT_CHAINS`) are here unless replaced.
        extensions: Extensions notified around every advice.
        remotes: Configured remotes by name.
        backend: Default backend name.
        serializer: Serializer for arguments and results.
        ssh_config: The ssh_config file to read (None: ``~/.ssh/config``).
        distribution_modules: Extra modules or packages to ship in the archive.
        host_key_policy: ``accept-new`` (default), ``strict`` or ``off``.
        connect_timeout: Seconds for connecting.
        workspace: The workspace directory (None: ``RX_WORKSPACE`` or ``.rx`` at the project root).
        log_cap: The most a run's ``stdout.log`` (and ``stderr.log``) keeps, in bytes: past it the head is
            dropped and noted, the tail kept (0: no cap).
        project: The project root (None: found from the script, the task's module or the current
            directory); ignored when ``use_project`` is False.
        use_project: Run in a snapshot of the project (``project = false``: ship the script and the modules
            it imports, and run in an empty directory).
        include: gitignore-syntax patterns of ignored paths that travel with the project nevertheless.
        cache_limit: Bytes a host's caches may hold (least recently used go first above it).
        cache_days: Days after which unused trees and archives go from a host's caches.
        pull_limit: Bytes a run brings back at most (None: no limit).
        env_settings: The tasks' dependencies (``deps``, ``requirements``, ``index_url``, ``find_links``,
            ``offline``, ``inherit_site``, ``uv_binary``; paths absolute; ``project_deps``: the project's own
            dependencies when nothing else is declared), see :mod:`remote_exec.envs`.
        source: The pyproject.toml this was loaded from, if any.
    """

    chains: dict[str, list[Advice | str]] = field(default_factory=dict)
    extensions: list[Extension] = field(default_factory=list)
    remotes: dict[str, Remote] = field(default_factory=dict)
    backend: str = "openssh"
    serializer: str = "pickle"
    ssh_config: Path | None = None
    distribution_modules: list[str] = field(default_factory=list)
    host_key_policy: str = "accept-new"
    connect_timeout: float = 10.0
    workspace: Path | None = None
    log_cap: int = DEFAULT_LOG_CAP
    project: Path | None = None
    use_project: bool = True
    include: list[str] = field(default_factory=list)
    cache_limit: int = 10 << 30
    cache_days: float = 30.0
    pull_limit: int | None = 2 << 30
    env_settings: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def __post_init__(self) -> None:
        for name, specs in DEFAULT_CHAINS.items():
            self.chains.setdefault(name, list(specs))

    # -- building in code ----------------------------------------------------------------------------

    def add_chain(self, name: str, advices: Iterable[Advice]) -> Configuration:
        """Add (or replace) the advice chain ``name``."""
        self.chains[name] = list(advices)
        return self

    def add_extension(self, extension: Extension) -> Configuration:
        """Add an extension; its ``on_init`` is called now."""
        self.extensions.append(extension)
        extension.on_init(self)
        return self

    def add_remote(self, remote: Remote) -> Configuration:
        """Add (or replace) a configured remote."""
        self.remotes[remote.name] = remote
        return self

    def add_modules_for_distribution(self, *modules: str) -> Configuration:
        """Ship these modules or packages in the archive too (third-party packages are not shipped
        unless listed here)."""
        self.distribution_modules.extend(modules)
        return self

    # -- defaults from the environment ---------------------------------------------------------------

    def effective_backend(self, requested: str | None = None) -> str:
        """``requested``, else RX_BACKEND, else the configured default."""
        return requested or os.environ.get("RX_BACKEND") or self.backend

    def with_workspace(self, workspace: Path | None) -> Configuration:
        """This configuration with ``workspace`` (a command's ``--workspace``) as its workspace, so that a
        project's snapshot leaves it out like a configured one; itself when ``workspace`` is None."""
        return self if workspace is None else replace(self, workspace=workspace)

    def check_remote_backend(self, name: str) -> str:
        """``name`` if it is a backend a remote host may use.

        Raises:
            ConfigError: No such backend (the hint lists the choices).
        """
        return check_remote_backend(name)

    def effective_ssh_config(self, requested: str | os.PathLike[str] | None = None) -> Path | None:
        """``requested`` (a path or a string, ``~`` expanded), else RX_SSH_CONFIG, else the configured file
        (None: ssh's default)."""
        if requested is not None and str(requested):
            return Path(requested).expanduser()
        from_env = os.environ.get("RX_SSH_CONFIG")
        return Path(from_env).expanduser() if from_env else self.ssh_config

    def remote(self, name: str) -> Remote:
        """The configured remote ``name``, or one made from ``name`` as an alias / ``[user@]host[:port]``."""
        if name in self.remotes:
            return self.remotes[name]
        return Remote(name=name, host=name)

    def host_spec(self, remote: Remote, options: dict[str, Any]) -> HostSpec:
        """How a backend reaches ``remote`` for a call with ``options``: its ssh_config, host-key policy,
        timeouts and keepalives (the call's options over this configuration's)."""
        spec = remote.spec(ssh_config=self.effective_ssh_config(options.get("ssh_config")),
                           host_key_policy=options.get("host_key_policy") or self.host_key_policy,
                           connect_timeout=float(options.get("connect_timeout") or self.connect_timeout))
        for field_name in ("keepalive_interval", "keepalive_count"):
            if options.get(field_name) is not None:
                spec = replace(spec, **{field_name: options[field_name]})
        return spec

    # -- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pyproject(cls, path: Path) -> Configuration:
        """Read ``[tool.rx]`` from ``path``.

        Raises:
            ConfigError: The file or the table is invalid.
        """
        table = _load_toml(path).get("tool", {}).get("rx", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [tool.rx] must be a table")
        known = {"backend", "serializer", "ssh_config", "distribution_modules", "host_key_policy",
                 "connect_timeout", "workspace", "chains", "remotes", "log_cap", "project", "include",
                 "cache_limit", "cache_days", "pull_limit", *_ENV_KEYS}
        unknown = set(table) - known
        if unknown:
            raise ConfigError(f"{path}: unknown [tool.rx] key(s) {', '.join(sorted(unknown))}",
                              hint=f"known keys: {', '.join(sorted(known))}")
        base = path.parent
        config = cls(
            backend=table.get("backend", "openssh"),
            serializer=table.get("serializer", "pickle"),
            ssh_config=(base / Path(table["ssh_config"]).expanduser()) if "ssh_config" in table else None,
            distribution_modules=list(table.get("distribution_modules", [])),
            host_key_policy=table.get("host_key_policy", "accept-new"),
            connect_timeout=float(table.get("connect_timeout", 10.0)),
            workspace=(base / table["workspace"]) if "workspace" in table else None,
            log_cap=parse_size(table.get("log_cap", DEFAULT_LOG_CAP), f"{path}: log_cap"),
            source=path,
            chains={name: [_advice_spec(item) for item in items]
                    for name, items in table.get("chains", {}).items()},
            env_settings=_env_settings(path, table),
            **_project_settings(path, table),
        )
        for name, remote_table in table.get("remotes", {}).items():
            if not isinstance(remote_table, dict):
                raise ConfigError(f"{path}: [tool.rx.remotes.{name}] must be a table")
            config.add_remote(Remote.from_table(name, remote_table))
        check_remote_backend(config.backend, where=f"{path}: ")
        if config.host_key_policy not in ("accept-new", "strict", "off"):
            raise ConfigError(f"{path}: host_key_policy must be accept-new, strict or off")
        return config

    @classmethod
    def load(cls, start: Path | None = None) -> Configuration:
        """The project's configuration: ``[tool.rx]`` of the nearest pyproject.toml from ``start`` (default:
        the current directory) upwards, else defaults. Read afresh on every call: the process's
        :class:`~remote_exec.coordinator.Coordinator` keeps what it loaded for the calls of a sweep."""
        path = find_pyproject(start)
        return cls.from_pyproject(path) if path is not None else cls()
