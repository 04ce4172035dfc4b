"""The ``rx-testbed`` image: an sshd host with python3 and rsync, built once per recipe.

Two ways to the same image, chosen at build time:

* a registry answers: a Dockerfile ``FROM debian:bookworm-slim`` that installs the packages with apt-get;
* no registry (the usual case here): ``debootstrap`` makes a minimal bookworm tree from Debian's mirror,
  ``docker import`` turns it into the base image ``rx-testbed-base:<its recipe's hash>``, and a small
  Dockerfile adds the user, the sshd configuration and the entry point on top.

Each image is tagged with the hash of its recipe (``rx-testbed:<hash>``: Dockerfile, entry point, sshd
configuration, the fake ``nvidia-smi``) and labelled with it, so a later call skips the build until the
recipe changes, and checkouts with different recipes (branches, worktrees) on one machine keep their images
side by side instead of rebuilding each other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_IMAGE",
    "IMAGE",
    "TestbedError",
    "docker_available",
    "docker_build",
    "docker_client",
    "ensure_image",
    "file_lock",
]

logger = logging.getLogger("testbed")

IMAGE = "rx-testbed"
"""The repository of the image every testbed container runs (tagged with its recipe's hash)."""

BASE_IMAGE = "rx-testbed-base"
"""The repository of the base image imported from a debootstrap tree when no registry answers."""

REGISTRY_BASE = "debian:bookworm-slim"
HASH_LABEL = "rx-testbed.recipe"
# rsync: the benchmarks compare rx's project sync with it over the same connection.
PACKAGES = ("openssh-server", "python3", "procps", "rsync")
MIRROR = os.environ.get("RX_TESTBED_MIRROR", "http://deb.debian.org/debian")

PULL_TIMEOUT = 10.0
DEBOOTSTRAP_TIMEOUT = 900.0
BUILD_TIMEOUT = 900

_ASSETS = Path(__file__).resolve().parent / "image"
#: The files both Dockerfiles copy from ``_ASSETS``: the entry point, the sshd drop-in, and the fake
#: ``nvidia-smi`` (GPUs from ``/etc/rx-testbed/gpus.json``, none without it; see the script).
_COPIED = ("entrypoint.sh", "sshd_config", "nvidia-smi")

# The part both Dockerfiles share: the user, the sshd drop-in and the entry point.
_DOCKERFILE_TAIL = """\
RUN set -eux; \\
    useradd --create-home --home-dir /home/rx --uid 1000 --user-group --shell /bin/bash rx; \\
    usermod --password '*' rx; \\
    install -d -m 700 -o rx -g rx /home/rx/.ssh; \\
    mkdir -p /run/sshd; \\
    rm -f /etc/ssh/ssh_host_*
COPY sshd_config /etc/ssh/sshd_config.d/rx-testbed.conf
COPY entrypoint.sh /usr/local/bin/rx-testbed-entrypoint
COPY nvidia-smi /usr/local/bin/nvidia-smi
RUN chmod 644 /etc/ssh/sshd_config.d/rx-testbed.conf && chmod 755 /usr/local/bin/rx-testbed-entrypoint \
    /usr/local/bin/nvidia-smi && install -d -m 755 /etc/rx-testbed
EXPOSE 22
ENTRYPOINT ["/usr/local/bin/rx-testbed-entrypoint"]
"""

_DOCKERFILE_REGISTRY = f"""\
FROM {REGISTRY_BASE}
RUN set -eux; \\
    apt-get update; \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {" ".join(PACKAGES)}; \\
    rm -rf /var/lib/apt/lists/*
{_DOCKERFILE_TAIL}"""


class TestbedError(RuntimeError):
    """The testbed could not do what was asked: Docker unusable, a build, a container or sshd failed."""

    __test__ = False  # not a pytest test class, despite the name


@contextlib.contextmanager
def file_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created when missing), waiting at most ``timeout`` seconds.

    Raises:
        TestbedError: Another process held the lock for longer than ``timeout``.
    """
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TestbedError(f"waited {timeout:.0f} s for the lock {path}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _debootstrap_recipe() -> str:
    """Return the text that defines the debootstrap base image; its hash names the base's version."""
    return f"debootstrap --variant=minbase --include={','.join(PACKAGES)} bookworm {MIRROR}"


def _base_hash() -> str:
    return hashlib.sha256(_debootstrap_recipe().encode()).hexdigest()[:16]


def _base_name() -> str:
    return f"{BASE_IMAGE}:{_base_hash()}"


def _image_name(recipe_hash: str) -> str:
    return f"{IMAGE}:{recipe_hash}"


def _dockerfile_debootstrap() -> str:
    return f"FROM {_base_name()}\nLABEL rx-testbed.base={_base_hash()}\n{_DOCKERFILE_TAIL}"


