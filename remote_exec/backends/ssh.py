"""What the two SSH backends share: one :class:`ResolvedHost` record and the handling of ssh_config.

A host named by the user (an ssh_config alias or a host name, with the overrides of its
:class:`~remote_exec.backends.base.HostSpec`) resolves into a :class:`ResolvedHost`: where to connect, as
whom, with which keys, through which ProxyJump hops, checking which known_hosts files. There are two ways
to get there, one per backend, and both give the same record:

* **Ask OpenSSH** (the ``openssh`` backend): ``ssh -G`` prints the options ssh itself would use, overrides
  applied, and :meth:`ResolvedHost.from_ssh_g` reads them. Whatever ssh supports (``Match``, ``Include``,
  ``CanonicalizeHostname``, ...) is honoured because ssh does the work; connecting goes through ssh again.
* **Parse the file** (the ``paramiko`` backend, which has no ssh client to ask): :func:`resolve` reads the
  ssh_config file with :class:`paramiko.SSHConfig` (imported on first use, so ``rx --help`` never pays for
  it; ``Include``, which paramiko does not follow, is inlined here first) and applies OpenSSH's precedence:
  the fields of the HostSpec (what the user typed or configured in rx) override ssh_config, and ssh_config
  overrides the defaults (local user name, port 22, ``~/.ssh/known_hosts``, and ``~/.ssh/id_ed25519``,
  ``id_ecdsa``, ``id_rsa`` when no ``IdentityFile`` is given and they exist).

``rx hosts`` lists the aliases :func:`list_aliases` finds, whichever backend is in use.
"""

from __future__ import annotations

import getpass
import glob
import logging
import os
import re
import shlex
import sys
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import HostSpec

__all__ = [
    "DEFAULT_IDENTITIES",
    "ResolvedHost",
    "default_config_path",
    "import_paramiko",
    "list_aliases",
    "locked_identity",
    "locked_identity_hint",
    "parse_jump",
    "parse_ssh_g",
    "resolve",
]

logger = logging.getLogger(__name__)

#: Key files tried when ssh_config names none, in OpenSSH's order (DSA is gone from paramiko).
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")

_KEYWORD = re.compile(r"^\s*(\w+)(?:\s*=\s*|\s+)(.+?)\s*$")
_MAX_INCLUDE_DEPTH = 16  # OpenSSH's READCONF_MAX_DEPTH


def parse_ssh_g(text: str) -> dict[str, tuple[str, ...]]:
    """Parse the output of ``ssh -G``: one ``keyword value`` per line, keywords in lower case.

    A keyword that appears several times (``identityfile``, ``localforward``, ...) keeps every value in
    order.
    """
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            options.setdefault(key.lower(), []).append(value.strip())
    return {key: tuple(values) for key, values in options.items()}


def _none_is_unset(value: str | None) -> str | None:
    """ssh_config's ``none`` (any case) means the option is not set."""
    return None if not value or value.lower() == "none" else value


