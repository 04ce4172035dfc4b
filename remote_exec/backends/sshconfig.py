"""Resolve a host the way OpenSSH does: ssh_config first, then the user's overrides, then the defaults.

The paramiko backend connects with what :func:`resolve` returns, and ``rx hosts`` lists what
:func:`list_aliases` finds, so both agree with ``ssh`` on the same file. Parsing is paramiko's
:class:`paramiko.SSHConfig` (imported on first use, so ``rx --help`` never pays for it); ``Include``, which
paramiko does not follow, is inlined here first.

Precedence, as in OpenSSH: the fields of :class:`~remote_exec.backends.base.HostSpec` (what the user typed
or configured in rx) override ssh_config, and ssh_config overrides the defaults (local user name, port 22,
``~/.ssh/known_hosts``, and ``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa`` when no ``IdentityFile`` is
given and they exist).
"""

from __future__ import annotations

import getpass
import glob
import logging
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .base import HostSpec

__all__ = [
    "DEFAULT_IDENTITIES",
    "ResolvedHost",
    "default_config_path",
    "list_aliases",
    "parse_jump",
    "resolve",
]

logger = logging.getLogger(__name__)

#: Key files tried when ssh_config names none, in OpenSSH's order (DSA is gone from paramiko).
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")

_KEYWORD = re.compile(r"^\s*(\w+)(?:\s*=\s*|\s+)(.+?)\s*$")
_MAX_INCLUDE_DEPTH = 16  # OpenSSH's READCONF_MAX_DEPTH


@dataclass(frozen=True)
class ResolvedHost:
    """Everything needed to connect to one host, after ssh_config and overrides.

    Attributes:
        alias: The host as the user named it (an alias or a host name).
        hostname: The name or address to connect to (``HostName``).
        port: TCP port.
        user: Remote user name.
        identity_files: Private key files to try, in order (files that do not exist are kept when the
            configuration names them, so the error can say so; defaults are kept only if they exist).
        identities_only: ``IdentitiesOnly yes``: offer only these files, not every key in the agent.
        proxy_jump: ``ProxyJump`` hops (``[user@]host[:port]``, comma separated), or None.
        known_hosts_files: ``UserKnownHostsFile`` files; the first one is where new keys are recorded.
        host_key_alias: ``HostKeyAlias``: the name to look the host key up under instead of ``hostname``.
        config_file: The ssh_config file read, or None.
    """

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[Path, ...] = ()
    identities_only: bool = False
    proxy_jump: str | None = None
    known_hosts_files: tuple[Path, ...] = ()
    host_key_alias: str | None = None
    config_file: Path | None = None

    @property
    def known_hosts_name(self) -> str:
        """The name this host's keys are recorded under: ``host``, or ``[host]:port`` off port 22."""
        name = self.host_key_alias or self.hostname
        return name if self.port == 22 else f"[{name}]:{self.port}"

    @property
    def address(self) -> str:
        """``hostname:port`` for messages."""
        return f"[{self.hostname}]:{self.port}" if ":" in self.hostname else f"{self.hostname}:{self.port}"


def default_config_path() -> Path:
    """The user's ssh_config: ``~/.ssh/config``."""
    return Path("~/.ssh/config").expanduser()


def resolve(spec: HostSpec) -> ResolvedHost:
    """Resolve ``spec`` against its ssh_config file into the concrete values to connect with.

    Raises:
        ConfigError: ``spec.ssh_config`` names a file that does not exist, or the file cannot be parsed.
    """
    config_file = _config_path(spec.ssh_config)
    options = _lookup(config_file, spec.host) if config_file is not None else {}

    hostname = str(options.get("hostname") or spec.host)
    user = spec.user or str(options.get("user") or "") or getpass.getuser()
    port = spec.port if spec.port is not None else _port(options.get("port"), config_file)

    configured = [Path(os.path.expanduser(str(p))) for p in _as_list(options.get("identityfile"))]
    identities: list[Path] = [spec.identity_file.expanduser()] if spec.identity_file else []
    identities += [path for path in configured if path not in identities]
    if not identities:
        ssh_dir = Path("~/.ssh").expanduser()
        identities = [ssh_dir / name for name in DEFAULT_IDENTITIES if (ssh_dir / name).is_file()]

    if spec.known_hosts is not None:
        known_hosts: tuple[Path, ...] = (spec.known_hosts.expanduser(),)
    elif options.get("userknownhostsfile"):
        tokens = {"%d": str(Path.home()), "%u": getpass.getuser(), "%h": hostname, "%p": str(port),
                  "%r": user, "%%": "%"}
        known_hosts = tuple(
            Path(os.path.expanduser(_expand_tokens(word, tokens)))
            for word in shlex.split(str(options["userknownhostsfile"]))
        )
    else:
        known_hosts = (Path("~/.ssh/known_hosts").expanduser(), Path("~/.ssh/known_hosts2").expanduser())

    jump = options.get("proxyjump")
    proxy_jump = None if not jump or str(jump).lower() == "none" else str(jump)
    return ResolvedHost(
        alias=spec.host,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=tuple(identities),
        identities_only=str(options.get("identitiesonly", "no")).lower() == "yes",
        proxy_jump=proxy_jump,
        known_hosts_files=known_hosts,
        host_key_alias=str(options["hostkeyalias"]) if options.get("hostkeyalias") else None,
        config_file=config_file,
    )


