"""A task's dependencies on an air-gapped host (a Docker ``--internal`` network: no route out, no uv), both
backends: built once from wheels shipped from here, reused while the spec stays, a new environment when it
changes, a package without a wheel for the host named, the interpreter's own packages only on request."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import Testbed, TestbedHost, exec_root, make_wheel, remove_host, start_host

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import Remote  # noqa: E402

pytest_plugins = ["remote_support"]

pytestmark = pytest.mark.integration

SCRIPT = """\
import sys
import tinydep
print("value", tinydep.VALUE, tinydep.leaf(), sys.executable)
"""


@pytest.fixture(scope="module")
def airgap_network() -> Iterator[str]:
    """An ``--internal`` Docker network: no route out of it."""
    import docker

    client = docker.from_env()
    name = f"rx-airgap-{secrets.token_hex(4)}"
    network = client.networks.create(name, driver="bridge", internal=True)
    try:
        yield name
    finally:
        network.remove()
        client.close()


@pytest.fixture(scope="module")
def airgapped(testbed: Testbed, airgap_network: str) -> Iterator[TestbedHost]:
    """A host on the internal network: the coordinator reaches it, it reaches nothing else."""
    host = start_host(testbed.state_dir, airgap_network, network=airgap_network)
    try:
        yield host
    finally:
        remove_host(host)


@pytest.fixture(scope="module")
def local_index(airgap_network: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small index on the internal network (``python3 -m http.server`` over a PEP 503 layout in a
    container of the testbed image): the URL both this machine and the air-gapped host reach."""
    import io
    import tarfile

    import docker

    from testbed import ensure_image

    folder = tmp_path_factory.mktemp("index")
    make_wheel(folder / "simple" / "tinyleaf", "tinyleaf", "1.0",
               {"tinyleaf/__init__.py": "def leaf():\n    return 'leaf'\n"})
    make_wheel(folder / "simple" / "tinydep", "tinydep", "2.0",
               {"tinydep/__init__.py": "from tinyleaf import leaf\nVALUE = 20\n"}, requires=["tinyleaf>=1"])
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        archive.add(folder / "simple", arcname="simple")
    image = ensure_image()
    client = docker.from_env()
    container = client.containers.create(image, entrypoint=["python3", "-m", "http.server", "8000", "--directory",
                                                            "/srv"], network=airgap_network,
                                         name=f"{airgap_network}-index")
    try:
        container.put_archive("/srv", data.getvalue())
        container.start()
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"][airgap_network]["IPAddress"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((address, 8000), 1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://{address}:8000/simple"
    finally:
        container.remove(force=True)
        client.close()


def reaches_index(host: TestbedHost) -> bool:
    _code, output = exec_root(host, "python3 -c \"import socket; socket.create_connection(('pypi.org', 443), 3)\" "
                                   "2>&1 && echo REACHED")
    return "REACHED" in output


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    make_wheel(folder, "tinyleaf", "1.0", {"tinyleaf/__init__.py": "def leaf():\n    return 'leaf'\n"})
    make_wheel(folder, "tinydep", "1.2.3", {"tinydep/__init__.py": "from tinyleaf import leaf\nVALUE = 42\n"},
               requires=["tinyleaf>=1"])
    make_wheel(folder, "tinydep", "1.2.4", {"tinydep/__init__.py": "from tinyleaf import leaf\nVALUE = 43\n"},
               requires=["tinyleaf>=1"])
    make_wheel(folder, "winonly", "1.0", {"winonly/__init__.py": ""}, tag="cp311-cp311-win_amd64")
    return folder


def configure(remote: Remote, host: TestbedHost, wheels: Path) -> str:
    """The project's [tool.rx]: the air-gapped host as ``air`` with a workdir of this test alone."""
    workdir = f"~/.cache/rx-envs-{secrets.token_hex(4)}"
    (remote.project / "pyproject.toml").write_text(
        '[project]\nname = "rx-test-project"\nversion = "0"\n\n'
        f'[tool.rx]\nfind_links = ["{wheels}"]\n\n'
        f'[tool.rx.remotes.air]\nhost = "{host.alias}"\nworkdir = "{workdir}"\n', encoding="utf-8")
    (remote.project / "job.py").write_text(SCRIPT, encoding="utf-8")
    return workdir.replace("~", "/home/rx")


def envs_on(host: TestbedHost, workdir: str) -> list[str]:
    _code, output = exec_root(host, f"ls -A {shlex.quote(workdir + '/envs')} 2>/dev/null")
    return sorted(output.split())