@dataclass(frozen=True)
class ResolvedHost:
    """Everything needed to connect to one host, after ssh_config and the HostSpec's overrides.

    Attributes:
        alias: The host as the user named it (an alias or a host name).
        hostname: The name or address to connect to (``HostName``).
        port: TCP port.
        user: Remote user name.
        identity_files: Private key files to try, in order, ``~`` expanded (files that do not exist are kept
            when the configuration names them, so the error can say so; defaults are kept only if they
            exist when the file is parsed here; ``ssh -G`` lists OpenSSH's defaults and leaves ``%``
            tokens for ssh to expand).
        identities_only: ``IdentitiesOnly yes``: offer only these files, not every key in the agent.
        proxy_jump: ``ProxyJump`` hops (``[user@]host[:port]``, comma separated), or None.
        proxy_command: ``ProxyCommand``, its ``%`` tokens expanded (parsed here; ``ssh -G`` leaves them to
            ssh), or None. Of it and ``proxy_jump`` at most one is set: the first in the file, as OpenSSH.
        known_hosts_files: ``UserKnownHostsFile`` files; the first one is where new keys are recorded.
        host_key_alias: ``HostKeyAlias``: the name to look the host key up under instead of ``hostname``.
        config_file: The ssh_config file given (``ssh -G``) or read (parsed here), or None.
        options: Everything ``ssh -G`` printed (keywords in lower case); empty when the file was parsed
            here.
    """

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[Path, ...] = ()
    identities_only: bool = False
    proxy_jump: str | None = None
    proxy_command: str | None = None
    known_hosts_files: tuple[Path, ...] = ()
    host_key_alias: str | None = None
    config_file: Path | None = None
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_ssh_g(cls, alias: str, text: str, *, config_file: Path | None = None) -> ResolvedHost:
        """Build from the output of ``ssh -G`` (see :func:`parse_ssh_g`).

        Raises:
            ConfigError: The output lacks the host name, user or port.
        """
        options = parse_ssh_g(text)
        try:
            hostname = options["hostname"][0]
            user = options["user"][0]
            port = int(options["port"][0])
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"`ssh -G {alias}` gave no host name, user and port") from None
        files = options.get("userknownhostsfile", ())
        return cls(
            alias=alias,
            hostname=hostname,
            port=port,
            user=user,
            identity_files=tuple(Path(os.path.expanduser(name)) for name in options.get("identityfile", ())),
            identities_only=options.get("identitiesonly", ("no",))[0].lower() == "yes",
            proxy_jump=_none_is_unset(options.get("proxyjump", ("none",))[0]),
            proxy_command=_none_is_unset(options.get("proxycommand", ("none",))[0]),
            known_hosts_files=tuple(Path(os.path.expanduser(name)) for line in files for name in line.split()),
            host_key_alias=_none_is_unset(options.get("hostkeyalias", ("none",))[0]),
            config_file=config_file,
            options=options,
        )

    @property
    def address(self) -> str:
        """``hostname:port`` (``[hostname]:port`` for an IPv6 address), for messages."""
        return f"[{self.hostname}]:{self.port}" if ":" in self.hostname else f"{self.hostname}:{self.port}"

    @property
    def destination(self) -> str:
        """``user@hostname:port``, for messages."""
        return f"{self.user}@{self.address}"

    @property
    def known_hosts_file(self) -> Path | None:
        """The known_hosts file new keys are recorded in, if any."""
        return self.known_hosts_files[0] if self.known_hosts_files else None

    @property
    def known_hosts_name(self) -> str:
        """The name this host's keys are recorded under: ``host``, or ``[host]:port`` off port 22."""
        name = self.host_key_alias or self.hostname
        return name if self.port == 22 else f"[{name}]:{self.port}"


def _is_encrypted(path: Path) -> bool:
    """Whether the private key file at ``path`` needs a passphrase (OpenSSH's format: its cipher is not
    ``none``; PEM: an ``ENCRYPTED`` header). Unreadable files count as not encrypted."""
    import base64

    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    if "BEGIN OPENSSH PRIVATE KEY" in text:
        body = "".join(line for line in text.splitlines() if line and not line.startswith("-----"))
        try:
            data = base64.b64decode(body)
        except ValueError:
            return False
        magic = b"openssh-key-v1\0"
        if not data.startswith(magic) or len(data) < len(magic) + 4:
            return False
        size = int.from_bytes(data[len(magic):len(magic) + 4], "big")
        return data[len(magic) + 4:len(magic) + 4 + size] != b"none"
    return "ENCRYPTED" in text.split("\n\n", 1)[0]


