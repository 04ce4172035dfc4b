"""A per-call runner's call sent right behind its command (no round trip waits for the bootstrap's answer),
where this process (or an earlier rx, see remote_exec.protocol.places) saw a runner of the same archive answer
at once: the call runs as before, and a host that lost the archive and a call with secrets go the usual way.
Where the archive was never seen, it goes right behind the command too, unasked, and the call behind it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from remote_exec.backends.base import Process
from remote_exec.backends.local import LocalBackend
from remote_exec.task import Task


def _flags(token: str) -> str:
    """What went right behind the command (the token's suffix): "a" the archive, "e" the call."""
    return token.rpartition(".")[2] if "." in token else ""


class _Recording(LocalBackend):
    """A local backend that keeps the commands it started and what went to their stdin first."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []

    def start(self, argv: Sequence[str], **kwargs: Any) -> Process:
        self.tokens.append(argv[3])  # python -c BOOTSTRAP <token> ...
        return super().start(argv, **kwargs)


def test_the_second_call_goes_ahead_and_runs_as_before(dispatcher: Any) -> None:
    backend = _Recording()
    first = dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend)
    second = dispatcher.run(Task.from_function(lambda a, b: a + b), (3, 4), backend=backend)
    third = dispatcher.run("print('script ahead')\n", backend=backend)
    assert (first.result.value, second.result.value) == (3, 7)
    assert third.text() == "script ahead\n" and third.result.exit_code == 0
    assert [_flags(token) for token in backend.tokens] == ["ae", "e", "e"]


class _Writes(_Recording):
    """A recording backend that also keeps the size of each write to its commands' stdin."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    def start(self, argv: Sequence[str], **kwargs: Any) -> Process:
        process = super().start(argv, **kwargs)
        write = process.write_stdin

        def recorded(data: bytes) -> None:
            self.writes.append(len(data))
            write(data)

        process.write_stdin = recorded  # type: ignore[method-assign]
        return process


def test_a_first_call_goes_right_behind_the_archive(dispatcher: Any) -> None:
    """The archive was never seen there: it goes right behind the command, unasked, and the call's frames
    behind it, in one write (two round trips less on a host's first call)."""
    from remote_exec.protocol.bootstrap import AHEAD

    backend = _Writes()
    first = dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend)
    assert first.result.value == 3 and first.outcome.uploaded
    archive = len(AHEAD) + 8 + dispatcher.archive.size
    assert backend.writes[0] > archive  # the archive and the call's frames at once
    assert sum(backend.writes) - backend.writes[0] < 64  # then only the answer to the result (A)
    assert [_flags(token) for token in backend.tokens] == ["ae"]
    secret = _Writes()  # a call with secrets waits for the answer; the archive does not
    call = dispatcher.run("import os\nprint(os.environ['RX_TOKEN'])\n", backend=secret,
                          secret_env={"RX_TOKEN": "s3cr3t"}, workdir=dispatcher.workdir.with_name("fresh"))
    assert call.text() == "s3cr3t\n" and call.outcome.uploaded
    assert secret.writes[0] == archive and [_flags(token) for token in secret.tokens] == ["a"]


def test_a_host_that_lost_the_archive_gets_it_again(dispatcher: Any) -> None:
    """The call went ahead, the bootstrap found no archive: it is started again, the archive sent, the
    call run once."""
    backend = _Recording()
    dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend)
    # moved away at once, not removed file by file: the last runner may still be writing its code bundle there
    installed = dispatcher.workdir / "archives" / dispatcher.archive.sha256
    installed.rename(installed.with_name("lost"))
    again = dispatcher.run("print('once')\n", backend=backend)
    assert again.text() == "once\n" and again.outcome.uploaded
    assert [_flags(token) for token in backend.tokens] == ["ae", "e", ""]


def test_secrets_never_go_ahead_of_the_answer(dispatcher: Any) -> None:
    backend = _Recording()
    dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend)
    call = dispatcher.run("import os\nprint(os.environ['RX_TOKEN'])\n", backend=backend,
                          secret_env={"RX_TOKEN": "s3cr3t"})
    assert call.text() == "s3cr3t\n"
    assert [_flags(token) for token in backend.tokens] == ["ae", ""]


