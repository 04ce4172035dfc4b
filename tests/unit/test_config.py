"""Configuration in code and from ``[tool.rx]`` of a pyproject.toml."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from remote_exec import CachingAdvice, Configuration, LoggingAdvice, Remote, RemoteAdvice, SubprocessAdvice
from remote_exec.advice import Extension
from remote_exec.chains import chain_for
from remote_exec.config import find_pyproject
from remote_exec.coordinator import Coordinator
from remote_exec.errors import ConfigError


def _pyproject(folder: Path, body: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text("[project]\nname = 'demo'\n\n" + textwrap.dedent(body))
    return path


# -- in code ------------------------------------------------------------------------------------------


def test_defaults_have_a_default_and_a_cached_chain() -> None:
    config = Configuration()
    assert [type(a) for a in chain_for(config, "default")] == [LoggingAdvice, RemoteAdvice]
    assert [type(a) for a in chain_for(config, "cached")] == [CachingAdvice, RemoteAdvice]
    assert config.backend == "openssh" and config.serializer == "pickle"
    assert config.host_key_policy == "accept-new"


def test_building_in_code() -> None:
    gpu = Remote(name="gpu1", host="gpu1.lab.example.org", user="me", port=2222, python="/opt/py/bin/python3",
                 env={"CUDA_VISIBLE_DEVICES": "0"})
    seen: list[Configuration] = []

    class Recorder(Extension):
        def on_init(self, configuration: Configuration) -> None:
            seen.append(configuration)

    config = (Configuration()
              .add_remote(gpu)
              .add_chain("local", [LoggingAdvice(), SubprocessAdvice()])
              .add_extension(Recorder())
              .add_modules_for_distribution("mypkg", "otherpkg"))
    assert config.remote("gpu1") is gpu
    assert [type(a) for a in chain_for(config, "local")] == [LoggingAdvice, SubprocessAdvice]
    assert seen == [config]
    assert config.distribution_modules == ["mypkg", "otherpkg"]
    spec = gpu.spec()
    assert (spec.host, spec.user, spec.port) == ("gpu1.lab.example.org", "me", 2222)


def test_an_unconfigured_remote_is_taken_as_a_host() -> None:
    remote = Configuration().remote("alice@box:2200")
    assert remote.name == "alice@box:2200" and remote.python == "python3"
    spec = remote.spec()
    assert (spec.user, spec.host, spec.port) == ("alice", "box", 2200)


def test_unknown_chain_names_the_configured_ones() -> None:
    with pytest.raises(ConfigError, match="no advice chain named 'fast'") as error:
        chain_for(Configuration(), "fast")
    assert "cached, default" in str(error.value)


def test_environment_chooses_among_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = Configuration(backend="openssh", ssh_config=tmp_path / "configured")
    monkeypatch.delenv("RX_BACKEND", raising=False)
    monkeypatch.delenv("RX_SSH_CONFIG", raising=False)
    assert config.effective_backend() == "openssh"
    assert config.effective_ssh_config() == tmp_path / "configured"
    monkeypatch.setenv("RX_BACKEND", "paramiko")
    monkeypatch.setenv("RX_SSH_CONFIG", str(tmp_path / "from-env"))
    assert config.effective_backend() == "paramiko"
    assert config.effective_backend("openssh") == "openssh"
    assert config.effective_ssh_config() == tmp_path / "from-env"
    assert config.effective_ssh_config(tmp_path / "option") == tmp_path / "option"


def test_an_ssh_config_given_as_a_string_is_a_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # @task(ssh_config="~/lab/ssh_config") is a string: it once failed deep inside the backend ('str' object
    # has no attribute 'is_file')
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RX_SSH_CONFIG", raising=False)
    config = Configuration()
    assert config.effective_ssh_config("~/lab/ssh_config") == tmp_path / "lab" / "ssh_config"
    assert config.effective_ssh_config(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert config.effective_ssh_config("") is None
    spec = config.host_spec(config.remote("gpu1"), {"ssh_config": "~/lab/ssh_config"})
    assert spec.ssh_config == tmp_path / "lab" / "ssh_config"


# -- from pyproject.toml ------------------------------------------------------------------------------


def test_tool_rx_table_is_loaded_from_the_nearest_pyproject(tmp_path: Path) -> None:
    path = _pyproject(tmp_path, """
        [tool.rx]
        backend = "paramiko"
        serializer = "json"
        distribution_modules = ["mypkg"]
        ssh_config = "ssh/config"
        workspace = "runs-here"
        connect_timeout = 4
        chains.local = ["remote_exec.advices.log:LoggingAdvice", "remote_exec.advices.subprocess:SubprocessAdvice"]
        chains.cached = ["remote_exec.advices.cache:CachingAdvice", "remote_exec.advices.remote:RemoteAdvice"]

        [tool.rx.remotes.gpu1]
        host = "gpu1.lab.example.org"
        user = "me"
        port = 2222
        python = "/opt/conda/bin/python"
        env = { CUDA_VISIBLE_DEVICES = "0" }
        timeout = 600

        [tool.rx.remotes.box]
    """)
    nested = tmp_path / "src" / "pkg"
    nested.mkdir(parents=True)
    assert find_pyproject(nested) == path
    config = Configuration.load(nested)
    coordinator = Coordinator()
    assert coordinator.config_for(str(nested)) is coordinator.config_for(str(nested))  # once per directory
    assert config.source == path
    assert config.backend == "paramiko" and config.serializer == "json"
    assert config.distribution_modules == ["mypkg"]
    assert config.ssh_config == tmp_path / "ssh" / "config"
    assert config.workspace == tmp_path / "runs-here"
    assert config.connect_timeout == 4.0
    assert [type(a) for a in chain_for(config, "local")] == [LoggingAdvice, SubprocessAdvice]
    assert [type(a) for a in chain_for(config, "cached")] == [CachingAdvice, RemoteAdvice]
    assert [type(a) for a in chain_for(config, "default")] == [LoggingAdvice, RemoteAdvice]
    gpu = config.remote("gpu1")
    assert (gpu.host, gpu.user, gpu.port, gpu.python) == ("gpu1.lab.example.org", "me", 2222,
                                                          "/opt/conda/bin/python")
    assert dict(gpu.env) == {"CUDA_VISIBLE_DEVICES": "0"} and gpu.timeout == 600
    assert config.remote("box").host == "box"


def test_no_pyproject_gives_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if find_pyproject(tmp_path) is not None:  # pragma: no cover - a pyproject.toml above /tmp
        pytest.skip("a pyproject.toml above the temporary directory")
    config = Configuration.load(tmp_path)
    assert config.source is None and "default" in config.chains


@pytest.mark.parametrize(("body", "message"), [
    ("[tool.rx]\nbackends = 'openssh'\n", r"unknown \[tool.rx\] key\(s\) backends"),
    ("[tool.rx]\nbackend = 'telnet'\n", "unknown backend 'telnet'"),
    ("[tool.rx]\nhost_key_policy = 'yolo'\n", "host_key_policy must be"),
    ("[tool.rx.remotes.gpu1]\nhostname = 'x'\n", r"\[tool.rx.remotes.gpu1\]: unknown key\(s\) hostname"),
    ("[tool.rx.remotes.gpu1]\nport = '22'\n", "port must be an integer"),
    ("[tool.rx.remotes.gpu1]\nenv = { A = 1 }\n", "env must be a table of strings"),
    ("[tool.rx]\nremotes.gpu1 = 'x'\n", r"\[tool.rx.remotes.gpu1\] must be a table"),
    ("[tool.rx]\nchains.x = ['remote_exec.advices.log.LoggingAdvice']\n", "must be written module:Class"),
    ("[tool.rx]\nchains.x = ['no_such_module_rx:Advice']\n", "cannot create advice 'no_such_module_rx:Advice'"),
    ("[tool.rx]\nchains.x = ['remote_exec.advices.log:NoSuchAdvice']\n", "cannot create advice"),
    ("[tool.rx\nbackend = 1\n", "pyproject.toml"),
])
def test_bad_tool_rx_tables_are_config_errors(tmp_path: Path, body: str, message: str) -> None:
    path = _pyproject(tmp_path, body)
    with pytest.raises(ConfigError, match=message):
        Configuration.from_pyproject(path)


def test_unknown_key_error_lists_the_known_keys(tmp_path: Path) -> None:
    path = _pyproject(tmp_path, "[tool.rx]\nserialiser = 'json'\n")
    with pytest.raises(ConfigError) as error:
        Configuration.from_pyproject(path)
    assert "serialiser" in str(error.value) and "serializer" in str(error.value)
    assert str(path) in str(error.value)