def _agent_holds(path: Path) -> bool:
    """Whether the ssh-agent (``SSH_AUTH_SOCK``) holds the key whose public half is ``path``.pub."""
    import shutil
    import subprocess

    if not os.environ.get("SSH_AUTH_SOCK") or shutil.which("ssh-add") is None:
        return False
    try:
        public = Path(f"{path}.pub").read_text(encoding="ascii", errors="replace").split()[:2]
        listed = subprocess.run(["ssh-add", "-L"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.split()[:2] == public for line in listed.stdout.splitlines())


def locked_identity(identity_files: Iterable[Path]) -> Path | None:
    """The first identity file that needs a passphrase no ssh-agent can give (rx never prompts), if any."""
    for path in identity_files:
        if path.is_file() and _is_encrypted(path) and not _agent_holds(path):
            return path
    return None


def locked_identity_hint(path: Path) -> str:
    """What to do about ``path``, an encrypted key no agent holds (the same words on both backends)."""
    return f"{path} is encrypted and no agent holds it: run `ssh-add {path}` (with SSH_AUTH_SOCK set) or use an " \
           "unencrypted key"


def default_config_path() -> Path:
    """The user's ssh_config: ``~/.ssh/config``."""
    return Path("~/.ssh/config").expanduser()


def resolve(spec: HostSpec) -> ResolvedHost:
    """Resolve ``spec`` by parsing its ssh_config file (the paramiko backend's way; see the module).

    Raises:
        ConfigError: ``spec.ssh_config`` names a file that does not exist, or the file cannot be parsed.
    """
    config_file = _config_path(spec.ssh_config)
    options = _lookup(config_file, spec.host) if config_file is not None else {}
    hostname = str(options.get("hostname") or spec.host)
    user = spec.user or str(options.get("user") or "") or getpass.getuser()
    port = spec.port if spec.port is not None else _port(options.get("port"), config_file)
    proxy_jump, proxy_command = _proxy(spec, options, hostname=hostname, port=port, user=user)
    return ResolvedHost(
        alias=spec.host,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=_identity_files(spec, options),
        identities_only=str(options.get("identitiesonly", "no")).lower() == "yes",
        proxy_jump=proxy_jump,
        proxy_command=proxy_command,
        known_hosts_files=_known_hosts_files(spec, options, hostname=hostname, port=port, user=user),
        host_key_alias=str(options["hostkeyalias"]) if options.get("hostkeyalias") else None,
        config_file=config_file,
    )


def _proxy(spec: HostSpec, options: Mapping[str, object], *, hostname: str, port: int,
           user: str) -> tuple[str | None, str | None]:
    """``ProxyJump`` and ``ProxyCommand``: whichever the file sets first (OpenSSH takes that one and ignores
    the other), the command's ``%`` tokens expanded with the values in effect (the HostSpec's too).

    Raises:
        ConfigError: ``ProxyUseFdpass yes`` (a command that hands over a descriptor: only ssh takes that).
    """
    first = next((key for key in options if key in ("proxyjump", "proxycommand")), None)
    if first == "proxyjump":
        return _none_is_unset(str(options.get("proxyjump") or "")), None
    command = _none_is_unset(str(options.get("proxycommand") or ""))
    if command is None:
        return None, None
    if str(options.get("proxyusefdpass", "no")).lower() == "yes":
        raise ConfigError(f"{spec.host}: ProxyUseFdpass is set in ssh_config; the paramiko backend cannot take a "
                          "descriptor from the ProxyCommand", hint="use the openssh backend for this host")
    import socket

    local = socket.gethostname()
    tokens = {"%h": hostname, "%p": str(port), "%r": user, "%n": spec.host, "%u": getpass.getuser(),
              "%d": str(Path.home()), "%l": local, "%L": local.split(".")[0], "%%": "%"}
    return None, _expand_tokens(command, tokens)


def _identity_files(spec: HostSpec, options: Mapping[str, object]) -> tuple[Path, ...]:
    """Like ``ssh -i``: the HostSpec's key first, then ssh_config's; the default keys only if neither names
    one (and only those that exist)."""
    configured = [Path(os.path.expanduser(str(p))) for p in _as_list(options.get("identityfile"))]
    identities: list[Path] = [spec.identity_file.expanduser()] if spec.identity_file else []
    identities += [path for path in configured if path not in identities]
    if not identities:
        ssh_dir = Path("~/.ssh").expanduser()
        identities = [ssh_dir / name for name in DEFAULT_IDENTITIES if (ssh_dir / name).is_file()]
    return tuple(identities)


def _known_hosts_files(spec: HostSpec, options: Mapping[str, object], *, hostname: str, port: int,
                       user: str) -> tuple[Path, ...]:
    """The HostSpec's file, else ssh_config's ``UserKnownHostsFile`` (``%`` tokens expanded), else
    OpenSSH's defaults."""
    if spec.known_hosts is not None:
        return (spec.known_hosts.expanduser(),)
    if options.get("userknownhostsfile"):
        tokens = {"%d": str(Path.home()), "%u": getpass.getuser(), "%h": hostname, "%p": str(port),
                  "%r": user, "%%": "%"}
        return tuple(
            Path(os.path.expanduser(_expand_tokens(word, tokens)))
            for word in shlex.split(str(options["userknownhostsfile"]))
        )
    return (Path("~/.ssh/known_hosts").expanduser(), Path("~/.ssh/known_hosts2").expanduser())


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
    """Import paramiko without invoke, and without importlib.metadata where its version can be read more
    cheaply.

    paramiko.config imports invoke when it is installed (Fabric brings it), only to run ssh_config's
    ``Match exec`` commands; that import is most of the cost of importing paramiko (50-80 ms here), paid
    on the first call of every process. rx imports paramiko with invoke hidden and hands it to
    paramiko.config only when an ssh_config uses ``Match exec`` (see :func:`_lookup`).

    paramiko's ``__init__`` also asks ``importlib.metadata.version("paramiko")`` for its ``__version__``:
    importing importlib.metadata (email, zipfile, csv, ...) and searching ``sys.path`` for the
    distribution. Where nothing has loaded importlib.metadata yet, the import gets a stand-in that answers
    from the name of the one ``paramiko-VERSION.dist-info`` folder beside the package, the very folder
    importlib.metadata would read (see :func:`_metadata_stand_in`); ~20 ms of a first paramiko call on the
    test machine.
    """
    if "paramiko" in sys.modules:
        return
    hide = "invoke" not in sys.modules
    if hide:
        sys.modules["invoke"] = None  # type: ignore[assignment]  # makes `import invoke` fail at once
    stand_in = _metadata_stand_in()
    if stand_in is not None:
        sys.modules["importlib.metadata"] = stand_in
    try:
        import paramiko  # noqa: F401
    finally:
        if hide and "invoke" in sys.modules and sys.modules["invoke"] is None:
            del sys.modules["invoke"]
        if stand_in is not None and sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]


