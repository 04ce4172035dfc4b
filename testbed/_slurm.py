"""A real Slurm cluster in Docker for rx's scheduler tests (not a mock).

Three containers of the image ``rx-slurm:latest`` on a user-defined network of their own:

* ``head``: the login node and controller: slurmctld, slurmdbd with MariaDB (so ``sacct`` answers), sshd
  (its port 22 published on 127.0.0.1; the user ``rx`` logs in by key);
* ``c1``, ``c2``: compute nodes running slurmd.

They share a named volume as ``/home`` (rx's workdir, ``~/.cache/remote_exec``, is on the shared
filesystem, as on a real cluster) and one munge key baked into the image. There is no systemd: the entry
point starts munged and the daemons of the node's role, and ``docker run --init`` reaps what they leave.
``--cap-add SYS_PTRACE`` lets jobacct_gather read the tasks' memory (MaxRSS); without it the field is
empty. The settings in ``testbed/slurm/slurm.conf`` make scheduling fast (submit to RUNNING in about a
second), let a killed node come back by itself (``ReturnToService=2``), requeue jobs only when they ask
(``JobRequeue=0``) and preempt the ``debug`` partition's jobs for the ``urgent`` one's
(``PreemptMode=CANCEL``, which gives PREEMPTED).

The image is built on top of the sshd testbed's (``rx-testbed:latest``, itself built from a debootstrap
base or ``FROM debian:bookworm-slim`` where a registry answers) with Debian bookworm's Slurm 22.05 and
munge packages. A *state dir* holds the key pair, an ``ssh_config`` with ``Host rx-slurm`` and a
``known_hosts`` with the head's keys::

    python -m testbed slurm-up
    ssh -F .testbed-slurm/ssh_config rx-slurm sinfo
    python -m testbed slurm-down
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed._image import BUILD_TIMEOUT, IMAGE, TestbedError, docker_build, docker_client, ensure_image, file_lock

__all__ = ["SLURM_IMAGE", "SlurmCluster", "default_slurm_state_dir", "ensure_slurm_image", "slurm_down",
           "slurm_status", "slurm_up"]

logger = logging.getLogger("testbed")

SLURM_IMAGE = "rx-slurm:latest"
"""The image of every node of the Slurm testbed."""

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
NODES = ("head", "c1", "c2")
ALIAS = "rx-slurm"
USER = "rx"
HOSTNAME = "127.0.0.1"

_LABEL = "rx-slurm"
_STATE_LABEL = "rx-slurm.state"
_DIR_LABEL = "rx-slurm.dir"
_NODE_LABEL = "rx-slurm.node"
_RECIPE_LABEL = "rx-slurm.recipe"
_ASSETS = Path(__file__).resolve().parent / "slurm"
_ASSET_FILES = ("slurm.conf", "slurmdbd.conf", "entrypoint.sh")
READY_TIMEOUT = 90.0

_DOCKERFILE = f"""\
FROM {IMAGE}
RUN set -eux; \\
    apt-get update; \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {" ".join(PACKAGES)}; \\
    rm -rf /var/lib/apt/lists/*; \\
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; \\
    chown munge:munge /etc/munge/munge.key; \\
    chmod 400 /etc/munge/munge.key
COPY slurm.conf /etc/slurm/slurm.conf
COPY slurmdbd.conf /etc/slurm/slurmdbd.conf
COPY entrypoint.sh /usr/local/bin/rx-slurm-entrypoint
RUN chmod 644 /etc/slurm/slurm.conf; \\
    chown slurm:slurm /etc/slurm/slurmdbd.conf; \\
    chmod 600 /etc/slurm/slurmdbd.conf; \\
    chmod 755 /usr/local/bin/rx-slurm-entrypoint
ENTRYPOINT ["/usr/local/bin/rx-slurm-entrypoint"]
"""


@dataclass(frozen=True)
class SlurmCluster:
    """The running Slurm testbed of one state dir.

    Attributes:
        state_dir: Holds the key pair, ``ssh_config`` and ``known_hosts``.
        ssh_config: Has one ``Host rx-slurm`` block: the login node.
        known_hosts: The login node's host keys.
        identity_file: The key the user ``rx`` logs in with.
        alias: The login node's alias in ``ssh_config``.
        port: The login node's sshd port on 127.0.0.1.
        containers: Container name by node name (``head``, ``c1``, ``c2``).
    """

    __test__ = False  # not a pytest test class

    state_dir: Path
    ssh_config: Path
    known_hosts: Path
    identity_file: Path
    alias: str
    port: int
    containers: dict[str, str]

    def exec(self, node: str, command: str, *, user: str = USER, timeout: float = 60) -> tuple[int, str]:
        """Run ``sh -c command`` on ``node`` (as ``user``) through ``docker exec``; return status and output."""
        with docker_client(timeout=timeout + 30) as client:
            container = client.containers.get(self.containers[node])
            result = container.exec_run(["timeout", f"{timeout:g}", "sh", "-c", command], user=user,
                                        workdir="/home/rx" if user == USER else "/")
        return int(result.exit_code if result.exit_code is not None else -1), result.output.decode(errors="replace")

    def kill(self, node: str) -> None:
        """``docker kill`` a node: its jobs end as NODE_FAIL once the controller notices (10-25 s)."""
        with docker_client() as client:
            client.containers.get(self.containers[node]).kill()

    def start(self, node: str) -> None:
        """Start a killed node again; its slurmd registers and it returns to service by itself."""
        with docker_client() as client:
            client.containers.get(self.containers[node]).start()

    def wait_idle(self, nodes: tuple[str, ...] = ("c1", "c2"), timeout: float = READY_TIMEOUT) -> None:
        """Wait until every one of ``nodes`` is idle (or mixed) in ``sinfo``.

        Raises:
            TestbedError: They were not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        output = ""
        while time.monotonic() < deadline:
            code, output = self.exec("head", "sinfo -h -N -o '%N %T'", timeout=20)
            states = dict(line.split()[:2] for line in output.splitlines() if len(line.split()) >= 2)
            if code == 0 and all(states.get(node, "").rstrip("*") in ("idle", "mixed", "allocated")
                                 and not states[node].endswith("*") for node in nodes):
                return
            time.sleep(0.5)
        raise TestbedError(f"the Slurm nodes {', '.join(nodes)} were not idle within {timeout:.0f} s: {output.strip()}")


def default_slurm_state_dir() -> Path:
    """``$RX_SLURM_TESTBED_DIR``, else ``<repo root>/.testbed-slurm``."""
    env = os.environ.get("RX_SLURM_TESTBED_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".testbed-slurm"


def _recipe_hash(base_id: str) -> str:
    digest = hashlib.sha256(_DOCKERFILE.encode() + base_id.encode())
    for name in _ASSET_FILES:
        digest.update(b"\0" + name.encode() + b"\0" + (_ASSETS / name).read_bytes())
    return digest.hexdigest()[:16]


def ensure_slurm_image(*, log: Callable[[str], None] | None = None) -> str:
    """Make sure :data:`SLURM_IMAGE` exists for the current recipe and base image; build it when not
    (about 20 s on top of the sshd testbed's image, which is built first when needed).

    Raises:
        TestbedError: Docker is unusable or the build failed.
    """
    say: Callable[[str], None] = log if log is not None else logger.info
    ensure_image(log=log)
    with docker_client(timeout=600) as client:
        recipe = _recipe_hash(client.images.get(IMAGE).id)
        if _image_recipe(client) == recipe:
            return SLURM_IMAGE
        with file_lock(Path(tempfile.gettempdir()) / "rx-slurm-image.lock", BUILD_TIMEOUT):
            if _image_recipe(client) != recipe:
                _build(client, recipe, say)
    return SLURM_IMAGE


def _image_recipe(client: Any) -> str | None:
    import docker

    try:
        labels = client.images.get(SLURM_IMAGE).attrs.get("Config", {}).get("Labels") or {}
    except docker.errors.ImageNotFound:
        return None
    value = labels.get(_RECIPE_LABEL)
    return value if isinstance(value, str) else None


def _build(client: Any, recipe: str, say: Callable[[str], None]) -> None:
    say(f"building {SLURM_IMAGE} (Slurm 22.05 and munge from Debian bookworm)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rx-slurm-build-") as context:
        (Path(context) / "Dockerfile").write_text(_DOCKERFILE)
        for name in _ASSET_FILES:
            shutil.copyfile(_ASSETS / name, Path(context) / name)
        docker_build(client, Path(context), SLURM_IMAGE, {_RECIPE_LABEL: recipe})
    say(f"{SLURM_IMAGE} is ready ({time.monotonic() - started:.0f} s)")


# --- the cluster --------------------------------------------------------------------------------------------


def _state_hash(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]


def _names(state_dir: Path) -> tuple[str, str, dict[str, str]]:
    """(network, volume, container name by node) of a state dir's cluster."""
    suffix = _state_hash(state_dir)
    return (f"rx-slurm-{suffix}", f"rx-slurm-home-{suffix}",
            {node: f"rx-slurm-{node}-{suffix}" for node in NODES})


def _keypair(state_dir: Path) -> str:
    identity = state_dir / "id_ed25519"
    if not (identity.is_file() and identity.with_suffix(".pub").is_file()):
        for stale in (identity, identity.with_suffix(".pub")):
            stale.unlink(missing_ok=True)
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            raise TestbedError("ssh-keygen is missing: apt-get install -y openssh-client")
        done = subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "rx-slurm", "-f", str(identity)],
                              capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise TestbedError(f"ssh-keygen failed: {done.stderr.strip()}")
    identity.chmod(0o600)
    return identity.with_suffix(".pub").read_text().strip()


def _published_port(container: Any) -> int | None:
    for binding in (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get("22/tcp") or []:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    return None


def _sshd_answers(port: int) -> bool:
    try:
        with socket.create_connection((HOSTNAME, port), timeout=2) as conn:
            conn.settimeout(2)
            return conn.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


def _run_node(client: Any, node: str, names: tuple[str, str, dict[str, str]], state_dir: Path,
              public_key: str) -> Any:
    network, volume, containers = names
    labels = {_LABEL: "1", _STATE_LABEL: _state_hash(state_dir), _DIR_LABEL: str(state_dir), _NODE_LABEL: node}
    options: dict[str, Any] = {}
    if node == "head":
        options["ports"] = {"22/tcp": (HOSTNAME, None)}
        options["environment"] = {"RX_AUTHORIZED_KEY": public_key}  # read by the sshd testbed's entry point
    container = client.containers.create(
        SLURM_IMAGE, command=["head" if node == "head" else "compute"], name=containers[node], hostname=node,
        labels=labels, volumes={volume: {"bind": "/home", "mode": "rw"}}, init=True, cap_add=["SYS_PTRACE"],
        detach=True, **options)
    client.networks.get(network).connect(container, aliases=[node])
    container.start()
    return container


def _own(client: Any, state_dir: Path) -> list[Any]:
    filters = {"label": [f"{_LABEL}=1", f"{_STATE_LABEL}={_state_hash(state_dir)}"]}
    return list(client.containers.list(all=True, filters=filters, ignore_removed=True))


def _healthy(client: Any, state_dir: Path) -> dict[str, Any] | None:
    """The state dir's running nodes, if all three are there on the current image and sshd answers."""
    image_id = client.images.get(SLURM_IMAGE).id
    nodes = {c.labels.get(_NODE_LABEL): c for c in _own(client, state_dir)}
    if set(nodes) != set(NODES) or any(c.status != "running" or c.attrs.get("Image") != image_id
                                       for c in nodes.values()):
        return None
    port = _published_port(nodes["head"])
    return nodes if port is not None and _sshd_answers(port) else None


def _write_access(state_dir: Path, port: int, host_keys: list[str]) -> tuple[Path, Path]:
    ssh_config, known_hosts = state_dir / "ssh_config", state_dir / "known_hosts"
    known_hosts.write_text("".join(f"[{HOSTNAME}]:{port} {key}\n" for key in host_keys))
    ssh_config.write_text(
        "# Written by the rx Slurm testbed (python -m testbed slurm-up).\n"
        f"Host {ALIAS}\n    HostName {HOSTNAME}\n    Port {port}\n    User {USER}\n"
        f"    IdentityFile \"{state_dir / 'id_ed25519'}\"\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile \"{known_hosts}\"\n    StrictHostKeyChecking yes\n    LogLevel ERROR\n")
    return ssh_config, known_hosts


def slurm_up(state_dir: Path | None = None, *, log: Callable[[str], None] | None = None) -> SlurmCluster:
    """Start the three-node Slurm cluster of ``state_dir`` (idempotent: a healthy one is kept) and wait
    until both compute nodes are idle.

    Raises:
        TestbedError: Docker is unusable, the image could not be built or the cluster did not come up.
    """
    state = Path(state_dir or default_slurm_state_dir()).expanduser().resolve()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_slurm_image(log=log)
    names = _names(state)
    with docker_client(timeout=120) as client, file_lock(state / ".lock", 300):
        _prune(client)
        public_key = _keypair(state)
        nodes = _healthy(client, state)
        if nodes is None:
            _remove(client, state)
            client.networks.create(names[0], driver="bridge", labels={_LABEL: "1", _DIR_LABEL: str(state)})
            client.volumes.create(names[1], labels={_LABEL: "1", _DIR_LABEL: str(state)})
            nodes = {node: _run_node(client, node, names, state, public_key) for node in NODES}
        head = nodes["head"]
        port = _wait_for_port(head)
        code, output = head.exec_run(["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"], user="root")
        keys = [" ".join(line.split()[:2]) for line in output.decode().splitlines() if len(line.split()) >= 2]
        if code != 0 or not keys:
            raise TestbedError(f"reading the login node's host keys failed: {output.decode(errors='replace')}")
        ssh_config, known_hosts = _write_access(state, port, keys)
    cluster = SlurmCluster(state_dir=state, ssh_config=ssh_config, known_hosts=known_hosts,
                           identity_file=state / "id_ed25519", alias=ALIAS, port=port,
                           containers=dict(names[2]))
    cluster.wait_idle()
    (state / "cluster.json").write_text(json.dumps({"port": port, "containers": names[2]}, indent=2) + "\n")
    return cluster


def _wait_for_port(head: Any) -> int:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        head.reload()
        if head.status not in ("running", "created"):
            raise TestbedError(f"{head.name} is {head.status}: {head.logs(tail=20).decode(errors='replace')}")
        port = _published_port(head)
        if port is not None and _sshd_answers(port):
            return port
        time.sleep(0.2)
    raise TestbedError(f"sshd of {head.name} did not answer within {READY_TIMEOUT:.0f} s")


def _remove(client: Any, state: Path) -> int:
    import docker

    network, volume, _ = _names(state)
    removed = 0
    for container in _own(client, state):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
            removed += 1
    for collection, name in ((client.networks, network), (client.volumes, volume)):
        with contextlib.suppress(docker.errors.NotFound):
            collection.get(name).remove()
    return removed


def _prune(client: Any) -> None:
    """Remove clusters whose state dir is gone (left by a killed test session: nobody holds their key)."""
    import docker

    for kind in (client.containers, client.networks, client.volumes):
        listed = (kind.list(all=True, filters={"label": f"{_LABEL}=1"}, ignore_removed=True)
                  if kind is client.containers else kind.list(filters={"label": f"{_LABEL}=1"}))
        for item in listed:
            labels = item.attrs.get("Labels") or item.attrs.get("Config", {}).get("Labels") or {}
            directory = labels.get(_DIR_LABEL)
            if directory and not Path(directory).exists():
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    item.remove(force=True) if kind is client.containers else item.remove()


def slurm_down(state_dir: Path | None = None) -> int:
    """Remove the cluster of ``state_dir`` (containers, network, home volume); return how many containers."""
    state = Path(state_dir or default_slurm_state_dir()).expanduser().resolve()
    with docker_client(timeout=120) as client:
        removed = _remove(client, state)
    for name in ("ssh_config", "known_hosts", "cluster.json"):
        (state / name).unlink(missing_ok=True)
    return removed


def slurm_status(state_dir: Path | None = None) -> SlurmCluster | None:
    """The running cluster of ``state_dir``, or None (nothing is changed)."""
    state = Path(state_dir or default_slurm_state_dir()).expanduser().resolve()
    with docker_client() as client:
        nodes = _healthy(client, state) if _image_recipe(client) is not None else None
    if nodes is None:
        return None
    port = _published_port(nodes["head"])
    assert port is not None
    return SlurmCluster(state_dir=state, ssh_config=state / "ssh_config", known_hosts=state / "known_hosts",
                        identity_file=state / "id_ed25519", alias=ALIAS, port=port,
                        containers={node: container.name for node, container in nodes.items()})