def test_offline_host_gets_its_deps_built_once(remote: Remote, airgapped: TestbedHost, wheels: Path) -> None:
    assert not reaches_index(airgapped)
    workdir = configure(remote, airgapped, wheels)
    first = remote.rx("run", "--remote", "air", "--deps", "tinydep==1.2.3", "job.py", timeout=180)
    assert first.returncode == 0, first.stderr
    assert "value 42 leaf" in first.stdout
    assert f"{workdir}/envs/" in first.stdout  # the environment's interpreter ran it
    built = envs_on(airgapped, workdir)
    assert len(built) == 1 and not built[0].endswith(".lock"), built
    _code, tools = exec_root(airgapped, f"ls {shlex.quote(workdir + '/tools')}")
    assert tools.strip().startswith("uv-")  # the host has no uv: rx shipped its own

    again = remote.rx("run", "--remote", "air", "--deps", "tinydep==1.2.3", "job.py")
    assert again.returncode == 0, again.stderr
    assert "value 42 leaf" in again.stdout
    assert envs_on(airgapped, workdir) == built  # reused
    shown = remote.rx("env", "air", "--deps", "tinydep==1.2.3", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["exists"] and report["offline"] and report["key"] == built[0]
    assert "tinydep==1.2.3" in report["lock"] and report["probe"]["uv"] == ""
    plain = remote.rx("env", "air", "--deps", "tinydep==1.2.3")
    assert plain.returncode == 0, plain.stderr
    assert f"env       {workdir}/envs/{built[0]} (" in plain.stdout
    assert "no uv (rx ships its own)" in plain.stdout and "  tinyleaf==1.0" in plain.stdout

    changed = remote.rx("run", "--remote", "air", "--deps", "tinydep==1.2.4", "job.py", timeout=180)
    assert changed.returncode == 0, changed.stderr
    assert "value 43 leaf" in changed.stdout
    after = envs_on(airgapped, workdir)
    assert len(after) == 2 and built[0] in after


def test_a_package_without_a_wheel_for_the_host_is_named(remote: Remote, airgapped: TestbedHost,
                                                          wheels: Path) -> None:
    configure(remote, airgapped, wheels)
    done = remote.rx("run", "--remote", "air", "--deps", "winonly==1.0", "job.py")
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("rx: error")]
    assert len(lines) == 1 and "no wheel of winonly==1.0 for cpython 3.11" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_inherit_site_sees_the_hosts_own_packages(remote: Remote, airgapped: TestbedHost, wheels: Path) -> None:
    configure(remote, airgapped, wheels)
    exec_root(airgapped, "echo 'WHERE = \"host\"' > /usr/lib/python3/dist-packages/hostonly.py")
    (remote.project / "site.py").write_text("import tinydep, hostonly\nprint(hostonly.WHERE)\n", encoding="utf-8")
    alone = remote.rx("run", "--remote", "air", "--deps", "tinydep==1.2.3", "site.py", timeout=180)
    assert alone.returncode == 1 and "hostonly" in alone.stderr
    inherited = remote.rx("run", "--remote", "air", "--deps", "tinydep==1.2.3", "--inherit-site", "site.py",
                          timeout=180)
    assert inherited.returncode == 0, inherited.stderr
    assert inherited.stdout.strip() == "host"


NUMPY_WHEELS = Path(os.environ.get("RX_TEST_WHEELS") or Path.home() / ".cache" / "rx-test-wheels")


@pytest.mark.slow
def test_numpy_and_pandas_on_an_air_gapped_host(remote: Remote, airgapped: TestbedHost) -> None:
    """Real binary wheels (numpy, pandas: fetched once into RX_TEST_WHEELS, else skipped): a script importing
    both runs on a host that has neither and no index, with one --deps line each; the second run reuses the
    environment. The seconds are printed (measured, not asserted)."""
    if not list(NUMPY_WHEELS.glob("numpy-*-cp311-*.whl")) or not list(NUMPY_WHEELS.glob("pandas-*-cp311-*.whl")):
        pytest.skip(f"no numpy/pandas cp311 wheels in {NUMPY_WHEELS} (pip download --only-binary=:all: "
                    "--platform manylinux_2_28_x86_64 --python-version 3.11 -d DIR numpy pandas)")
    assert not reaches_index(airgapped)
    configure(remote, airgapped, NUMPY_WHEELS)
    (remote.project / "frame.py").write_text(
        "import numpy as np, pandas as pd\nprint(pd.DataFrame({'a': np.arange(4)})['a'].sum())\n", encoding="utf-8")
    timings: dict[str, float] = {}
    for label in ("first", "cache hit"):
        started = time.monotonic()
        done = remote.rx("run", "--remote", "air", "--deps", "numpy", "--deps", "pandas", "frame.py", timeout=300)
        timings[label] = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "6"
        built = [line for line in done.stderr.splitlines() if "built in" in line]
        if built:
            timings["install on the host"] = float(built[0].rsplit(" in ", 1)[1].split()[0])
    (remote.project / "plain.py").write_text("print(6)\n", encoding="utf-8")
    started = time.monotonic()
    assert remote.rx("run", "--remote", "air", "plain.py").returncode == 0
    timings["no deps"] = time.monotonic() - started
    print(f"\n[{remote.backend}] " + ", ".join(f"{label} {seconds:.2f} s" for label, seconds in timings.items()))


def test_an_online_host_installs_from_the_index(remote: Remote, airgapped: TestbedHost, local_index: str,
                                                wheels: Path) -> None:
    workdir = configure(remote, airgapped, wheels)
    text = (remote.project / "pyproject.toml").read_text()
    (remote.project / "pyproject.toml").write_text(text.replace(f'find_links = ["{wheels}"]',
                                                                f'index_url = "{local_index}"'))
    done = remote.rx("run", "--remote", "air", "--deps", "tinydep", "job.py", timeout=180)
    assert done.returncode == 0, done.stderr
    assert "value 20 leaf" in done.stdout
    count = ("import glob, zipfile; print(sum(zipfile.is_zipfile(path) for path in glob.glob("
             f"{workdir + '/blobs/*/*'!r})))")
    _code, wheels_sent = exec_root(airgapped, f"python3 -c {shlex.quote(count)}")
    assert wheels_sent.strip() == "0"  # no wheel travelled: the host took them from the index
