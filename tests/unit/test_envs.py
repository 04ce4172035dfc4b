"""A task's dependencies, on this machine as its own host (the local target runs the same runner): declared,
resolved for the host's interpreter, built once per key; two builders of one key, a builder killed
midway, a stale lock; the spec and key rules. Wheels are made on the spot (no index, no network)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from json import dumps as json_dumps
from pathlib import Path

import pytest

from remote_exec.config import Configuration
from remote_exec.envs import EnvSpec, HostTarget
from remote_exec.envs.resolve import env_key, lock_for
from remote_exec.errors import ConfigError, EnvError, UsageError
from remote_exec.runner import envs as host_envs
from testbed import make_wheel
from tests.unit.conftest import Isolated

uv = pytest.importorskip("uv")

SCRIPT = "import sys, tinydep\nprint('value', tinydep.VALUE, sys.executable)\n"
TARGET = HostTarget("cpython", "3.11.2", "x86_64", "glibc", "2.36", "cpython-311-x86_64-linux-gnu", "/usr/bin/python3")


@pytest.fixture
def project(isolated: Isolated) -> Path:
    root = isolated.root / "project"
    wheels = isolated.root / "wheels"
    make_wheel(wheels, "tinyleaf", "1.0", {"tinyleaf/__init__.py": "X = 1\n"})
    for version, value in (("1.2.3", 42), ("1.2.4", 43)):
        make_wheel(wheels, "tinydep", version, {"tinydep/__init__.py": f"import tinyleaf\nVALUE = {value}\n"},
                   requires=["tinyleaf"])
    root.mkdir()
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "p"\nversion = "0"\n\n[tool.rx]\nfind_links = ["{wheels}"]\n')
    (root / "job.py").write_text(SCRIPT)
    return root


def rx(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", "run", *args], cwd=root, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, **(env or {})})


def envs_of(isolated: Isolated) -> list[str]:
    folder = isolated.cache / "local" / "envs"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_deps_are_built_once_and_a_new_spec_gets_a_new_environment(project: Path, isolated: Isolated) -> None:
    first = rx(project, "--deps", "tinydep==1.2.3", "job.py")
    assert first.returncode == 0, first.stderr
    assert "value 42" in first.stdout and "/envs/" in first.stdout
    assert "rx: local: building an environment of 2 package(s) for cpython" in first.stderr
    built = envs_of(isolated)
    assert len(built) == 1
    again = rx(project, "--deps", "tinydep==1.2.3", "job.py")
    assert again.returncode == 0 and "value 42" in again.stdout
    assert "environment" not in again.stderr  # silent when there is nothing to do
    assert envs_of(isolated) == built
    changed = rx(project, "--deps", "tinydep==1.2.4", "job.py")
    assert changed.returncode == 0 and "value 43" in changed.stdout
    assert len(envs_of(isolated)) == 2


def test_no_declaration_keeps_the_interpreter_as_it_is(project: Path, isolated: Isolated) -> None:
    (project / "plain.py").write_text("import sys\nprint(sys.executable)\n")
    done = rx(project, "plain.py")
    assert done.returncode == 0 and "/envs/" not in done.stdout
    assert envs_of(isolated) == []


def test_deps_from_tool_rx_and_a_requirements_file(project: Path, isolated: Isolated) -> None:
    (project / "requirements-host.txt").write_text("tinydep==1.2.4\n")
    text = (project / "pyproject.toml").read_text()
    (project / "pyproject.toml").write_text(text + 'requirements = "requirements-host.txt"\n')
    done = rx(project, "job.py")
    assert done.returncode == 0, done.stderr
    assert "value 43" in done.stdout


def test_two_runs_needing_one_environment_build_it_once(project: Path, isolated: Isolated) -> None:
    argv = [sys.executable, "-m", "remote_exec", "run", "--deps", "tinydep==1.2.3", "job.py"]
    runs = [subprocess.Popen(argv, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert "value 42" in out
    assert len(envs_of(isolated)) == 1


def test_a_build_killed_midway_leaves_nothing_a_later_run_uses(project: Path, isolated: Isolated) -> None:
    real = subprocess.run(["which", "uv"], capture_output=True, text=True, check=False).stdout.strip()
    if not real:
        pytest.skip("no uv on PATH for the local host")
    slow = isolated.root / "slowbin"
    slow.mkdir()
    (slow / "uv").write_text(f'#!/bin/sh\nif [ "$1" = pip ]; then sleep 60; fi\nexec {real} "$@"\n')
    (slow / "uv").chmod(0o755)
    env = {**os.environ, "PATH": f"{slow}{os.pathsep}{os.environ['PATH']}"}
    argv = [sys.executable, "-m", "remote_exec", "run", "--deps", "tinydep==1.2.3", "job.py"]
    victim = subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    folder = isolated.cache / "local" / "envs"
    deadline = time.monotonic() + 60
    while not any(".tmp-" in name for name in envs_of(isolated)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(".tmp-" in name for name in envs_of(isolated))
    time.sleep(0.3)  # into uv pip sync
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not [name for name in envs_of(isolated) if ".tmp-" not in name and not name.endswith(".lock")]
    done = rx(project, "--deps", "tinydep==1.2.3", "job.py")
    assert done.returncode == 0, done.stderr
    assert "value 42" in done.stdout
    ready = [name for name in envs_of(isolated) if ".tmp-" not in name and not name.endswith(".lock")]
    assert len(ready) == 1 and (folder / ready[0] / ".rx-complete").is_file()
    assert not any(name.endswith(".lock") for name in envs_of(isolated))


def test_a_package_without_a_wheel_for_the_host_fails_naming_it(project: Path, isolated: Isolated) -> None:
    make_wheel(isolated.root / "wheels", "winonly", "1.0", {"winonly/__init__.py": ""}, tag="cp311-cp311-win_amd64")
    done = rx(project, "--deps", "winonly==1.0", "--offline", "job.py")
    assert done.returncode == 3
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no wheel of winonly==1.0" in errors[0], done.stderr


def test_stale_lock_of_a_dead_builder_is_taken_over(tmp_path: Path) -> None:
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "k.lock"
    lock.write_text(f"{socket.gethostname()} {dead.pid} {time.time()}\n")
    beats: list[int] = []

    class Inbox:
        def alive(self) -> None:
            beats.append(1)

    assert host_envs._take_lock(str(lock), str(tmp_path / "k" / ".rx-complete"), Inbox())
    assert lock.read_text().split()[1] == str(os.getpid())


def test_a_live_builders_lock_is_waited_for_until_the_environment_is_ready(tmp_path: Path) -> None:
    import socket
    import threading

    lock = tmp_path / "k.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()} {time.time()}\n")
    done = tmp_path / "k" / ".rx-complete"

    def finish() -> None:
        time.sleep(0.5)
        done.parent.mkdir()
        done.write_text("")

    class Inbox:
        def alive(self) -> None:
            pass

    thread = threading.Thread(target=finish)
    thread.start()
    assert host_envs._take_lock(str(lock), str(done), Inbox()) is False
    thread.join()


def test_spec_from_options_over_the_configuration(tmp_path: Path) -> None:
    assert EnvSpec.from_options({}, {}) is None
    spec = EnvSpec.from_options({"deps": ["numpy>=2"], "offline": True}, {"deps": ["pandas"], "inherit_site": True},
                                tmp_path)
    assert spec is not None
    assert spec.deps == ("numpy>=2",) and spec.offline and spec.inherit_site
    with pytest.raises(UsageError, match="deps="):
        EnvSpec.from_options({"deps": [1]}, {})


def test_tool_rx_dependency_keys(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.rx]\ndeps = ["numpy"]\nrequirements = "req.txt"\nfind_links = ["wheels"]\n'
                    'offline = true\n[tool.rx.remotes.air]\nhost = "a"\noffline = true\ninherit_site = true\n')
    config = Configuration.from_pyproject(path)
    assert config.env_settings["deps"] == ["numpy"]
    assert config.env_settings["requirements"] == [str(tmp_path / "req.txt")]
    assert config.env_settings["find_links"] == [str(tmp_path / "wheels")]
    assert config.remotes["air"].offline and config.remotes["air"].inherit_site
    path.write_text('[tool.rx]\ndeps = [1]\n')
    with pytest.raises(ConfigError, match="deps must be a list of strings"):
        Configuration.from_pyproject(path)


def test_the_key_follows_the_lock_and_the_interpreter() -> None:
    spec = EnvSpec(deps=("a",))
    lock = "a==1.0 \\\n    --hash=sha256:00\nb==2 \\\n    --hash=sha256:11\n"
    key = env_key(lock, TARGET, spec)
    assert env_key("# a comment\n" + lock, TARGET, spec) == key
    assert env_key(lock.replace("b==2", "b==3"), TARGET, spec) != key
    other = HostTarget("cpython", "3.12.1", "x86_64", "glibc", "2.36", "cpython-312-x86_64-linux-gnu",
                       "/usr/bin/python3")
    assert env_key(lock, other, spec) != key
    assert env_key(lock, TARGET, EnvSpec(deps=("a",), inherit_site=True)) != key


def test_host_platforms() -> None:
    assert TARGET.uv_platform == "x86_64-manylinux_2_36"
    assert "manylinux_2_36_x86_64" in TARGET.pip_platforms
    old = HostTarget("cpython", "3.8.10", "x86_64", "glibc", "2.12")
    assert old.uv_platform == "x86_64-manylinux_2_17" and old.minor == "3.8"
    assert HostTarget("cpython", "3.12.0", "aarch64", "musl", "").uv_platform == "aarch64-unknown-linux-musl"


def test_the_lock_is_resolved_for_the_hosts_python_and_cached(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "tinyleaf", "1.0", {"tinyleaf/__init__.py": ""})
    spec = EnvSpec(deps=("tinyleaf",), find_links=(str(wheels),), offline=True)
    old = HostTarget("cpython", "3.8.10", "x86_64", "glibc", "2.31")
    lock = lock_for(spec, old, tmp_path / "cache", "h")
    assert "tinyleaf==1.0" in lock and "--hash=sha256:" in lock
    monkeypatch.setattr("remote_exec.envs.resolve.uv_binary", lambda: (_ for _ in ()).throw(EnvError("called")))
    assert lock_for(spec, old, tmp_path / "cache", "h") == lock  # from the cache, uv not asked


def test_a_function_by_value_is_refused_for_another_python_minor_and_by_reference_accepted() -> None:
    from remote_exec.envs import refuse_by_value
    from remote_exec.errors import SerializationError
    from remote_exec.task import Task

    def closure(x: int) -> int:
        return x + 1

    other = "3.10.12" if sys.version_info[:2] != (3, 10) else "3.12.1"
    by_value = Task("function", "closure", "0" * 64, function=closure)
    with pytest.raises(SerializationError, match=r"closure travels by value .* Python 3\.1\d there"):
        refuse_by_value(by_value, {"python": other}, "gpu1")
    refuse_by_value(by_value, {"python": ".".join(map(str, sys.version_info[:3]))}, "gpu1")  # same minor
    refuse_by_value(by_value, None, "gpu1")  # never probed: nothing known, nothing refused
    by_reference = Task("function", "dumps", "0" * 64, function=json_dumps)
    refuse_by_value(by_reference, {"python": other}, "gpu1")


def test_the_projects_own_dependencies_on_request(tmp_path: Path) -> None:
    from remote_exec.coordinator import Coordinator, Target
    from remote_exec.protocol.options import CallOptions
    from remote_exec.session import Session
    from remote_exec.task import Execution, Task

    root = tmp_path / "p"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "0"\ndependencies = ["numpy>=2"]\n')
    config = Configuration.from_pyproject(root / "pyproject.toml")
    remote = Target(backend=None, backend_name="openssh", host="gpu1", options=CallOptions())  # type: ignore[arg-type]
    session = Session(Task("script", "job.py", "0" * 64, source=""), Execution("1" * 64),
                      context={"cwd": str(root)}, config=config)
    coordinator = Coordinator()
    assert coordinator.env_spec(session, remote, root)[0] is None  # by default: the host as it is
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text() + "[tool.rx]\nproject_deps = true\n")
    config = Configuration.from_pyproject(root / "pyproject.toml")
    session.config = config
    spec, _ = coordinator.env_spec(session, remote, root)
    assert spec is not None and spec.deps == ("numpy>=2",)
    local = Target(backend=None, backend_name="local", host="local", options=CallOptions())  # type: ignore[arg-type]
    assert coordinator.env_spec(session, local, root)[0] is None  # this interpreter has them


def test_a_uv_lock_gives_its_pins_resolved_for_the_host(project: Path, isolated: Isolated) -> None:
    from remote_exec.coordinator import Coordinator, Target
    from remote_exec.protocol.options import CallOptions
    from remote_exec.session import Session
    from remote_exec.task import Execution, Task

    wheels = isolated.root / "wheels"
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.8"\ndependencies = ["tinydep"]\n\n'
        f'[tool.rx]\nfind_links = ["{wheels}"]\nproject_deps = true\n\n[dependency-groups]\ndev = ["devtool"]\n')
    make_wheel(wheels, "devtool", "1.0", {"devtool/__init__.py": ""})
    aside = isolated.root / "aside"
    aside.mkdir()
    newest = wheels / "tinydep-1.2.4-py3-none-any.whl"
    newest.rename(aside / newest.name)  # the lock is made when 1.2.3 was the newest
    uv_env = {**os.environ, "UV_NO_PROGRESS": "1", "UV_PYTHON_DOWNLOADS": "never",
              "UV_CACHE_DIR": str(isolated.root / "uvc")}
    made = subprocess.run([uv.find_uv_bin(), "lock", "--offline", "--no-index", "--find-links", str(wheels)],
                          cwd=project, capture_output=True, text=True, env=uv_env, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    (aside / newest.name).rename(newest)  # now the folder offers 1.2.4 too

    config = Configuration.from_pyproject(project / "pyproject.toml")
    remote = Target(backend=None, backend_name="openssh", host="gpu1", options=CallOptions())  # type: ignore[arg-type]
    session = Session(Task("script", "job.py", "0" * 64, source=""), Execution("1" * 64),
                      context={"cwd": str(project)}, config=config)
    spec, _ = Coordinator().env_spec(session, remote, project)
    assert spec is not None and spec.deps == ("tinydep==1.2.3", "tinyleaf==1.0")  # no devtool, not the project
    lock = lock_for(spec, TARGET, isolated.root / "locks", "gpu1")
    assert "tinydep==1.2.3" in lock and "1.2.4" not in lock and "--hash=sha256:" in lock

    (project / "uv.lock").write_text("version = [broken\n")
    with pytest.raises(EnvError) as caught:
        Coordinator().env_spec(session, remote, project)
    assert "uv.lock" in str(caught.value) and "\n" not in str(caught.value) and "uv lock" in (caught.value.hint or "")


def test_a_failed_build_says_why_in_one_line_and_leaves_nothing(project: Path, isolated: Isolated) -> None:
    real = subprocess.run(["which", "uv"], capture_output=True, text=True, check=False).stdout.strip()
    if not real:
        pytest.skip("no uv on PATH for the local host")
    broken = isolated.root / "brokenbin"
    broken.mkdir()
    (broken / "uv").write_text(f'#!/bin/sh\nif [ "$1" = pip ]; then echo "error: disk on fire" >&2; exit 2; fi\n'
                               f'exec {real} "$@"\n')
    (broken / "uv").chmod(0o755)
    done = rx(project, "--deps", "tinydep==1.2.3", "job.py",
              env={"PATH": f"{broken}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 3
    errors = [line for line in done.stderr.splitlines() if line.startswith("rx: error")]
    assert len(errors) == 1 and "building the environment failed" in errors[0] and "disk on fire" in errors[0]
    assert envs_of(isolated) == []


OTHER_PYTHON = next((path for path in (Path.home() / ".pyenv" / "versions").glob("3.10.*/bin/python3")
                     if sys.version_info[:2] != (3, 10)), None) if (Path.home() / ".pyenv").is_dir() else None
needs_other_python = pytest.mark.skipif(OTHER_PYTHON is None, reason="no Python 3.10 besides this one")


@needs_other_python
def test_deps_are_resolved_for_the_hosts_python_not_this_ones(project: Path, isolated: Isolated) -> None:
    (project / "which.py").write_text("import sys, tinydep\nprint(sys.version_info[:2], tinydep.VALUE)\n")
    done = rx(project, "--python", str(OTHER_PYTHON), "--deps", "tinydep==1.2.3", "which.py")
    assert done.returncode == 0, done.stderr
    assert "(3, 10) 42" in done.stdout
    assert "for cpython 3.10 " in done.stderr


@needs_other_python
def test_another_minor_refuses_a_function_by_value_and_runs_one_by_reference(project: Path,
                                                                           isolated: Isolated) -> None:
    (project / "work.py").write_text("import sys\n\ndef version():\n    import tinydep\n"
                                     "    return sys.version_info[:2], tinydep.VALUE\n")
    (project / "caller.py").write_text(
        "import sys\nfrom remote_exec import task\nimport work\n\n"
        f"OPTIONS = dict(python={str(OTHER_PYTHON)!r}, deps=['tinydep==1.2.3'])\n\n"
        "def local_version():\n    return sys.version_info[:2]\n\n"
        "print('by reference', task(**OPTIONS)(work.version)())\n"
        "try:\n    task(**OPTIONS)(local_version)()\nexcept Exception as exc:\n"
        "    print('by value', type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "caller.py"], cwd=project, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "by reference ((3, 10), 42)" in done.stdout
    assert "by value SerializationError local: __main__:local_version travels by value" in done.stdout
    assert "Python 3.10 there" in done.stdout


def test_the_uv_binary_out_of_its_wheel_is_checked_against_record(tmp_path: Path) -> None:
    import base64
    import hashlib
    import zipfile

    from remote_exec.envs.resolve import binary_from_wheel

    def wheel(data: bytes, recorded: bytes) -> Path:
        digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
        path = tmp_path / f"uv-{len(list(tmp_path.iterdir()))}-py3-none-musllinux_1_1_x86_64.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("uv-0.9.0.data/scripts/uv", data)
            archive.writestr("uv-0.9.0.dist-info/RECORD", f"uv-0.9.0.data/scripts/uv,sha256={digest},{len(data)}\n")
        return path

    assert binary_from_wheel(wheel(b"\x7fELF static", b"\x7fELF static")) == b"\x7fELF static"
    with pytest.raises(EnvError, match="does not match its sha256 in RECORD"):
        binary_from_wheel(wheel(b"\x7fELF tampered", b"\x7fELF static"))


def test_wheels_deleted_from_the_store_behind_rx_are_sent_again(project: Path, isolated: Isolated) -> None:
    """A host's blobs removed by hand (or by another cleanup) while the wheel tree's manifest stays: the next
    build notices the missing wheels and has them sent again, instead of failing in uv."""
    first = rx(project, "--deps", "tinydep==1.2.3", "job.py")
    assert first.returncode == 0, first.stderr
    local = isolated.cache / "local"
    shutil.rmtree(local / "envs")
    shutil.rmtree(local / "blobs")
    again = rx(project, "--deps", "tinydep==1.2.3", "job.py")
    assert again.returncode == 0, again.stderr
    assert "value 42" in again.stdout