_DIST_INFO = re.compile(r"paramiko-([0-9][0-9A-Za-z.+!_-]*)\.dist-info")


def _metadata_stand_in() -> types.ModuleType | None:
    """A stand-in for importlib.metadata while paramiko is imported: its ``version("paramiko")`` is the
    version in the name of the only ``paramiko-*.dist-info`` folder in the directory paramiko is found
    in; anything else it is asked goes to the real module. None when importlib.metadata is loaded already
    or the folder is not exactly one (an egg, a system package, two versions half upgraded): the real
    one answers then."""
    if "importlib.metadata" in sys.modules:
        return None
    import importlib.util

    try:
        spec = importlib.util.find_spec("paramiko")
        if spec is None or spec.origin is None:
            return None
        folder = os.path.dirname(os.path.dirname(spec.origin))
        found = [match[1] for name in os.listdir(folder) if (match := _DIST_INFO.fullmatch(name))]
    except (ImportError, OSError, ValueError):
        return None
    if len(found) != 1:
        return None
    version = found[0]
    stand_in = types.ModuleType("importlib.metadata")

    def real() -> types.ModuleType:
        if sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]
        import importlib.metadata

        return importlib.metadata

    def version_of(name: str) -> str:
        return version if name == "paramiko" else str(real().version(name))

    stand_in.version = version_of  # type: ignore[attr-defined]
    stand_in.__getattr__ = lambda name: getattr(real(), name)  # type: ignore[method-assign]
    return stand_in


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
    class Config(paramiko.SSHConfig):
        def _tokenize(self, config: Any, target: str, key: str, value: str) -> Any:
            if key == "proxycommand":  # expanded in _proxy, with the HostSpec's overrides as ssh does
                return value
            return super()._tokenize(config, target, key, value)  # type: ignore[misc]

    try:
        return dict(Config.from_text(text).lookup(host))
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
