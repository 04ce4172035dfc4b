"""Bad option values get one clear error each, before anything runs or is recorded: on the command line
(exit status 2), in ``@task(...)`` options and in ``[tool.rx.remotes]``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from remote_exec import task
from remote_exec.cli import main
from remote_exec.config import Configuration, check_pull
from remote_exec.errors import ConfigError, UsageError
from remote_exec.workspace import Workspace

BAD_CLI = [
    (["--timeout", "nan"], "--timeout nan"),
    (["--timeout", "inf"], "--timeout inf"),
    (["--timeout", "-5"], "-5"),
    (["--env", "A B=1"], "--env 'A B'"),
    (["--env", "=x"], "--env '=x'"),
    (["--env", "NOEQUALS"], "--env 'NOEQUALS'"),
    (["--pull", "../../*"], "--pull '../../*'"),
    (["--pull", "/etc/*"], "--pull '/etc/*'"),
    (["--pull", "~/x"], "--pull '~/x'"),
    (["--pull", "out/"], "--pull 'out/'"),
    (["--pull", ""], "--pull ''"),
    (["--secret-env", "RX_SURELY_NOT_SET_ANYWHERE"], "--secret-env RX_SURELY_NOT_SET_ANYWHERE"),
]


@pytest.mark.parametrize(("options", "named"), BAD_CLI, ids=[" ".join(o) for o, _ in BAD_CLI])
def test_rx_run_refuses_a_bad_value_with_one_line_and_exit_2(isolated: Any, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, options: list[str],
                                                             named: str) -> None:
    monkeypatch.chdir(isolated.root)
    (isolated.root / "job.py").write_text("print('ran')\n")
    with pytest.raises(SystemExit) as exited:
        main(["run", *options, "job.py"])
    captured = capsys.readouterr()
    assert exited.value.code == 2, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], captured.err
    assert "Traceback" not in captured.err and "ran" not in captured.out
    assert Workspace(isolated.workspace).ids() == []  # nothing ran, nothing recorded


def test_good_pull_globs_are_normalized() -> None:
    assert check_pull(["./out/*.csv", "a//b", "*.txt"]) == ("out/*.csv", "a/b", "*.txt")


@pytest.mark.parametrize(("options", "named"), [
    ({"timeout": math.nan}, "timeout= nan"),
    ({"timeout": math.inf}, "timeout= inf"),
    ({"timeout": -1}, "timeout= -1"),
    ({"timeout": "soon"}, "timeout= 'soon'"),
    ({"env": {"A B": "1"}}, "env= 'A B'"),
    ({"env": {"": "x"}}, "env= ''"),
    ({"env": {"A": 1}}, "env= A"),
    ({"pull": ["../../*"]}, "pull= '../../*'"),
    ({"secret_env": ["RX_SURELY_NOT_SET_ANYWHERE"]}, "secret_env= RX_SURELY_NOT_SET_ANYWHERE"),
])
def test_a_task_with_a_bad_option_raises_a_usage_error_when_called(isolated: Any, options: dict[str, Any],
                                                                    named: str) -> None:
    @task(**options)
    def double(x: int) -> int:
        return 2 * x

    with pytest.raises(UsageError) as raised:
        double(2)
    assert named in str(raised.value)
    assert isinstance(raised.value, ConfigError) and raised.value.exit_code == 2


@pytest.mark.parametrize(("table", "named"), [
    ('timeout = nan', "[tool.rx.remotes.gpu1] timeout nan"),
    ('timeout = inf', "[tool.rx.remotes.gpu1] timeout inf"),
    ('timeout = -3', "[tool.rx.remotes.gpu1] timeout -3"),
    ('env = { "A B" = "1" }', "[tool.rx.remotes.gpu1] env 'A B'"),
])
def test_a_bad_remote_table_is_refused_when_the_configuration_loads(tmp_path: Path, table: str,
                                                                     named: str) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[tool.rx.remotes.gpu1]\nhost = "gpu1"\n{table}\n')
    with pytest.raises(ConfigError) as raised:
        Configuration.from_pyproject(pyproject)
    assert named in str(raised.value)