def parse_jump(proxy_jump: str) -> list[HostSpec]:
    """Split a ``ProxyJump`` value into its hops, first hop first.

    Each hop is ``[user@]host[:port]`` or ``ssh://[user@]host[:port]``.

    Raises:
        ConfigError: A hop is malformed.
    """
    hops = []
    for word in proxy_jump.split(","):
        word = word.strip()
        if word.startswith("ssh://"):
            word = word[len("ssh://"):].rstrip("/")
        hops.append(HostSpec.parse(word))
    return hops


def list_aliases(path: Path | None = None) -> list[str]:
    """The concrete host aliases of an ssh_config file, in file order.

    Patterns (``*``, ``?``) and negations (``!host``) are left out, ``Include`` is followed. A missing file
    gives an empty list; ``None`` means ``~/.ssh/config``.
    """
    path = default_config_path() if path is None else path.expanduser()
    if not path.is_file():
        return []
    aliases: list[str] = []
    for line in _expanded_lines(path, depth=0):
        match = _KEYWORD.match(line)
        if match is None or match[1].lower() != "host":
            continue
        try:
            names = shlex.split(match[2])
        except ValueError:
            logger.debug("unparsable Host line in %s: %r", path, line)
            continue
        for name in names:
            if not any(char in name for char in "*?!") and name not in aliases:
                aliases.append(name)
    return aliases


def _config_path(configured: Path | None) -> Path | None:
    if configured is not None:
        path = configured.expanduser()
        if not path.is_file():
            raise ConfigError(f"ssh_config file not found: {path}")
        return path
    path = default_config_path()
    return path if path.is_file() else None


def import_paramiko() -> None:
    """Import paramiko without invoke.

    paramiko.config imports invoke when it is installed (Fabric brings it), only to run ssh_config's
    ``Match exec`` commands; that import is most of the cost of importing paramiko (50-80 ms here), paid
    on the first call of every process. rx imports paramiko with invoke hidden and hands it to
    paramiko.config only when an ssh_config uses ``Match exec`` (see :func:`_lookup`).
    """
    if "paramiko" in sys.modules:
        return
    hide = "invoke" not in sys.modules
    if hide:
        sys.modules["invoke"] = None  # type: ignore[assignment]  # makes `import invoke` fail at once
    try:
        import paramiko  # noqa: F401
    finally:
        if hide and "invoke" in sys.modules and sys.modules["invoke"] is None:
            del sys.modules["invoke"]


def _allow_match_exec() -> None:
    """Give paramiko.config the invoke that :func:`import_paramiko` kept from it (if it is installed)."""
    import paramiko.config

    if getattr(paramiko.config, "invoke", "absent") is None:
        try:
            import invoke
        except ImportError:
            return  # paramiko says so itself, as it would have anyway
        paramiko.config.invoke = invoke  # type: ignore[attr-defined]
        paramiko.config.invoke_import_error = None


_MATCH_EXEC = re.compile(r"^\s*match\b.*\bexec\b", re.IGNORECASE | re.MULTILINE)


def _lookup(path: Path, host: str) -> dict[str, object]:
    """paramiko's lookup of ``host`` in ``path``, with ``Include`` inlined."""
    import_paramiko()
    import paramiko

    text = "\n".join(_expanded_lines(path, depth=0))
    if _MATCH_EXEC.search(text):
        _allow_match_exec()
    try:
        return dict(paramiko.SSHConfig.from_text(text).lookup(host))
    except paramiko.ConfigParseError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    except paramiko.CouldNotCanonicalize as exc:
        raise ConfigError(f"{path}: could not canonicalize host name {host!r}") from exc


def _expanded_lines(path: Path, depth: int) -> Iterator[str]:
    """The lines of ``path`` with every ``Include`` replaced by the lines of the files it names.

    Relative Include paths are taken from ``~/.ssh``, as OpenSSH does for user configuration files; glob
    patterns are expanded in sorted order; files that do not exist are skipped, as OpenSSH does.

    Raises:
        ConfigError: The file cannot be read, or Includes nest deeper than OpenSSH allows.
    """
    if depth > _MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: Include nested too deeply (more than {_MAX_INCLUDE_DEPTH} levels)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read ssh_config file {path}: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        match = _KEYWORD.match(line)
        if match is None or match[1].lower() != "include":
            yield line
            continue
        for word in shlex.split(match[2]):
            pattern = Path(os.path.expanduser(word))
            if not pattern.is_absolute():
                pattern = Path("~/.ssh").expanduser() / pattern
            for included in sorted(glob.glob(str(pattern))):
                if Path(included).is_file():
                    yield from _expanded_lines(Path(included), depth + 1)


def _port(value: object, config_file: Path | None) -> int:
    if value is None:
        return 22
    try:
        port = int(str(value))
    except ValueError:
        raise ConfigError(f"{config_file}: Port is not a number: {value!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{config_file}: Port out of range: {port}")
    return port


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _expand_tokens(word: str, tokens: dict[str, str]) -> str:
    return re.sub(r"%.", lambda m: tokens.get(m[0], m[0]), word)
