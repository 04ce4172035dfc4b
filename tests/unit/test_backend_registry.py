"""The backend registry and pool: the only list of backend names, a backend added from outside rx through
``register()`` alone and then selectable like a built-in one, and one backend per host and name."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from backend_double import TARGET, DoubleBackend

from remote_exec.backends import (
    Backend,
    BackendPool,
    HostSpec,
    backend_class,
    backend_names,
    check_backend_name,
    create,
    register,
    remote_backend_names,
    unregister,
)
from remote_exec.backends.local import LocalBackend
from remote_exec.backends.registry import BUILTIN_BACKENDS, BackendRegistry
from remote_exec.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def double() -> Iterator[str]:
    """The test double, registered the only way a backend from outside rx can be: ``register()``."""
    register("double", TARGET)
    yield "double"
    unregister("double")


# --- the built-in table -------------------------------------------------------------------------------------


def test_builtin_names_and_which_a_user_may_choose() -> None:
    assert backend_names() == ("openssh", "paramiko", "local")
    assert remote_backend_names() == ("openssh", "paramiko")
    assert check_backend_name("openssh") == "openssh"
    assert check_backend_name("paramiko") == "paramiko"
    assert backend_class("local") is LocalBackend


@pytest.mark.parametrize("name", ["local", "telnet", ""])
def test_a_name_users_may_not_choose_is_refused_with_the_choices(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown backend") as caught:
        check_backend_name(name)
    assert caught.value.hint == "openssh or paramiko"


def test_an_unknown_class_name_lists_every_backend() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'telnet'") as caught:
        backend_class("telnet")
    assert caught.value.hint == "choose one of openssh, paramiko, local"


def test_names_and_checks_import_no_backend_module() -> None:
    """The CLI reads the choices at start-up: that must not import paramiko (or any backend module)."""
    code = ("import sys\n"
            "from remote_exec.backends import check_backend_name, remote_backend_names\n"
            "names = remote_backend_names(); check_backend_name('paramiko')\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('paramiko', 'remote_exec.backends.')))\n"
            "print(names, loaded)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                          cwd=REPO_ROOT)
    assert done.stdout.strip() == ("('openssh', 'paramiko') ['remote_exec.backends.base', "
                                   "'remote_exec.backends.pool', 'remote_exec.backends.registry']")


def test_the_builtin_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        BUILTIN_BACKENDS["mine"] = BUILTIN_BACKENDS["local"]  # type: ignore[index]


# --- a backend from outside rx ------------------------------------------------------------------------------


def test_a_registered_backend_is_selectable(double: str) -> None:
    assert double in remote_backend_names()
    assert remote_backend_names()[:2] == ("openssh", "paramiko")
    assert check_backend_name(double) == double
    assert backend_class(double) is DoubleBackend
    backend = create(double, HostSpec("box"))
    assert isinstance(backend, DoubleBackend)
    assert backend.spec == HostSpec("box")
    with pytest.raises(ConfigError) as caught:
        check_backend_name("telnet")
    assert caught.value.hint == "openssh, paramiko or double"


def test_the_pool_creates_a_registered_backend_and_runs_through_it(double: str, tmp_path: Path) -> None:
    with BackendPool() as pool:
        backend = pool.get(HostSpec("box"), double)
        assert type(backend) is DoubleBackend
        result = backend.run([sys.executable, "-c", "import sys; print(sys.argv[1])", "through the double"])
        assert (result.exit_code, result.stdout) == (0, b"through the double\n")
        assert pool.get(HostSpec("box"), double) is backend
        source = tmp_path / "source.bin"
        source.write_bytes(bytes(range(256)) * 1000)
        backend.put(source, PurePosixPath(tmp_path / "there.bin"))
        backend.get(PurePosixPath(tmp_path / "there.bin"), tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


def test_unregister_removes_it_again() -> None:
    register("double", TARGET)
    register("double", TARGET)  # the same registration twice changes nothing
    unregister("double")
    assert "double" not in backend_names()
    with pytest.raises(ConfigError):
        check_backend_name("double")


def test_a_backend_registered_as_not_remote_is_not_a_user_choice() -> None:
    registry = BackendRegistry()
    registry.register("sandbox", TARGET, remote=False)
    assert "sandbox" in registry.names()
    assert "sandbox" not in registry.remote_names()
    assert registry.entry("sandbox").load() is DoubleBackend
    assert "sandbox" not in backend_names()  # an own registry leaves the process's alone


@pytest.mark.parametrize("target", ["backend_double", "backend_double:", ":DoubleBackend", ""])
def test_a_malformed_target_is_refused(target: str) -> None:
    with pytest.raises(ConfigError, match="cannot register"):
        BackendRegistry().register("x", target)


def test_a_taken_name_is_refused_and_builtins_stay() -> None:
    registry = BackendRegistry()
    with pytest.raises(ConfigError, match=r"already registered as .remote_exec\.backends\.openssh"):
        registry.register("openssh", TARGET)
    with pytest.raises(ConfigError, match="built in"):
        registry.unregister("paramiko")
    assert registry.names() == ("openssh", "paramiko", "local")


# --- the pool -----------------------------------------------------------------------------------------------


class Counting:
    """A factory of local backends that remembers what it made and which of them were closed."""

    def __init__(self) -> None:
        self.made: list[tuple[str, HostSpec]] = []
        self.closed: list[Backend] = []

    def __call__(self, name: str, spec: HostSpec) -> Backend:
        self.made.append((name, spec))
        factory = self

        class Recorded(LocalBackend):
            def close(self) -> None:
                factory.closed.append(self)
                if spec.host == "broken":
                    raise OSError("cannot close")

        return Recorded(spec)


def test_one_backend_per_host_and_name_until_closed() -> None:
    factory = Counting()
    pool = BackendPool(factory)
    first = pool.get(HostSpec("a"), "openssh")
    assert pool.get(HostSpec("a"), "openssh") is first
    other_name = pool.get(HostSpec("a"), "paramiko")
    other_host = pool.get(HostSpec("a", port=2222), "openssh")
    assert len({id(first), id(other_name), id(other_host)}) == 3
    assert len(pool) == 3
    assert factory.made == [("openssh", HostSpec("a")), ("paramiko", HostSpec("a")),
                            ("openssh", HostSpec("a", port=2222))]
    pool.close()
    assert sorted(map(id, factory.closed)) == sorted(map(id, (first, other_name, other_host)))
    assert len(pool) == 0
    assert pool.get(HostSpec("a"), "openssh") is not first  # a closed pool starts afresh
    pool.close()


def test_close_closes_every_backend_even_when_one_fails() -> None:
    factory = Counting()
    pool = BackendPool(factory)
    backends = [pool.get(HostSpec(host), "openssh") for host in ("a", "broken", "c")]
    pool.close()  # does not raise
    assert sorted(map(id, factory.closed)) == sorted(map(id, backends))


def test_concurrent_gets_create_one_backend() -> None:
    factory = Counting()
    pool = BackendPool(factory)
    got: list[Backend] = []
    barrier = threading.Barrier(8)

    def get() -> None:
        barrier.wait()
        got.append(pool.get(HostSpec("a"), "openssh"))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(factory.made) == 1
    assert all(backend is got[0] for backend in got)


def test_an_unknown_name_is_a_config_error_from_the_pool() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'telnet'"):
        BackendPool().get(HostSpec("a"), "telnet")


@pytest.mark.parametrize("module_name", ["", ".base", ".registry", ".pool", ".ssh", ".openssh", ".paramiko", ".local"])
def test_backends_all_lists_resolve(module_name: str) -> None:
    module = importlib.import_module(f"remote_exec.backends{module_name}")
    for name in module.__all__:
        assert hasattr(module, name), f"remote_exec.backends{module_name}.{name}"
