"""The runner reads each of a result's files once: the tar stream's bytes are hashed as they go, and the
list (path, size, sha256) follows them; a file that cannot be read is skipped and listed as such."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from remote_exec.runner import result


class _Frames:
    """What the runner's ``Out`` is to ``_send_files`` and ``_send_file_list``: frames, kept."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bytes]] = []

    def send_chunks(self, kind: bytes, data: bytes) -> None:
        self.frames.append((kind, bytes(data)))

    def send(self, kind: bytes, payload: bytes = b"", *, signed: bool = False) -> None:
        self.frames.append((kind, bytes(payload)))

    def json_text(self, value: Any) -> str:
        return json.dumps(value)


def test_each_file_is_read_once_and_listed_with_the_hash_of_what_went(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    contents = {"a.txt": b"alpha", "deep/b.bin": os.urandom(3 << 20), "empty": b""}
    for name, data in contents.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    read: list[tuple[str, int]] = []  # (path, which opening of it) for each read
    opened: list[str] = []
    real_open = builtins.open

    def counting(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        stream = real_open(path, mode, *args, **kwargs)
        if "r" not in mode:
            return stream
        opened.append(str(path))
        opening = len(opened)

        def counted_read(size: int = -1) -> Any:
            read.append((str(path), opening))
            return stream.read(size)

        return _Counted(stream, counted_read)

    monkeypatch.setattr(result, "open", counting, raising=False)
    files, skipped = result._manifest(str(tmp_path), [], lambda: None)
    out = _Frames()
    result._send_files(str(tmp_path), files, out)  # type: ignore[arg-type]
    result._send_file_list(files, out)  # type: ignore[arg-type]
    assert skipped == []
    kinds = [kind for kind, _ in out.frames]
    assert set(kinds[:-1]) == {b"F"} and kinds[-1] == b"L"  # the list follows the files
    listed = sorted(json.loads(out.frames[-1][1]), key=lambda entry: entry["path"])
    assert listed == [{"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in sorted(contents.items())]
    stream = io.BytesIO(b"".join(payload for kind, payload in out.frames if kind == b"F"))
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        sent = {member.name: archive.extractfile(member).read() for member in archive  # type: ignore[union-attr]
                if member.isfile()}
    assert sent == contents
    for name in contents:
        readings = {opening for path, opening in read if path == str(tmp_path / name)}
        assert len(readings) <= 1, f"{name} was read {len(readings)} times"  # (an empty one maybe not at all)


class _Counted:
    def __init__(self, stream: Any, read: Any) -> None:
        self._stream, self.read = stream, read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()


def test_a_file_that_cannot_be_read_is_skipped_before_anything_is_sent(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ok.txt").write_bytes(b"ok")
    (tmp_path / "secret.txt").write_bytes(b"no")
    real_open = builtins.open

    def refusing(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("secret.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(result, "open", refusing, raising=False)
    files, skipped = result._manifest(str(tmp_path), [], lambda: None)
    assert [entry["path"] for entry in files] == ["ok.txt"]
    assert skipped == [{"path": "secret.txt", "reason": "Permission denied"}]
