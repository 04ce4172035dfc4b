"""Session: save/restore as a versioned zip, refusal of damaged or foreign files, Result."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from remote_exec.errors import RemoteError, RemoteTraceback, SessionError
from remote_exec.session import FORMAT, VERSION, Result, Session
from remote_exec.task import Execution, Task


def _session(serializer: str = "pickle") -> Session:
    base = 100

    def shifted(x: int, *, by: int = 0) -> int:
        return base + x + by

    t = Task.from_function(shifted)
    return Session(task=t, execution=Execution.create(t, (5,), {"by": 2}), run_id="20260101-000000-abc123",
                   context={"remote": "gpu1", "options": {"timeout": 3.5, "pull": ["*.csv"]}},
                   serializer=serializer)


@pytest.mark.parametrize("serializer", ["pickle", "json"])
def test_round_trip_keeps_task_arguments_context_and_run(serializer: str) -> None:
    session = _session(serializer)
    restored = Session.loads(session.dumps())
    assert restored.run_id == session.run_id
    assert restored.serializer == serializer
    assert restored.context == session.context
    assert restored.execution.execution_id == session.execution.execution_id
    assert restored.execution.args == (5,) and restored.execution.kwargs == {"by": 2}
    assert restored.task.task_id == session.task.task_id and restored.task.name == session.task.name
    assert restored.task.execute(restored.execution) == 107


def test_script_session_round_trip_through_a_file(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("print('hello')\n")
    t = Task.from_script(script)
    session = Session(task=t, execution=Execution.create(t, ("--rounds", "2")), run_id="r")
    path = tmp_path / "session.zip"
    with path.open("wb") as stream:
        session.save(stream)
    with path.open("rb") as stream:
        restored = Session.restore(stream)
    assert restored.task.kind == "script" and restored.task.source == "print('hello')\n"
    assert restored.execution.args == ("--rounds", "2")


@pytest.mark.parametrize("kind", ["script", "module"])
def test_a_script_or_module_session_crosses_the_wire_without_pickle(tmp_path: Path, kind: str) -> None:
    """A script's (or module's) task travels as built-in data: the runner restores it, with its source, file
    name and id, without loading the pickle module."""
    from remote_exec.session import wire_pickles

    script = tmp_path / "s.py"
    script.write_text("print('hello')\n")
    t = Task.from_script(script) if kind == "script" else Task.from_module("pkg.train", script)
    session = Session(task=t, execution=Execution.create(t, ("--rounds", "2")), run_id="r",
                      context={"cwd": str(tmp_path)})
    data = session.to_wire()
    assert not wire_pickles(data)
    restored = Session.loads(data)
    fields = ("kind", "name", "task_id", "source", "filename", "module", "function")
    assert [getattr(restored.task, name) for name in fields] == [getattr(t, name) for name in fields]
    assert restored.execution.args == ("--rounds", "2") and restored.context == session.context


def test_paths_among_the_options_cross_the_wire_as_strings(tmp_path: Path) -> None:
    """``@task(ssh_config=Path(...))``: the host never reads the options, and a Path there made each call
    load pickle and pathlib on the host (~4 ms of every warm call)."""
    from remote_exec.session import wire_pickles

    t = Task.from_module("pkg.train", tmp_path / "s.py")
    options = {"ssh_config": tmp_path / "ssh_config", "include": [tmp_path / "data"], "timeout": 3}
    session = Session(task=t, execution=Execution.create(t, ()), run_id="r", context={"options": options})
    data = session.to_wire()
    assert not wire_pickles(data)
    assert Session.loads(data).context == {"options": {"ssh_config": str(tmp_path / "ssh_config"),
                                                       "include": [str(tmp_path / "data")], "timeout": 3}}
    assert session.context["options"]["ssh_config"] == tmp_path / "ssh_config"  # the caller's own: unchanged
    assert Session.loads(session.dumps()).context == session.context  # and a saved session keeps its Path


def test_saved_session_is_a_zip_with_readable_metadata() -> None:
    session = _session()
    session.result = Result(value=41)
    with zipfile.ZipFile(io.BytesIO(session.dumps())) as archive:
        meta = json.loads(archive.read("rx-session.json"))
        result = json.loads(archive.read("result.json"))
    assert meta["format"] == FORMAT and meta["version"] == VERSION
    assert meta["task_id"] == session.task.task_id and meta["run_id"] == session.run_id
    assert result["ok"] is True and result["value_repr"] == "41"


def _rewrite_meta(data: bytes, **changes: object) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for name in source.namelist():
            content = source.read(name)
            if name == "rx-session.json":
                content = json.dumps({**json.loads(content), **changes}).encode()
            target.writestr(name, content)
    return buffer.getvalue()


def test_unknown_format_version_is_refused_with_a_clear_message() -> None:
    data = _rewrite_meta(_session().dumps(), version=VERSION + 98)
    with pytest.raises(SessionError) as error:
        Session.loads(data)
    message = str(error.value)
    assert f"version {VERSION + 98}" in message and "not supported" in message
    assert f"reads version {VERSION}" in message


def test_foreign_zip_is_refused() -> None:
    with pytest.raises(SessionError, match="not an rx session: format 'something-else'"):
        Session.loads(_rewrite_meta(_session().dumps(), format="something-else"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(SessionError, match=r"not an rx session: no rx-session.json"):
        Session.loads(buffer.getvalue())


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_file_is_refused(cut: float) -> None:
    data = _session().dumps()
    with pytest.raises(SessionError, match="damaged session"):
        Session.loads(data[: int(len(data) * cut)])


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04garbage"])
def test_non_zip_is_refused(data: bytes) -> None:
    with pytest.raises(SessionError, match="damaged session"):
        Session.loads(data)


def test_damaged_member_is_refused() -> None:
    source = zipfile.ZipFile(io.BytesIO(_session().dumps()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for name in source.namelist():
            target.writestr(name, b"\x80\x05garbage" if name == "task.pkl" else source.read(name))
    with pytest.raises(SessionError, match="damaged session"):
        Session.loads(buffer.getvalue())


def test_result_ok_and_unwrap() -> None:
    assert Result(value=3).ok and Result(value=3).unwrap() == 3
    assert not Result(exit_code=2).ok
    assert not Result(status="timeout").ok

    result = Result.from_exception(KeyError("k"), "Traceback ...\nKeyError: 'k'\n")
    assert not result.ok and result.status == "raised" and result.exception_type == "builtins.KeyError"
    with pytest.raises(KeyError) as raised:
        result.unwrap()
    assert isinstance(raised.value.__cause__, RemoteTraceback)
    assert "KeyError: 'k'" in str(raised.value.__cause__)

    text = Result.from_remote_text("mypkg.Bad", "it broke", "Traceback ...\nmypkg.Bad: it broke\n")
    with pytest.raises(RemoteError) as remote:
        text.unwrap()
    assert remote.value.type_name == "mypkg.Bad" and str(remote.value) == "mypkg.Bad: it broke"
    assert "mypkg.Bad: it broke" in str(remote.value.__cause__)
    assert text.record()["exception"]["type"] == "mypkg.Bad"