def _recipe_hash(dockerfile: str) -> str:
    """Hash a Dockerfile together with the files it copies, so editing any of them rebuilds the image."""
    digest = hashlib.sha256(dockerfile.encode())
    for name in _COPIED:
        digest.update(b"\0" + name.encode() + b"\0")
        digest.update((_ASSETS / name).read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def docker_client(timeout: float = 60) -> Iterator[Any]:
    """Open a Docker client from the environment (DOCKER_HOST or the local socket) and close it after.

    Args:
        timeout: Seconds each Docker API call may wait for an answer.

    Raises:
        TestbedError: The ``docker`` package is missing or the daemon does not answer.
    """
    try:
        import docker
    except ImportError as exc:
        raise TestbedError("the docker Python package is missing: pip install 'docker>=7'") from exc
    failure = None
    with warnings.catch_warnings():
        # A failed connect leaves the SDK's half-built session with an open socket; it is closed when the
        # exception is freed, here, where that ResourceWarning cannot become an error under pytest.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=int(timeout))
        except docker.errors.DockerException as exc:
            failure = str(exc)
        gc.collect()
    if failure is not None:
        raise TestbedError(f"Docker is not reachable: {failure}")
    try:
        yield client
    finally:
        client.close()


def docker_available() -> str | None:
    """Tell whether Docker can run the testbed.

    Returns:
        ``None`` when the daemon answers a ping, else one sentence saying why not, fit for a skip message.
    """
    try:
        with docker_client(timeout=10) as client:
            client.ping()
    except TestbedError as exc:
        return f"{exc} (start it with scripts/ensure-docker.sh)"
    except Exception as exc:  # the SDK raises requests' and its own errors alike
        return f"Docker is not usable: {exc} (start it with scripts/ensure-docker.sh)"
    return None


def _image_label(client: Any, name: str, label: str) -> str | None:
    """Return the value of ``label`` on the local image ``name``, or None when the image is absent."""
    import docker

    try:
        image = client.images.get(name)
    except docker.errors.ImageNotFound:
        return None
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    value = labels.get(label)
    return value if isinstance(value, str) else ""


def _registry_base_ready(client: Any, log: Callable[[str], None]) -> bool:
    """Return True when ``debian:bookworm-slim`` is present locally or a registry hands it over quickly."""
    import docker

    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(REGISTRY_BASE)
        return True
    log(f"trying to pull {REGISTRY_BASE} (at most {PULL_TIMEOUT:.0f} s)")
    outcome: list[BaseException | None] = []

    def pull() -> None:
        try:
            with docker_client(timeout=PULL_TIMEOUT) as pull_client:
                pull_client.images.pull(REGISTRY_BASE)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=pull, name="rx-testbed-pull", daemon=True)
    worker.start()
    worker.join(PULL_TIMEOUT + 5)
    if not outcome:
        log(f"no registry answered within {PULL_TIMEOUT:.0f} s")
        return False
    error = outcome[0]
    if error is not None:
        reason = getattr(error, "explanation", None) or str(error)
        log(f"no registry: {str(reason).splitlines()[0][:120]}")
        return False
    return True


def _build(client: Any, dockerfile: str, recipe_hash: str, log: Callable[[str], None]) -> str:
    """Build ``rx-testbed:<recipe_hash>`` from ``dockerfile`` and the assets, labelled with ``recipe_hash``;
    return its name."""
    image = _image_name(recipe_hash)

    with tempfile.TemporaryDirectory(prefix="rx-testbed-build-") as context:
        context_dir = Path(context)
        (context_dir / "Dockerfile").write_text(dockerfile)
        for name in _COPIED:
            shutil.copyfile(_ASSETS / name, context_dir / name)
        log(f"building {image}")
        docker_build(client, context_dir, image, {HASH_LABEL: recipe_hash})
    return image


def docker_build(client: Any, context: Path, tag: str, labels: dict[str, str]) -> None:
    """Build the image ``tag`` from the Dockerfile and files in ``context`` (no pull), labelled ``labels``.

    Raises:
        TestbedError: The build failed (Docker's message says why).
    """
    import docker

    try:
        for chunk in client.api.build(path=str(context), tag=tag, labels=labels, pull=False, rm=True, forcerm=True,
                                      decode=True, timeout=BUILD_TIMEOUT):
            if "error" in chunk:
                raise TestbedError(f"building {tag} failed: {chunk['error'].strip()}")
            line = str(chunk.get("stream", "")).strip()
            if line:
                logger.debug("docker build: %s", line)
    except docker.errors.APIError as exc:
        raise TestbedError(f"building {tag} failed: {exc}") from exc


