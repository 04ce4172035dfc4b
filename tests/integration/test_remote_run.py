"""``rx run --remote HOST SCRIPT ARGS`` against the testbed, on both backends: live output, the script's
exit status, files back into the run's ``files/``, ``--pull``/``--no-pull``, and what the run records."""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from datetime import datetime
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402

pytest_plugins = ["remote_support"]


def expected_files(seed: str) -> dict[str, bytes]:
    """What scripts/write_files.py writes for ``seed`` (kept in step with the script)."""
    return {
        "a.txt": f"alpha {seed}\n".encode(),
        "data.bin": bytes(range(256)) * 64 + seed.encode(),
        "sub/b.txt": f"beta {seed}\nü€\n".encode(),
        "sub/deeper/c.txt": f"gamma {seed}\n".encode(),
    }


def test_output_streams_while_the_script_runs(remote: Remote) -> None:
    remote.copy_script("stream.py")

    done = remote.rx_streamed("run", "--remote", HOST, "stream.py")

    assert done.returncode == 0, done.stderr
    assert [line for _, line in done.lines] == [b"first line", b"second line"]
    (first_at, _), (second_at, _) = done.lines
    # The script sleeps 2 s between its lines: the first one must have been shown during that sleep,
    # not buffered until the end.
    assert second_at - first_at >= 1.5, done.lines
    assert done.duration - first_at >= 1.5, (done.lines, done.duration)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_status_is_the_scripts_and_the_run_records_it(remote: Remote, code: int) -> None:
    remote.copy_script("exit_with.py")

    done = remote.rx("run", "--remote", HOST, "exit_with.py", str(code))

    assert done.returncode == code, done.stderr
    assert done.stdout.splitlines() == [f"exiting with {code}"]
    assert f"about to exit {code}" in done.stderr
    shown = remote.latest()
    listed = remote.json("runs")
    assert [run["run_id"] for run in listed] == [shown["run_id"]]
    for info in (shown, listed[0]):
        assert info["status"] == ("finished" if code == 0 else "failed")
        assert info["exit_code"] == code
        assert info["remote"] == HOST
        assert info["backend"] == remote.backend
        assert info["target"] == "exit_with.py"
        created, started, finished = (datetime.fromisoformat(info[key])
                                      for key in ("created", "started", "finished"))
        assert created <= started <= finished
    assert remote.run_dir(shown["run_id"]).joinpath("stdout.log").read_text() == f"exiting with {code}\n"


def test_uncaught_exception_exits_1_with_the_traceback_on_stderr(remote: Remote) -> None:
    remote.copy_script("raises.py")

    done = remote.rx("run", "--remote", HOST, "raises.py")

    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == ["before the explosion"]
    assert "Traceback (most recent call last):" in done.stderr
    assert ", in explode" in done.stderr
    assert "RuntimeError: exploded: on purpose" in done.stderr
    info = remote.latest()
    assert (info["status"], info["exit_code"]) == ("failed", 1)
    assert info["result"]["exception"]["type"].endswith("RuntimeError")


def test_files_the_script_wrote_land_in_the_run_unchanged(remote: Remote) -> None:
    remote.copy_script("write_files.py")
    seed = secrets.token_hex(4)

    done = remote.rx("run", "--remote", HOST, "write_files.py", seed)

    assert done.returncode == 0, done.stderr
    expected = expected_files(seed)
    remote_digests = json.loads(done.stdout)
    assert remote_digests == {name: hashlib.sha256(data).hexdigest() for name, data in expected.items()}
    run_id = remote.latest()["run_id"]
    landed = remote.files_of(run_id)
    # Only what the script wrote: not rx's private copy of the script.
    assert landed == expected


def test_pull_selects_files_and_no_pull_brings_none(remote: Remote) -> None:
    remote.copy_script("write_files.py")
    expected = expected_files("pulled")

    only_text = remote.rx("run", "--remote", HOST, "--pull", "*.txt", "write_files.py", "pulled")
    assert only_text.returncode == 0, only_text.stderr
    first = remote.latest()["run_id"]
    only_sub = remote.rx("run", "--remote", HOST, "--pull", "sub/deeper/*", "--pull", "data.bin",
                         "write_files.py", "pulled")
    assert only_sub.returncode == 0, only_sub.stderr
    second = remote.latest()["run_id"]
    nothing = remote.rx("run", "--remote", HOST, "--no-pull", "write_files.py", "pulled")
    assert nothing.returncode == 0, nothing.stderr
    third = remote.latest()["run_id"]

    assert remote.files_of(first) == {name: data for name, data in expected.items() if name.endswith(".txt")}
    assert remote.files_of(second) == {name: expected[name] for name in ("data.bin", "sub/deeper/c.txt")}
    assert remote.files_of(third) == {}
    assert len({first, second, third}) == 3


def test_a_script_imports_a_helper_next_to_it_without_listing_it(remote: Remote) -> None:
    remote.copy_script("uses_helper.py")
    remote.copy_script("script_helper.py")

    done = remote.rx("run", "--remote", HOST, "uses_helper.py", "hello")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["HELLO!"]


def test_a_second_run_of_unchanged_code_uploads_no_archive(remote: Remote, fresh_workdir: str) -> None:
    # A workdir of its own: no earlier run put the archive or the project's files there.
    marker = secrets.token_hex(8)
    (remote.project / "pyproject.toml").write_text(f'[tool.rx.remotes.{HOST}]\nworkdir = "{fresh_workdir}"\n')
    (remote.project / f"unique_{marker}.py").write_text(f"MARKER = {marker!r}\n", encoding="utf-8")
    (remote.project / "main.py").write_text(f"import unique_{marker}\nprint(unique_{marker}.MARKER)\n",
                                            encoding="utf-8")

    runs = []
    for _ in range(2):
        done = remote.rx("run", "--remote", HOST, "main.py")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [marker]
        info = remote.latest()
        result = json.loads(remote.run_dir(info["run_id"]).joinpath("result.json").read_text())
        runs.append(([action["name"] for action in info["actions"]], result))

    (first_actions, first_result), (second_actions, second_result) = runs
    # The first run sends the archive, then (once the runner asked) the project's files.
    assert first_actions == ["pack", "connect", "upload", "execute", "sync", "collect"]
    assert first_result["uploaded_archive"] is True
    assert "upload" in first_result["phases"]
    assert second_actions == ["pack", "connect", "execute", "collect"]
    assert second_result["uploaded_archive"] is False
    assert "upload" not in second_result["phases"]
