"""Testbed hosts: containers of the ``rx-testbed`` image, their ssh_config and their known_hosts.

A *state dir* owns a testbed: the key pair every container trusts, the ``ssh_config`` and ``known_hosts``
that reach them, and ``hosts.json``, the host keys recorded when each container first answered. Containers
carry the labels ``rx-testbed=1`` and ``rx-testbed.state=<hash of the state dir path>``, so a state dir
finds (and removes) exactly its own. Files in a state dir change under an exclusive lock
(``.lock``), so two processes working on one testbed do not lose each other's hosts.

known_hosts is written from ``hosts.json``, never re-read from a running container: after
:func:`regenerate_host_keys` the recorded key stays, and strict ssh refuses the host, as it must.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed._image import TestbedError, docker_client, ensure_image, file_lock

__all__ = [
    "LOGIN_VARIANTS",
    "Testbed",
    "TestbedHost",
    "default_state_dir",
    "down",
    "exec_root",
    "pause",
    "prune",
    "regenerate_host_keys",
    "remove_host",
    "set_gpus",
    "set_login",
    "start_foreign_process",
    "start_host",
    "status",
    "unpause",
    "up",
]

logger = logging.getLogger("testbed")

USER = "rx"
HOSTNAME = "127.0.0.1"
ALIAS_PREFIX = "rx-testbed-"

LABEL = "rx-testbed"
STATE_LABEL = "rx-testbed.state"
DIR_LABEL = "rx-testbed.dir"
ALIAS_LABEL = "rx-testbed.alias"
INDEX_LABEL = "rx-testbed.index"
NETWORK_LABEL = "rx-testbed.network"
KEY_LABEL = "rx-testbed.key"

SSHD_WAIT = 30.0
LOCK_WAIT = 120.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class TestbedHost:
    """One sshd container of a testbed, as ssh reaches it.

    Attributes:
        alias: The ``Host`` name in the testbed's ssh_config, e.g. ``rx-testbed-1``.
        hostname: Where the port is published: ``127.0.0.1``; a host started on its own network
            (``start_host(network=...)``): its address there.
        port: The host port Docker chose for the container's port 22.
        user: The login user inside the container, ``rx``.
        container_id: The full Docker container id.
        container_name: The Docker container name: the alias, plus a suffix naming the state dir when it is
            not the default one, so two state dirs never clash.
    """

    __test__ = False  # not a pytest test class, despite the name

    alias: str
    hostname: str
    port: int
    user: str
    container_id: str
    container_name: str


@dataclass(frozen=True)
class Testbed:
    """The running hosts of one state dir and the files that reach them.

    Attributes:
        hosts: Numbered hosts first (``rx-testbed-1``, ``-2``, ...), then hosts from :func:`start_host`
            by alias.
        state_dir: The directory holding the key pair, ssh_config and known_hosts.
        ssh_config: Pass it to ``ssh -F``; one ``Host`` block per host.
        known_hosts: The host keys of every host, as recorded when it first answered.
        identity_file: The private key every host accepts for the user ``rx``.
    """

    __test__ = False  # not a pytest test class, despite the name

    hosts: tuple[TestbedHost, ...]
    state_dir: Path
    ssh_config: Path
    known_hosts: Path
    identity_file: Path

    def host(self, index: int = 0) -> TestbedHost:
        """Return the host at ``index`` of :attr:`hosts` (0 is ``rx-testbed-1``).

        Raises:
            IndexError: The testbed has no host at that index.
        """
        try:
            return self.hosts[index]
        except IndexError:
            raise IndexError(f"the testbed has {len(self.hosts)} host(s), none at index {index}") from None


# --- state dir --------------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_state_dir() -> Path:
    """Return the state dir used when none is given: ``$RX_TESTBED_DIR``, else ``<repo root>/.testbed``."""
    env = os.environ.get("RX_TESTBED_DIR")
    return Path(env) if env else _repo_root() / ".testbed"


def _resolve(state_dir: Path | None) -> Path:
    return Path(state_dir if state_dir is not None else default_state_dir()).expanduser().resolve()


def _state_hash(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


def _container_name(alias: str, state_dir: Path) -> str:
    """Name a container: the alias alone for the repo's own ``.testbed``, else alias plus a state suffix."""
    if state_dir == (_repo_root() / ".testbed").resolve():
        return alias
    return f"{alias}-{_state_hash(state_dir)[:8]}"


