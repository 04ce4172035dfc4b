"""The public API: ``remote_exec.__all__`` is sorted and every name in it resolves (as httpx checks its own)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import remote_exec

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted() -> None:
    assert remote_exec.__all__ == sorted(remote_exec.__all__)
    assert len(set(remote_exec.__all__)) == len(remote_exec.__all__)


def test_every_exported_name_resolves() -> None:
    for name in remote_exec.__all__:
        assert getattr(remote_exec, name) is not None, name
    assert sorted(dir(remote_exec)) == sorted(remote_exec.__all__)


def test_exported_errors_share_one_root() -> None:
    for name in remote_exec.__all__:
        value = getattr(remote_exec, name)
        if isinstance(value, type) and issubclass(value, BaseException) and name != "RemoteTraceback":
            assert issubclass(value, remote_exec.RemoteExecError), name


def test_submodule_all_lists_resolve() -> None:
    for module_name in ("errors", "task", "session", "advice", "api", "chains", "config", "coordinator",
                        "serialization", "packing", "protocol.wire", "protocol.bootstrap", "protocol.call",
                        "protocol.channel", "protocol.collect", "protocol.detached", "protocol.options",
                        "protocol.workers", "launchers", "launchers.registry", "advices", "runner",
                        "workspace.recorder", "workspace.outcome"):
        module = importlib.import_module(f"remote_exec.{module_name}")
        for name in module.__all__:
            assert hasattr(module, name), f"remote_exec.{module_name}.{name}"


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        remote_exec.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("remote_exec.NoSuchThing resolved")


def test_importing_the_package_stays_light() -> None:
    """``import remote_exec`` loads neither the CLI stack nor SSH libraries (they load on first use)."""
    code = ("import sys, remote_exec; heavy = {'typer', 'rich', 'paramiko', 'fabric', 'cloudpickle'};"
            "print(sorted(heavy & {m.partition('.')[0] for m in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "[]"