class _ShellReplacedOnce(LocalBackend):
    """The first call sent ahead lands in a shell reading its stdin (a login shell that replaced itself
    since the last call, as an ``exec zsh`` added to ~/.bashrc would)."""

    def __init__(self) -> None:
        super().__init__()
        self.shells = 0

    def start(self, argv: Sequence[str], **kwargs: Any) -> Process:
        if argv[3].endswith(".e") and not self.shells:
            self.shells += 1
            return super().start(["bash"], **kwargs)
        return super().start(argv, **kwargs)


def test_a_shell_reading_the_call_sent_ahead_runs_none_of_it(dispatcher: Any, tmp_path: Any) -> None:
    """The call's frames hold the user's data (here a line of its environment); a shell that reads them stops
    at the line before them (seen failing without it: the shell ran that line)."""
    backend = _ShellReplacedOnce()
    marker = tmp_path / "ran"
    dispatcher.run(Task.from_function(lambda text: len(text)), ("x",), backend=backend)
    line = f"\ntouch {marker}\n"
    call = dispatcher.run(Task.from_function(lambda text: len(text)), (line,), backend=backend, env={"RX_X": line})
    assert backend.shells == 1
    assert call.result.value == len(line)
    assert not marker.exists()


#: A script in a project making warm calls (their frames go ahead, the project scanned while the runner
#: starts): the project changes between them, then a symlink leads out of it, then it is fixed.
SCANNED_AHEAD = '''
import os
from remote_exec import task
from remote_exec.errors import SyncError

@task
def read():
    with open("data.txt") as stream:
        return stream.read()

for version in ("one", "two", "three"):
    with open("data.txt", "w") as stream:
        stream.write(version)
    print(read())
os.symlink("/etc/hostname", "outside")
try:
    read()
except SyncError as exc:
    print("refused:", str(exc).split(":")[0])
os.unlink("outside")
print(read())
'''


def test_a_project_scanned_while_the_runner_starts_ships_what_it_holds_at_the_call(isolated: Any) -> None:
    """Each call sees the project as it was when the call was made (the scan overlaps the runner's start),
    and a project the scan refuses fails that call alone, with the scan's own error."""
    import subprocess
    import sys

    (isolated.root / "pyproject.toml").write_text("")
    (isolated.root / "calls.py").write_text(SCANNED_AHEAD)

    done = subprocess.run([sys.executable, "calls.py"], cwd=isolated.root, env=isolated.env(), capture_output=True,
                          text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["one", "two", "three", f"refused: symlinks in {isolated.root} lead out of "
                                        "the project", "three"]


def test_a_new_backend_is_not_taken_for_one_that_was_primed(dispatcher: Any, monkeypatch: Any) -> None:
    """Whether a runner answered at once is a fact of one backend. A backend made after another was
    dropped may get the same id() (CPython reuses the memory) and must not inherit it: the fault suite's
    tampering backends did, now and then, and saw calls go ahead that should not have. The reuse is made
    certain here: every object has the same id() in the dispatcher's module. (The new backend is of
    another kind, so that rx's record of the place, kept across processes, does not hold it either.)"""
    import remote_exec.protocol.call as call_module

    class _Another(_Recording):
        pass

    monkeypatch.setattr(call_module, "id", lambda obj: 1, raising=False)
    primed = _Recording()
    dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=primed)
    dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=primed)
    backend = _Another()
    again = dispatcher.run(Task.from_function(lambda a, b: a + b), (3, 4), backend=backend)
    assert again.result.value == 7
    assert [_flags(token) for token in primed.tokens] == ["ae", "e"]
    assert [_flags(token) for token in backend.tokens] == ["ae"]  # as to a place never seen: the archive too
    assert not again.outcome.uploaded  # (which it had: skipped)


