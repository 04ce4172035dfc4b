"""Configuration: advice chains, extensions, remotes, and defaults, from code or ``[tool.rx]``.

A :class:`Configuration` is built in code or loaded from the ``[tool.rx]`` table of the nearest
``pyproject.toml`` (searched from the current directory upwards)::

    [tool.rx]
    backend = "openssh"                      # or "paramiko"; RX_BACKEND overrides
    serializer = "pickle"                    # or "json"
    distribution_modules = ["mypkg"]         # shipped in the archive besides what is found
    chains.cached = ["remote_exec.advices.cache:CachingAdvice", "remote_exec.advices.remote:RemoteAdvice"]

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
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .advice import Advice, Extension
    from .backends.base import HostSpec

__all__ = ["DEFAULT_CHAINS", "Configuration", "Remote", "check_remote_backend", "find_pyproject"]

DEFAULT_WORKDIR = "~/.cache/remote_exec"
_REMOTE_KEYS = {"host", "user", "port", "python", "workdir", "env", "backend", "keep_warm", "identity_file",
                "timeout", "restricted", "allow_unpickle", "scheduler", "slurm"}


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
        workspace: The workspace directory (None: ``RX_WORKSPACE`` or ``./.rx``).
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

    def check_remote_backend(self, name: str) -> str:
        """``name`` if it is a backend a remote host may use.

        Raises:
            ConfigError: No such backend (the hint lists the choices).
        """
        return check_remote_backend(name)

    def effective_ssh_config(self, requested: Path | None = None) -> Path | None:
        """``requested``, else RX_SSH_CONFIG, else the configured file (None: ssh's default)."""
        if requested is not None:
            return requested
        from_env = os.environ.get("RX_SSH_CONFIG")
        return Path(from_env).expanduser() if from_env else self.ssh_config

    def remote(self, name: str) -> Remote:
        """The configured remote ``name``, or one made from ``name`` as an alias / ``[user@]host[:port]``."""
        if name in self.remotes:
            return self.remotes[name]
        return Remote(name=name, host=name)

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
                 "connect_timeout", "workspace", "chains", "remotes"}
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
            source=path,
            chains={name: [_advice_spec(item) for item in items]
                    for name, items in table.get("chains", {}).items()},
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
