"""Restricted mode: results from a host you do not fully trust are unpickled through an allow-list."""

from __future__ import annotations

import collections
import datetime
import os
import pickle
from pathlib import Path

import pytest

from remote_exec.errors import SerializationError
from remote_exec.serialization import restricted_loads


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, ("touch /tmp/rx-restricted-pwned",))


def test_plain_data_and_builtin_exceptions_pass() -> None:
    value = {"a": [1, 2.5, "x", b"y", None, True], "t": (1, 2), "s": {3}, "f": frozenset({4}),
             "d": datetime.datetime(2026, 1, 2, 3, 4, 5), "c": collections.Counter("aab"),
             "e": ValueError("bad", 2)}
    loaded = restricted_loads(pickle.dumps(value, protocol=5))
    assert loaded["a"] == value["a"] and loaded["d"] == value["d"] and loaded["c"] == value["c"]
    assert isinstance(loaded["e"], ValueError) and loaded["e"].args == ("bad", 2)


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    canary = Path("/tmp/rx-restricted-pwned")
    canary.unlink(missing_ok=True)
    with pytest.raises(SerializationError, match=r"refused to unpickle (posix|os)\.system"):
        restricted_loads(pickle.dumps(Payload(), protocol=5))
    assert not canary.exists()


def test_other_classes_need_an_explicit_allowance() -> None:
    data = pickle.dumps(Path("/x"), protocol=5)
    with pytest.raises(SerializationError, match="pathlib"):
        restricted_loads(data)
    assert restricted_loads(data, allow=["pathlib"]) == Path("/x")
    assert restricted_loads(data, allow=["pathlib.PosixPath"]) == Path("/x")


def test_a_task_in_restricted_mode_returns_data_but_not_arbitrary_objects(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from remote_exec import task

    monkeypatch.setenv("RX_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("RX_CACHE_DIR", str(tmp_path / "cache"))
    data = task(restricted=True)(lambda: {"loss": 0.25, "steps": [1, 2]})
    assert data() == {"loss": 0.25, "steps": [1, 2]}
    path = task(restricted=True)(lambda: Path("/srv/model.bin"))
    with pytest.raises(SerializationError, match="restricted mode refused"):
        path()
    allowed = task(restricted=True, allow_unpickle=["pathlib"])(lambda: Path("/srv/model.bin"))
    assert allowed() == Path("/srv/model.bin")