def test_a_new_process_sends_its_first_call_ahead_where_an_earlier_rx_saw_the_archive(dispatcher: Any) -> None:
    """What rx saw installed where outlives the process: a new process's first call (a new pool of
    workers, new backends) goes right behind the command, as the old process's second call did."""
    from remote_exec.protocol.workers import WorkerPool

    dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=_Recording())
    dispatcher.workers.close()
    dispatcher.workers = WorkerPool()  # as in a new process
    backend = _Recording()
    call = dispatcher.run(Task.from_function(lambda a, b: a * b), (3, 4), backend=backend)
    assert call.result.value == 12 and not call.outcome.uploaded
    assert [_flags(token) for token in backend.tokens] == ["e"]


def test_an_archive_sent_ahead_to_a_host_that_has_it_is_skipped(dispatcher: Any) -> None:
    """rx's record is gone (another machine installed the archive there, or rx's cache was cleared): the
    archive goes ahead and the bootstrap skips it; nothing is installed again."""
    import shutil

    from remote_exec.protocol.places import _folder

    dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=_Recording())
    installed = dispatcher.workdir / "archives" / dispatcher.archive.sha256
    stamp = (installed / ".rx-sizes").stat().st_mtime_ns
    shutil.rmtree(_folder())
    dispatcher.workers.close()
    from remote_exec.protocol.workers import WorkerPool

    dispatcher.workers = WorkerPool()
    backend = _Recording()
    call = dispatcher.run("print('skipped')\n", backend=backend)
    assert call.text() == "skipped\n" and not call.outcome.uploaded
    assert [_flags(token) for token in backend.tokens] == ["ae"]
    assert (installed / ".rx-sizes").stat().st_mtime_ns == stamp


def test_an_archive_sent_ahead_replaces_a_damaged_copy(dispatcher: Any) -> None:
    backend = _Recording()
    dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend, workdir=str(dispatcher.workdir))
    installed = dispatcher.workdir / "archives" / dispatcher.archive.sha256
    victim = next(path for path in sorted(installed.rglob("*.py")) if path.stat().st_size > 100)
    victim.write_bytes(victim.read_bytes()[:50])  # cut short, as a crash or a full disk leaves it
    from remote_exec.protocol.places import _folder

    for record in os.listdir(_folder()):
        os.unlink(os.path.join(_folder(), record))
    fresh = _Recording()
    dispatcher.workers.close()
    from remote_exec.protocol.workers import WorkerPool

    dispatcher.workers = WorkerPool()
    call = dispatcher.run(Task.from_function(lambda a, b: a - b), (5, 3), backend=fresh)
    assert call.result.value == 2 and call.outcome.uploaded
    assert [_flags(token) for token in fresh.tokens] == ["ae"]
    assert victim.stat().st_size > 50


