"""``rx`` starts lean: a command imports only the module that registers it, and that map stays whole."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from remote_exec.cli import COMMAND_MODULES, app


def test_every_command_is_mapped_to_the_module_that_registers_it() -> None:
    from remote_exec.cli import _register

    _register()
    registered = {(info.name or info.callback.__name__): info.callback.__module__  # type: ignore[union-attr]
                  for info in app.registered_commands}
    assert {name: f"remote_exec.cli.{module}" for name, module in COMMAND_MODULES.items()} == registered


def test_rx_run_imports_neither_the_ledger_nor_the_hosts_commands(isolated: Any) -> None:
    (isolated.root / "job.py").write_text("print('ran')\n")
    probe = ("import sys, runpy\n"
             "sys.argv = ['rx', 'run', 'job.py']\n"
             "try:\n"
             "    runpy.run_module('remote_exec', run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith('remote_exec.cli.')), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=isolated.root, env=isolated.env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.stdout == "ran\n", done.stderr
    loaded = done.stderr.strip().splitlines()[-1]
    assert "remote_exec.cli.run" in loaded
    for other in ("ledger", "hosts", "pool"):  # (run uses sync's progress bar)
        assert f"remote_exec.cli.{other}'" not in loaded, loaded


def test_a_plain_rx_run_leaves_the_heavy_and_the_unused_unimported(isolated: Any) -> None:
    """What a run that declares no dependencies, submits no job and prints no table never needs: rich (~15 ms
    to import), filelock (~10 ms), the scheduler and environment machinery."""
    (isolated.root / "job.py").write_text("print('ran')\n")
    probe = ("import sys, runpy\n"
             "sys.argv = ['rx', 'run', 'job.py']\n"
             "try:\n"
             "    runpy.run_module('remote_exec', run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=isolated.root, env=isolated.env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.stdout == "ran\n", done.stderr
    loaded = set(done.stderr.strip().splitlines()[-1].split())
    assert "remote_exec.coordinator" in loaded
    unwanted = {"rich", "rich.console", "filelock", "remote_exec.jobs", "remote_exec.envs.manager",
                "remote_exec.protocol.envs", "remote_exec.launchers.slurm"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_help_and_a_mistyped_command_still_see_every_command(isolated: Any) -> None:
    helped = subprocess.run([sys.executable, "-m", "remote_exec", "--help"], env=isolated.env(), capture_output=True,
                            text=True, timeout=60, check=False)
    for name in COMMAND_MODULES:
        assert f"\n  {name} " in helped.stdout, (name, helped.stdout)
    typo = subprocess.run([sys.executable, "-m", "remote_exec", "rnu"], env=isolated.env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert typo.returncode == 2 and "run" in typo.stderr, typo.stderr