def _mounts_under(root: Path) -> list[str]:
    """Return the mount points inside ``root``, deepest first (from /proc/self/mounts)."""
    prefix = f"{root}/"
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _remove_work_dir(work: Path) -> None:
    """Delete debootstrap's work dir, first unmounting what a killed debootstrap may have left mounted.

    A tree with /proc, /sys or bound /dev entries still mounted is left in place rather than deleted.
    """
    for point in _mounts_under(work):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)
    left = _mounts_under(work)
    if left:
        logger.warning("leaving %s in place: still mounted there: %s", work, ", ".join(left))
        return
    shutil.rmtree(work, ignore_errors=True)


def _build_base(client: Any, log: Callable[[str], None]) -> None:
    """Make the base image (:data:`BASE_IMAGE`) with debootstrap and ``docker import``; needs root and Debian's
    mirror."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise TestbedError(
            "no registry answers and debootstrap is missing: apt-get install -y debootstrap "
            "(scripts/ensure-docker.sh installs it)"
        )
    if os.geteuid() != 0:
        raise TestbedError("building the base image with debootstrap needs root")
    work = Path(tempfile.mkdtemp(prefix="rx-testbed-base-", dir=os.environ.get("RX_TESTBED_TMP")))
    try:
        _debootstrap_and_import(client, debootstrap, work, log)
    finally:
        _remove_work_dir(work)


def _debootstrap_and_import(client: Any, debootstrap: str, work: Path, log: Callable[[str], None]) -> None:
    root = work / "rootfs"
    include = f"--include={','.join(PACKAGES)}"
    argv = [debootstrap, "--variant=minbase", include, "bookworm", str(root), MIRROR]
    log(f"debootstrap bookworm from {MIRROR} (about a minute)")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"debootstrap took more than {DEBOOTSTRAP_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise TestbedError(f"debootstrap failed (exit {done.returncode}):\n{tail}")
    leftover = _mounts_under(root)
    if leftover:
        raise TestbedError(f"debootstrap left file systems mounted in its tree: {', '.join(leftover)}")
    tarball = work / "rootfs.tar"
    log(f"importing the tree as {_base_name()}")
    packed = subprocess.run(
        [
            "tar",
            "-C",
            str(root),
            "--exclude=./var/cache/apt/archives/*.deb",
            "--exclude=./var/lib/apt/lists/*",
            "--numeric-owner",
            "-cf",
            str(tarball),
            ".",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if packed.returncode != 0:
        raise TestbedError(f"packing the debootstrap tree failed: {packed.stderr.strip()}")
    client.api.import_image_from_file(
        str(tarball),
        repository=BASE_IMAGE,
        tag=_base_hash(),
        changes=[f"LABEL {HASH_LABEL}={_base_hash()}", 'CMD ["/bin/bash"]'],
    )


def ensure_image(*, log: Callable[[str], None] | None = None) -> str:
    """Make sure the image of the current recipe exists; build it when not.

    The first build takes about a minute (debootstrap path); later calls cost one Docker API call.

    Args:
        log: Called with one line per step (pull, debootstrap, import, build); ``print`` suits a terminal.
            By default the lines go to the ``testbed`` logger at INFO.

    Returns:
        The image's name, ``rx-testbed:<recipe hash>``.

    Raises:
        TestbedError: Docker is unusable or a build step failed.
    """
    say: Callable[[str], None] = log if log is not None else logger.info
    built = (_image_name(_recipe_hash(_DOCKERFILE_REGISTRY)), _image_name(_recipe_hash(_dockerfile_debootstrap())))
    with docker_client(timeout=600) as client:
        for name in built:
            if _image_id(client, name) is not None:
                logger.debug("%s is up to date", name)
                return name
        # One build at a time on this machine: a second caller waits, then finds the image built.
        with file_lock(Path(tempfile.gettempdir()) / "rx-testbed-image.lock", BUILD_TIMEOUT + DEBOOTSTRAP_TIMEOUT):
            for name in built:
                if _image_id(client, name) is not None:
                    return name
            return _build_image(client, say)


def _build_image(client: Any, say: Callable[[str], None]) -> str:
    say(f"the {IMAGE} image of this recipe is missing; building it")
    started = time.monotonic()
    if _registry_base_ready(client, say):
        name = _build(client, _DOCKERFILE_REGISTRY, _recipe_hash(_DOCKERFILE_REGISTRY), say)
    else:
        if _image_label(client, _base_name(), HASH_LABEL) != _base_hash():
            _build_base(client, say)
        else:
            say(f"reusing {_base_name()}")
        name = _build(client, _dockerfile_debootstrap(), _recipe_hash(_dockerfile_debootstrap()), say)
    say(f"{name} is ready ({time.monotonic() - started:.0f} s)")
    return name


def _image_id(client: Any, name: str) -> str | None:
    import docker

    try:
        return str(client.images.get(name).id)
    except docker.errors.ImageNotFound:
        return None