class _ShellAlways(LocalBackend):
    """Every command lands in a shell reading its stdin (a login shell that replaced itself): rx's command
    reaches the runner only as the line it writes to that stdin after RESUME_AFTER."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []

    def start(self, argv: Sequence[str], **kwargs: Any) -> Process:
        self.tokens.append(argv[3])
        return super().start(["bash"], **kwargs)


def test_nothing_goes_ahead_where_the_login_shell_replaced_itself(dispatcher: Any, monkeypatch: Any,
                                                                   tmp_path: Any) -> None:
    """The archive sent ahead lands in a shell: it stops at the line before it and runs none of it; the
    start is made again the usual way (resumed through stdin), and rx notes the place: its next start, in
    this process or another, sends nothing ahead."""
    import remote_exec.protocol.bootstrap as bootstrap

    monkeypatch.setattr(bootstrap, "RESUME_AFTER", 0.3)
    backend = _ShellAlways()
    first = dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend)
    assert first.result.value == 3
    assert [_flags(token) for token in backend.tokens] == ["ae", ""]
    from remote_exec.protocol.workers import WorkerPool

    dispatcher.workers.close()
    dispatcher.workers = WorkerPool()
    again = _ShellAlways()
    second = dispatcher.run(Task.from_function(lambda a, b: a + b), (3, 4), backend=again)
    assert second.result.value == 7
    assert [_flags(token) for token in again.tokens] == [""]


def test_a_large_archive_waits_to_be_asked_for(dispatcher: Any, monkeypatch: Any) -> None:
    import remote_exec.protocol.places as places

    monkeypatch.setattr(places, "AHEAD_LIMIT", dispatcher.archive.size - 1)
    backend = _Recording()
    call = dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend)
    assert call.result.value == 3 and call.outcome.uploaded
    assert [_flags(token) for token in backend.tokens] == [""]


class _SlowStart(_Recording):
    """A host whose interpreter takes ``delay`` seconds to start (a loaded login node, a home on a slow
    network disk)."""

    delay = 0.0

    def start(self, argv: Sequence[str], **kwargs: Any) -> Process:
        import sys

        self.tokens.append(argv[3])
        slow = f"import os, sys, time; time.sleep({self.delay}); os.execv(sys.argv[1], sys.argv[1:])"
        return LocalBackend.start(self, [sys.executable, "-c", slow, *argv], **kwargs)


def test_a_host_too_slow_to_answer_what_was_sent_ahead_is_sent_nothing_ahead_again(dispatcher: Any,
                                                                                     monkeypatch: Any) -> None:
    """A call sent ahead is given up after RESUME_AFTER without an answer and the start made again the usual
    way; neither this process nor the next sends anything ahead there again (each start would wait that
    long first)."""
    import remote_exec.protocol.bootstrap as bootstrap
    from remote_exec.protocol.workers import WorkerPool

    monkeypatch.setattr(bootstrap, "RESUME_AFTER", 0.3)
    backend = _SlowStart()
    assert dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend).result.value == 3
    backend.delay = 0.6  # from now on
    assert dispatcher.run(Task.from_function(lambda a, b: a + b), (3, 4), backend=backend).result.value == 7
    assert [_flags(token) for token in backend.tokens][:2] == ["ae", "e"]
    del backend.tokens[:]
    assert dispatcher.run(Task.from_function(lambda a, b: a + b), (5, 6), backend=backend).result.value == 11
    dispatcher.workers.close()
    dispatcher.workers = WorkerPool()
    later = _SlowStart()
    later.delay = 0.6
    assert dispatcher.run(Task.from_function(lambda a, b: a * b), (3, 4), backend=later).result.value == 12
    assert {_flags(token) for token in backend.tokens + later.tokens} == {""}


class _Feeding(_Recording):
    """A backend that writes what goes ahead as it spawns the command, as the openssh backend does (before
    it waits for the host to run it): the bytes then travel with the command."""

    def __init__(self) -> None:
        super().__init__()
        self.fed = 0

    def start(self, argv: Sequence[str], **kwargs: Any) -> Process:
        fed = self._take_feed()
        process = super().start(argv, **kwargs)
        if fed is not None:
            self.fed += 1
            fed.begin(process.write_stdin)
        return process


def test_what_goes_ahead_may_be_written_by_the_backend_as_it_spawns_the_command(dispatcher: Any) -> None:
    backend = _Feeding()
    first = dispatcher.run(Task.from_function(lambda a, b: a + b), (1, 2), backend=backend)
    second = dispatcher.run("print('fed')\n", backend=backend)
    assert first.result.value == 3 and first.outcome.uploaded
    assert second.text() == "fed\n" and not second.outcome.uploaded
    assert [_flags(token) for token in backend.tokens] == ["ae", "e"] and backend.fed == 2


def test_what_making_the_bytes_ahead_raised_is_raised_to_the_caller_and_the_command_dropped() -> None:
    """The frames ahead are made while the command starts (the project's scan overlaps it): a scan that
    refuses the project raises its own error, in the caller's thread, and the command is not left running."""
    import pytest

    from remote_exec.backends.base import Feed
    from remote_exec.errors import SyncError
    from remote_exec.protocol.bootstrap import _eager

    def refused() -> bytes:
        raise SyncError("symlinks in /p lead out of the project")

    backend = LocalBackend()
    for backend_writes in (True, False):
        process = backend.start(["sleep", "30"])
        fed = Feed(refused)
        if backend_writes:
            fed.begin(process.write_stdin)
        with pytest.raises(SyncError, match="symlinks"):
            _eager(process, ["sleep", "30"], "t.e", fed)
        assert process.wait(5) is not None