@dataclass(frozen=True)
class _Paths:
    state_dir: Path

    @property
    def identity(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def public_key(self) -> Path:
        return self.state_dir / "id_ed25519.pub"

    @property
    def ssh_config(self) -> Path:
        return self.state_dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "known_hosts"

    @property
    def records(self) -> Path:
        return self.state_dir / "hosts.json"

    @property
    def lock(self) -> Path:
        return self.state_dir / ".lock"


@contextlib.contextmanager
def _locked(paths: _Paths) -> Iterator[None]:
    """Hold the state dir's exclusive lock, waiting at most :data:`LOCK_WAIT` seconds for it."""
    paths.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with file_lock(paths.lock, LOCK_WAIT):
        yield


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _ensure_keypair(paths: _Paths) -> str:
    """Make the state dir's ed25519 key pair at first use; return the public key line."""
    if not (paths.identity.is_file() and paths.public_key.is_file()):
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            raise TestbedError("ssh-keygen is missing: apt-get install -y openssh-client")
        for stale in (paths.identity, paths.public_key):
            stale.unlink(missing_ok=True)
        done = subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "rx-testbed", "-f", str(paths.identity)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise TestbedError(f"ssh-keygen failed: {done.stderr.strip()}")
        logger.info("generated the key pair %s", paths.identity)
    paths.identity.chmod(0o600)
    paths.public_key.chmod(0o600)
    return paths.public_key.read_text().strip()


def _key_tag(public_key: str) -> str:
    return hashlib.sha256(public_key.encode()).hexdigest()[:16]


def _quote_config(value: str) -> str:
    return f'"{value}"' if any(ch.isspace() for ch in value) else value


def _load_records(paths: _Paths) -> dict[str, dict[str, Any]]:
    try:
        loaded = json.loads(paths.records.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_files(paths: _Paths, hosts: list[TestbedHost], records: dict[str, dict[str, Any]]) -> None:
    """Write ssh_config, known_hosts and hosts.json for ``hosts`` from their recorded host keys."""
    blocks = ["# Written by the rx testbed (python -m testbed); rewritten on every up, start_host and remove.\n"]
    known: list[str] = []
    for host in hosts:
        blocks.append(
            f"Host {host.alias}\n"
            f"    HostName {host.hostname}\n"
            f"    Port {host.port}\n"
            f"    User {host.user}\n"
            f"    IdentityFile {_quote_config(str(paths.identity))}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {_quote_config(str(paths.known_hosts))}\n"
            f"    StrictHostKeyChecking accept-new\n"
            f"    LogLevel ERROR\n"
        )
        known.extend(f"[{host.hostname}]:{host.port} {key}" for key in records[host.container_id]["host_keys"])
    _write_atomic(paths.records, json.dumps(records, indent=2, sort_keys=True) + "\n")
    _write_atomic(paths.known_hosts, "".join(f"{line}\n" for line in known))
    _write_atomic(paths.ssh_config, "\n".join(blocks))


# --- containers -------------------------------------------------------------------------------------------


def _published_port(container: Any) -> int | None:
    bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get("22/tcp") or []
    for binding in bindings:
        if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
            return int(binding["HostPort"])
    return None


def _sort_key(host: TestbedHost) -> tuple[int, int, str]:
    suffix = host.alias[len(ALIAS_PREFIX) :]
    if host.alias.startswith(ALIAS_PREFIX) and suffix.isdigit():
        return (0, int(suffix), host.alias)
    return (1, 0, host.alias)


def _network_address(container: Any) -> str | None:
    """The address of a container started on its own network (``start_host(network=...)``)."""
    network = container.labels.get(NETWORK_LABEL)
    if not network:
        return None
    found = (container.attrs.get("NetworkSettings", {}).get("Networks") or {}).get(network) or {}
    return found.get("IPAddress") or None


def _host_of(container: Any) -> TestbedHost | None:
    port = _published_port(container)
    hostname = HOSTNAME
    if port is None:
        address = _network_address(container)
        if address is None:
            return None
        hostname, port = address, 22
    labels = container.labels
    return TestbedHost(
        alias=labels.get(ALIAS_LABEL, container.name),
        hostname=hostname,
        port=port,
        user=USER,
        container_id=container.id,
        container_name=container.name,
    )


def _own_containers(client: Any, state_dir: Path) -> list[Any]:
    filters = {"label": [f"{LABEL}=1", f"{STATE_LABEL}={_state_hash(state_dir)}"]}
    return list(client.containers.list(all=True, filters=filters, ignore_removed=True))


def _read_banner(port: int, timeout: float, hostname: str = HOSTNAME) -> str:
    """Connect to ``hostname:port`` and return the first bytes sshd sends (its version banner)."""
    with socket.create_connection((hostname, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) < 256:
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode("latin-1").strip()


def _sshd_answers(port: int, timeout: float = 3.0) -> bool:
    try:
        return _read_banner(port, timeout).startswith("SSH-2.0")
    except OSError:
        return False


def _wait_for_sshd(container: Any, port: int, timeout: float = SSHD_WAIT, hostname: str = HOSTNAME) -> None:
    """Wait until sshd of ``container`` sends its banner on ``port``.

    Docker's port proxy accepts a connection before sshd listens, so a connect alone proves nothing: the
    banner does.

    Raises:
        TestbedError: The container stopped, or no banner came within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        try:
            banner = _read_banner(port, 2.0, hostname)
            if banner.startswith("SSH-2.0"):
                return
            last = f"answered {banner!r}"
        except OSError as exc:
            last = str(exc)
        container.reload()
        if container.status not in ("running", "created"):
            logs = container.logs(tail=20).decode(errors="replace").strip()
            raise TestbedError(f"container {container.name} is {container.status}; its log:\n{logs}")
        if time.monotonic() > deadline:
            logs = container.logs(tail=20).decode(errors="replace").strip()
            raise TestbedError(
                f"sshd of {container.name} did not answer on {hostname}:{port} within {timeout:.0f} s "
                f"({last}); its log:\n{logs}"
            )
        time.sleep(0.1)


def _run_container(
    client: Any,
    image: str,
    paths: _Paths,
    alias: str,
    public_key: str,
    *,
    index: int | None = None,
    mem_limit: str | None = None,
    tmpfs: dict[str, str] | None = None,
    network: str | None = None,
) -> Any:
    """Start one container of the testbed image for ``alias``, its port 22 published on 127.0.0.1 (on
    ``network``: reached at its address there, nothing published)."""
    import docker

    labels = {
        LABEL: "1",
        STATE_LABEL: _state_hash(paths.state_dir),
        DIR_LABEL: str(paths.state_dir),
        ALIAS_LABEL: alias,
        KEY_LABEL: _key_tag(public_key),
    }
    if index is not None:
        labels[INDEX_LABEL] = str(index)
    name = _container_name(alias, paths.state_dir)
    options: dict[str, Any] = {}
    if mem_limit is not None:
        options["mem_limit"] = mem_limit
    if tmpfs:
        options["tmpfs"] = dict(tmpfs)
    if network is not None:
        labels[NETWORK_LABEL] = network
        options["network"] = network
    else:
        options["ports"] = {"22/tcp": (HOSTNAME, None)}
    try:
        container = client.containers.run(
            image,
            detach=True,
            name=name,
            hostname=alias,
            labels=labels,
            environment={"RX_AUTHORIZED_KEY": public_key},
            init=True,
            **options,
        )
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise TestbedError(
                f"the container name {name} is taken by a container of another state dir; remove it with "
                f"`docker rm -f {name}` or `python -m testbed down --state-dir <its dir>`"
            ) from exc
        raise TestbedError(f"starting container {name} failed: {exc.explanation or exc}") from exc
    logger.info("started %s (%s)", name, container.short_id)
    return container


def _port_of_new(container: Any) -> int:
    for _ in range(50):
        container.reload()
        port = _published_port(container)
        if port is not None:
            return port
        time.sleep(0.1)
    raise TestbedError(f"Docker published no port for {container.name}")


def _read_host_keys(container: Any) -> list[str]:
    """Return ``keytype base64`` for every host key sshd of ``container`` offers."""
    code, output = container.exec_run(["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"], user="root")
    text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
    if code != 0:
        raise TestbedError(f"reading the host keys of {container.name} failed (exit {code}): {text.strip()}")
    keys = [" ".join(line.split()[:2]) for line in text.splitlines() if len(line.split()) >= 2]
    if not keys:
        raise TestbedError(f"container {container.name} has no host keys")
    return keys


def _sync(client: Any, paths: _Paths) -> Testbed:
    """Record new containers' host keys and rewrite the state dir's files from the live containers.

    Call with the lock held. A container's keys are read once, when it is first seen; later its record is
    kept as is, so a changed key is never silently trusted.
    """
    records = _load_records(paths)
    fresh: dict[str, dict[str, Any]] = {}
    hosts: list[TestbedHost] = []
    for container in _own_containers(client, paths.state_dir):
        if container.status not in ("running", "paused"):
            continue
        host = _host_of(container)
        if host is None:
            continue
        record = records.get(container.id)
        if record is None or record.get("port") != host.port:
            if container.status != "running":
                continue
            _wait_for_sshd(container, host.port, hostname=host.hostname)
            record = {
                "alias": host.alias,
                "container_name": host.container_name,
                "port": host.port,
                "host_keys": _read_host_keys(container),
            }
        fresh[container.id] = record
        hosts.append(host)
    hosts.sort(key=_sort_key)
    _write_files(paths, hosts, fresh)
    return _testbed(paths, hosts)


def _testbed(paths: _Paths, hosts: list[TestbedHost]) -> Testbed:
    return Testbed(
        hosts=tuple(hosts),
        state_dir=paths.state_dir,
        ssh_config=paths.ssh_config,
        known_hosts=paths.known_hosts,
        identity_file=paths.identity,
    )


def _container(client: Any, host: TestbedHost) -> Any:
    import docker

    try:
        return client.containers.get(host.container_id)
    except docker.errors.NotFound as exc:
        raise TestbedError(f"container {host.container_name} ({host.container_id[:12]}) is gone") from exc


def _unfit(container: Any, index: int, wanted: int, image_id: str, key_tag: str) -> str | None:
    """Say why :func:`up` must replace a numbered container, or return None when it can stay."""
    if index > wanted:
        return f"only {wanted} host(s) wanted"
    if container.status != "running":
        return str(container.status)
    if container.attrs.get("Image") != image_id:
        return "made from an older image"
    if container.labels.get(KEY_LABEL) != key_tag:
        return "trusts another key"
    port = _published_port(container)
    if port is None or not _sshd_answers(port):
        return "sshd does not answer"
    return None


# --- public API -------------------------------------------------------------------------------------------


def up(hosts: int = 1, *, state_dir: Path | None = None) -> Testbed:
    """Start ``hosts`` numbered sshd containers (``rx-testbed-1`` .. ``-N``) and write the state dir's files.

    Idempotent: healthy containers on the current image and key are kept, missing or broken ones are
    (re)created, numbered ones beyond ``hosts`` are removed. Builds the image first when needed.

    Args:
        hosts: How many numbered hosts to have.
        state_dir: The testbed's state dir; by default :func:`default_state_dir`.

    Returns:
        The testbed, every host answering ssh.

    Raises:
        TestbedError: Docker is unusable, the image could not be built or a host did not come up.
        ValueError: ``hosts`` is below 1.
    """
    if hosts < 1:
        raise ValueError(f"hosts must be at least 1, not {hosts}")
    paths = _Paths(_resolve(state_dir))
    image = ensure_image()
    prune()
    with docker_client() as client, _locked(paths):
        public_key = _ensure_keypair(paths)
        image_id = client.images.get(image).id
        key_tag = _key_tag(public_key)
        numbered: dict[int, Any] = {}
        for container in _own_containers(client, paths.state_dir):
            index_label = container.labels.get(INDEX_LABEL, "")
            if not index_label.isdigit():
                continue
            index = int(index_label)
            why = _unfit(container, index, hosts, image_id, key_tag)
            if why is None:
                numbered[index] = container
            else:
                logger.info("removing %s (%s)", container.name, why)
                container.remove(force=True)
        started = []
        for index in range(1, hosts + 1):
            if index not in numbered:
                started.append(_run_container(client, image, paths, f"{ALIAS_PREFIX}{index}", public_key, index=index))
        for container in started:
            _wait_for_sshd(container, _port_of_new(container))
        testbed = _sync(client, paths)
    logger.info("%d host(s) up; ssh_config: %s", len(testbed.hosts), testbed.ssh_config)
    return testbed


def prune() -> int:
    """Remove testbed containers whose state dir no longer exists (left by a killed pytest session).

    Without its state dir nobody holds the key to such a container, so nothing can still be using it.
    :func:`up` calls this first.

    Returns:
        How many containers were removed.
    """
    import docker

    removed = 0
    with docker_client() as client:
        for container in client.containers.list(all=True, filters={"label": f"{LABEL}=1"}, ignore_removed=True):
            state_dir = container.labels.get(DIR_LABEL)
            if state_dir and not Path(state_dir).exists():
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True)
                    logger.info("removed %s: its state dir %s is gone", container.name, state_dir)
                    removed += 1
    return removed


def down(*, state_dir: Path | None = None) -> int:
    """Remove every container of the state dir and its ssh_config, known_hosts and hosts.json.

    The key pair stays, so the next :func:`up` reuses it. Containers of other state dirs are untouched.

    Returns:
        How many containers were removed.
    """
    paths = _Paths(_resolve(state_dir))
    with docker_client() as client:
        lock = _locked(paths) if paths.state_dir.is_dir() else contextlib.nullcontext()
        with lock:
            removed = 0
            for container in _own_containers(client, paths.state_dir):
                container.remove(force=True)
                logger.info("removed %s", container.name)
                removed += 1
            for path in (paths.ssh_config, paths.known_hosts, paths.records):
                path.unlink(missing_ok=True)
    return removed


def status(*, state_dir: Path | None = None) -> Testbed | None:
    """Describe the running containers of a state dir without changing anything.

    Returns:
        The testbed, or None when the state dir has no running container.
    """
    paths = _Paths(_resolve(state_dir))
    with docker_client() as client:
        hosts = [
            host
            for container in _own_containers(client, paths.state_dir)
            if container.status in ("running", "paused") and (host := _host_of(container)) is not None
        ]
    if not hosts:
        return None
    hosts.sort(key=_sort_key)
    return _testbed(paths, hosts)


def start_host(
    testbed_state_dir: Path,
    name: str,
    *,
    mem_limit: str | None = None,
    tmpfs: dict[str, str] | None = None,
    login: str | None = None,
    network: str | None = None,
) -> TestbedHost:
    """Start a dedicated host for a destructive test and add it to the state dir's files as ``name``.

    It has the same image, key and labels as the numbered hosts, so :func:`down` removes it too.

    Args:
        testbed_state_dir: The state dir of the testbed it joins.
        name: Its alias in ssh_config; the container is named after it (plus the state dir suffix).
        mem_limit: A Docker memory limit such as ``"64m"``, for out-of-memory tests.
        tmpfs: Mounts such as ``{"/home/rx/.cache": "size=1m"}``, for disk-full tests.
        login: A key of :data:`LOGIN_VARIANTS`: the user's login behaves as on such a lab server.
        network: A Docker network to start it on instead of publishing its port (an ``--internal`` one:
            an air-gapped host, reached at its address there).

    Raises:
        TestbedError: The name is invalid or taken, or the host did not come up.
    """
    if not _NAME_RE.fullmatch(name):
        raise TestbedError(f"invalid host name {name!r}: letters, digits, '.', '_', '-', at most 63")
    paths = _Paths(_resolve(testbed_state_dir))
    image = ensure_image()
    with docker_client() as client, _locked(paths):
        public_key = _ensure_keypair(paths)
        for container in _own_containers(client, paths.state_dir):
            if container.labels.get(ALIAS_LABEL) == name:
                raise TestbedError(f"the testbed in {paths.state_dir} already has a host {name!r}")
        container = _run_container(client, image, paths, name, public_key, mem_limit=mem_limit, tmpfs=tmpfs,
                                   network=network)
        try:
            if network is None:
                _wait_for_sshd(container, _port_of_new(container))
            else:
                container.reload()
                _wait_for_sshd(container, 22, hostname=_network_address(container) or HOSTNAME)
            testbed = _sync(client, paths)
        except BaseException:
            container.remove(force=True)
            raise
    for host in testbed.hosts:
        if host.container_id == container.id:
            if login is not None:
                set_login(host, login)
            return host
    raise TestbedError(f"host {name} vanished while it started")


# What real lab servers do at login, as shell scripts run as root in a host (the image stays the same for
# both of its build paths). ``noisy``: ~/.bashrc prints a banner (stdout, no final newline too, and stderr)
# before its non-interactive return, and Python's user site holds a usercustomize.py that prints at start
# and at exit and a .pth file that prints. ``exec-dash``: ~/.bashrc replaces the shell (as ``exec zsh``
# does), so bash never runs the command sshd gave it.
_USER_SITE = "$(runuser -u rx -- python3 -I -c 'import site; print(site.getusersitepackages())')"
LOGIN_VARIANTS: dict[str, str] = {
    "plain": "cp /etc/skel/.bashrc /home/rx/.bashrc; rm -rf /home/rx/.local",
    "noisy": (
        "{ echo 'echo \"Welcome to $(hostname): /home is 93% full\"';"
        "  echo 'printf \"conda: (base) activated\"';"
        "  echo 'echo \"module: gcc/12 loaded\" >&2';"
        "  cat /etc/skel/.bashrc; } > /home/rx/.bashrc;"
        f" site={_USER_SITE}; mkdir -p \"$site\";"
        " printf '%s\\n' 'import atexit' 'print(\"usercustomize: hello\")'"
        "  'atexit.register(print, \"usercustomize: bye\")' > \"$site/usercustomize.py\";"
        " printf '%s\\n' 'import sys; sys.stdout.write(\"pth: hello\\n\"); sys.stdout.flush()'"
        "  > \"$site/zz-noisy.pth\";"
        " chown -R rx:rx /home/rx"
    ),
    "exec-dash": "{ echo 'exec /bin/dash'; cat /etc/skel/.bashrc; } > /home/rx/.bashrc; chown rx:rx /home/rx/.bashrc",
}


def set_login(host: TestbedHost, variant: str) -> None:
    """Make the login of the user ``rx`` on ``host`` behave as one of :data:`LOGIN_VARIANTS` (``plain``
    undoes the others).

    Raises:
        TestbedError: No such variant, or it could not be set up.
    """
    if variant not in LOGIN_VARIANTS:
        raise TestbedError(f"no login variant {variant!r}; there are {', '.join(LOGIN_VARIANTS)}")
    code, output = exec_root(host, LOGIN_VARIANTS[variant], timeout=30)
    if code != 0:
        raise TestbedError(f"setting up the {variant} login on {host.alias} failed (exit {code}): {output.strip()}")


def remove_host(host: TestbedHost) -> None:
    """Remove ``host``'s container and drop it from its state dir's ssh_config and known_hosts.

    Removing a host that is already gone does nothing.
    """
    import docker

    with docker_client() as client:
        try:
            container = client.containers.get(host.container_id)
        except docker.errors.NotFound:
            logger.debug("%s is already gone", host.container_name)
            return
        state_dir = container.labels.get(DIR_LABEL)
        container.remove(force=True)
        logger.info("removed %s", host.container_name)
        if state_dir:
            paths = _Paths(Path(state_dir))
            if paths.state_dir.is_dir():
                with _locked(paths):
                    _sync(client, paths)


def exec_root(host: TestbedHost, command: str, *, timeout: float = 30) -> tuple[int, str]:
    """Run a shell command as root inside ``host``'s container (``docker exec``).

    Args:
        host: The host.
        command: A ``sh -c`` command line.
        timeout: Seconds the command may run; it is killed after that.

    Returns:
        The exit status and the output, stdout and stderr merged. A command that stops the container
        (killing sshd does) may see its own exec killed with it: status 137, or -1 when Docker reports none.

    Raises:
        TestbedError: The container is gone or paused, or the command ran past ``timeout``.
    """
    import docker

    argv = ["timeout", "-k", "2", f"{timeout:g}", "sh", "-c", command]
    outcome: list[tuple[int, bytes] | BaseException] = []
    started = time.monotonic()

    with docker_client(timeout=timeout + 30) as client:
        container = _container(client, host)

        def run() -> None:
            try:
                result = container.exec_run(argv, user="root")
                code = -1 if result.exit_code is None else int(result.exit_code)
                outcome.append((code, bytes(result.output or b"")))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, name=f"rx-testbed-exec-{host.alias}", daemon=True)
        worker.start()
        worker.join(timeout + 15)
    if not outcome:
        raise TestbedError(f"docker exec on {host.alias} did not return within {timeout + 15:g} s")
    result = outcome[0]
    if isinstance(result, docker.errors.APIError):
        raise TestbedError(f"docker exec on {host.alias} failed: {result.explanation or result}") from result
    if isinstance(result, BaseException):
        raise TestbedError(f"docker exec on {host.alias} failed: {result}") from result
    code, output = result
    if code in (124, 137) and time.monotonic() - started >= timeout:
        raise TestbedError(f"command on {host.alias} ran past {timeout:g} s: {command}")
    return code, output.decode(errors="replace")


GPU_CONFIG = "/etc/rx-testbed/gpus.json"
"""Where the image's fake ``nvidia-smi`` reads the GPUs it reports (testbed/image/nvidia-smi)."""


def set_gpus(host: TestbedHost, gpus: int | list[dict[str, Any]] | None,
             processes: list[dict[str, Any]] | None = None) -> None:
    """Give ``host``'s fake ``nvidia-smi`` these GPUs and GPU processes (None: no GPUs, as without a driver).

    Args:
        host: The host.
        gpus: How many idle 40 GiB GPUs, or their records (``name``, ``memory_total``, ``memory_used``,
            ``utilization``, ``uuid``: see the script), or None.
        processes: Processes using them: ``{"gpu": index, "pid": pid, "used_memory": MiB, "name": ...}``
            (a pid that does not run on the host is not shown).
    """
    if gpus is None:
        command = f"rm -f {GPU_CONFIG}"
    else:
        records = [{} for _ in range(gpus)] if isinstance(gpus, int) else list(gpus)
        text = json.dumps({"gpus": records, "processes": list(processes or [])})
        command = f"printf '%s' {shlex.quote(text)} > {GPU_CONFIG}.tmp && mv {GPU_CONFIG}.tmp {GPU_CONFIG}"
    code, output = exec_root(host, command)
    if code != 0:
        raise TestbedError(f"setting the GPUs of {host.alias} failed (exit {code}): {output.strip()}")


def start_foreign_process(host: TestbedHost) -> int:
    """Start a long ``sleep`` as root on ``host`` (a process rx did not start, to list as a GPU's user);
    return its pid. It ends with the container."""
    code, output = exec_root(host, "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!")
    if code != 0 or not output.strip().isdigit():
        raise TestbedError(f"starting a process on {host.alias} failed (exit {code}): {output.strip()}")
    return int(output.strip())


def pause(host: TestbedHost) -> None:
    """Freeze every process of ``host`` (``docker pause``): connections hang, nothing is refused."""
    _change_state(host, "pause")


def unpause(host: TestbedHost) -> None:
    """Resume a host frozen by :func:`pause`."""
    _change_state(host, "unpause")


def _change_state(host: TestbedHost, action: str) -> None:
    import docker

    want = "paused" if action == "pause" else "running"
    with docker_client(timeout=30) as client:
        container = _container(client, host)
        try:
            getattr(container, action)()
        except docker.errors.APIError as exc:
            raise TestbedError(f"docker {action} {host.container_name} failed: {exc.explanation}") from exc
        container.reload()
        if container.status != want:
            raise TestbedError(f"{host.container_name} is {container.status} after docker {action}")


# Runs inside the container: new host keys, SIGHUP to sshd (it re-executes itself and loads them), then
# wait until the listening socket is a new one, i.e. the restarted sshd is accepting.
_REGENERATE = r"""
import glob, os, signal, subprocess, sys, time

def listening():
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":0016") and fields[3] == "0A":
                return fields[9]
    return None

before = listening()
for path in glob.glob("/etc/ssh/ssh_host_*"):
    os.remove(path)
subprocess.run(["ssh-keygen", "-A"], check=True, stdout=subprocess.DEVNULL)
with open("/run/sshd.pid") as handle:
    os.kill(int(handle.read().strip()), signal.SIGHUP)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    now = listening()
    if now is not None and now != before:
        sys.exit(0)
    time.sleep(0.05)
print("sshd did not listen again within 20 s", file=sys.stderr)
sys.exit(3)
"""


def regenerate_host_keys(host: TestbedHost) -> None:
    """Give ``host`` new host keys and restart its sshd with them.

    known_hosts keeps the old keys on purpose: afterwards, strict host-key checking must refuse the host.

    Raises:
        TestbedError: The keys could not be made or sshd did not come back within 30 s.
    """
    code, output = exec_root(host, f"python3 -c {shlex.quote(_REGENERATE)}", timeout=30)
    if code != 0:
        raise TestbedError(f"regenerating the host keys of {host.alias} failed (exit {code}): {output.strip()}")
    with docker_client(timeout=30) as client:
        _wait_for_sshd(_container(client, host), host.port)
    logger.info("%s has new host keys", host.alias)
