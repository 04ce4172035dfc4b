"""Starting a runner: the bootstrap one-liner, the handshake, and the archive upload when the host lacks it.

One exec per runner: ``python3 -c BOOTSTRAP <token> <archive sha256> <workdir> <mode> [args]`` (see
:func:`runner_argv`), started by the target's launcher over its backend. ``<token>`` is random per start:
the bootstrap's answers are lines ``RXBOOT2 <token> WORD`` on stdout, and whatever comes before the first
of them is what the remote login shell (``.bashrc`` banners, conda or module notices) or a site hook
printed: it is skipped, up to :data:`NOISE_LIMIT` bytes within the handshake timeout, and shown when the
bootstrap never answers. The words: ``HAVE`` (the archive is installed), ``NEED`` (then it receives the
archive as an 8-byte length and the bytes, checks its sha256, installs it atomically under
``<workdir>/archives/<sha256>/`` and answers ``OK``; ``NEED damaged`` when an installed copy failed its
check), or ``OLDPY X.Y.Z``. An installed archive carries ``.rx-sizes`` (the size of each of its files
but its code bundle, which checks its own size and may be removed and written again), checked on every
use: a file a scratch cleaner deleted or a crash truncated makes the bootstrap install the archive again
instead of failing on an import.

A per-call runner does not wait for that answer: where this coordinator process (or an earlier one: see
:mod:`.places`) saw a runner of the same archive answer at once (no replaced login shell), the call (its
``G``, ``S`` and ``s`` frames, never secrets) goes right behind the command, after the line :data:`AHEAD`,
and the token ends in ``.e``: the bootstrap reads that line after its ``HAVE``, and answers ``NEED`` and
ends when the archive is missing (the coordinator then starts it the usual way). That is one round trip
less per call. Where that archive was never seen (and it is small), it goes right behind the command
unasked, as its 8-byte length and bytes after :data:`AHEAD`, the call's frames (if any) behind it, and the
token ends in ``.a`` (``.ae`` with the call): a bootstrap that has the archive skips those bytes, one that
lacks it answers ``NEED`` and installs it from stdin without waiting, then ``OK``. A backend that can
(:meth:`~remote_exec.backends.base.Backend.feeding`: the openssh backend) writes what goes ahead as it
spawns the command, before it waits for the host to run it, so that those bytes reach the host with the
command rather than a round trip after it.

Before it imports anything, the bootstrap moves the real stdout to a private file descriptor and points
fd 1 at stderr: what a ``sitecustomize``, ``usercustomize`` or ``.pth`` hook prints later (or flushes at
exit) goes to stderr and never into the frames. Then it imports the runner from the archive (served from the
archive's code bundle for this interpreter once a runner wrote one: :mod:`remote_exec.runner.bundle`) and
hands it stdin and that descriptor: from there on, frames (:mod:`.wire`).
"""

from __future__ import annotations

import logging
import secrets
import shlex
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..backends.base import Backend, Feed, Process
from ..errors import RemoteExecError, RunnerError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from . import places
from .channel import Channel, drain_stderr
from .options import CallOptions, PhaseCallback
from .places import Place

__all__ = ["BOOTSTRAP", "MIN_PYTHON", "NOISE_LIMIT", "Handshake", "find_handshake", "new_token",
           "runner_argv", "start_runner"]

logger = logging.getLogger(__name__)

#: Minimum remote Python version the runner supports.
MIN_PYTHON = (3, 8)
#: Bytes of login output skipped before the bootstrap's first answer; past this the start fails.
NOISE_LIMIT = 1 << 16
#: What starts each of the bootstrap's answers (then the call's token, a space and the word).
MARKER = b"RXBOOT2 "
#: Seconds without an answer after which the command is also offered on stdin, for a login shell that
#: replaced itself (see :class:`_Start`).
RESUME_AFTER = 2.0
#: Seconds without the bootstrap's answer after which the archive is read ahead, in case it is asked for.
PREFETCH_AFTER = 0.02
#: What goes first on the stdin of a runner whose call is sent right behind its command (the bootstrap
#: reads it): should a login shell that replaced itself read that stdin, it ends there, and never runs
#: what follows (the call's frames) as commands.
AHEAD = b"exit 97\n"

# The install branch of the bootstrap (run only when the archive is missing): it travels as a string
# literal in the bootstrap and is compiled only then, so the usual call compiles a third of the code
# (~0.3 ms of each call's start on the host). Globals of the bootstrap it uses: s, a, c, h, p, j. The
# archive is read from fd 0 unbuffered (the call's frames follow it there) and hashed piece by piece as it
# arrives (the built-in sha256 takes ~2 ms of rx's archive, now mostly while ssh still carries it). Every
# entry is checked and its folder made first; then two threads extract half the bytes each (the largest
# file first to the one with less so far; zlib and the writes release the GIL: 11 -> 7 ms for rx's archive
# on the testbed), and the first waits for the second to be gone before anything forks.
_INSTALL = r"""
import zlib
try:from _sha256 import sha256
except ImportError:
    try:from _sha2 import sha256
    except ImportError:from hashlib import sha256
os.makedirs(a,mode=0o700,exist_ok=True);os.chmod(c,0o700)
s(b'NEED'+j)
n=8;z=[];g=sha256();l=None
while n:
    b=os.read(0,min(n,1<<20))
    if not b:raise SystemExit('rx bootstrap: archive upload cut short')
    n-=len(b)
    if l is None:
        z.append(b)
        if not n:n=l=int.from_bytes(b''.join(z),'big');z=[]
    else:z.append(b);g.update(b)
if g.hexdigest()!=h:raise SystemExit('rx bootstrap: archive sha256 mismatch')
d=b''.join(z);del z
u=lambda i,k:int.from_bytes(d[i:i+k],'little')
t=os.path.join(a,'.tmp-'+os.urandom(8).hex());os.mkdir(t,0o700);y=set([t]);r=[];k=None
def x(n,w):
    try:
        for v,g,o,z,_ in P[n]:
            b=d[o:o+z]
            if g:b=zlib.decompress(b,-15)
            with open(v,'wb') as f:f.write(b)
            i=v[len(t)+1:]
            if i[:9]!='.rx-code-':w.append(b'%d %s\n'%(len(b),i.encode('utf-8')))
    except BaseException as c:w.append(c)
    finally:
        if n:k.release()
try:
    e=d.rfind(b'PK\x05\x06');q=u(e+16,4)
    for _ in range(u(e+10,2)):
        if d[q:q+4]!=b'PK\x01\x02':raise SystemExit('rx bootstrap: damaged archive')
        g,z,f,l,N=u(q+10,2),u(q+20,4),d[q+46:q+46+u(q+28,2)].decode('utf-8'),u(q+42,4),u(q+24,4)
        q+=46+u(q+28,2)+u(q+30,2)+u(q+32,2)
        if f.startswith('/') or '..' in f.split('/') or '\\' in f or '\n' in f:
            raise SystemExit('rx bootstrap: bad entry')
        if f.endswith('/'):continue
        if g not in(0,8):raise SystemExit('rx bootstrap: unknown compression')
        v=os.path.join(t,f);e=os.path.dirname(v)
        if e not in y:os.makedirs(e,exist_ok=True);y.add(e)
        r.append((v,g,l+30+u(l+26,2)+u(l+28,2),z,N))
    P=[[],[]];W=[0,0]
    for E in sorted(r,key=lambda E:-E[4]):I=W[1]<W[0];P[I].append(E);W[I]+=E[4]+8192
    import _thread,time;k=_thread.allocate_lock();k.acquire();w=[];j=[]
    _thread.start_new_thread(x,(1,j));x(0,w);k.acquire()
    while _thread._count():time.sleep(0.0002)
    for c in w+j:
        if not isinstance(c,bytes):raise c
    with open(os.path.join(t,'.rx-sizes'),'wb') as f:f.write(b''.join(w+j))
    try:os.rename(t,p)
    except OSError:
        if not os.path.isdir(p):raise
finally:
    if os.path.isdir(t):
        import shutil;shutil.rmtree(t,ignore_errors=True)
s(b'OK')
""".strip()

# The bootstrap, run as `python3 -c BOOTSTRAP <token> <sha256> <cache-dir> <mode> [args]`. It must stay
# small, standard-library only, and work on every Python from 2.7 upward far enough to report a version
# that is too old. o: the protocol's fd (stdout moved away); s(): one answer; k(): the installed archive
# matches its .rx-sizes (paths as bytes: one stat per file and little else). A token ending in ".e", ".a" or
# ".ae": what came right behind the command, after the line AHEAD (read here, by w()): "a" the archive (its
# length and bytes: skipped when the archive is in place, else installed by _INSTALL, which answers NEED
# without waiting for it), "e" the call. A call ahead of a missing archive that did not come with it: NEED
# ends the bootstrap (the coordinator starts it again the usual way). Otherwise NEED runs _INSTALL. Then the
# archive's code bundle for this interpreter, when there is one, installs its finder (remote_exec.runner.bundle).
BOOTSTRAP = r"""
import sys,os
o=os.dup(1);os.dup2(2,1)
m=('\nRXBOOT2 %s '%sys.argv[1]).encode()
def s(x):os.write(o,m+x+b'\n')
if sys.version_info<(3,8):
    s(('OLDPY %d.%d.%d'%sys.version_info[:3]).encode());sys.exit(3)
h,c=sys.argv[2],os.path.expanduser(sys.argv[3])
a=os.path.join(c,'archives');p=os.path.join(a,h);j=b''
def k():
    try:
        q=os.fsencode(p)+b'/'
        with open(q+b'.rx-sizes','rb') as f:d=f.read()
        for l in d.split(b'\n')[:-1]:
            n,_,e=l.partition(b' ')
            if os.stat(q+e).st_size!=int(n):return 0
        return 1
    except (OSError,ValueError):return 0
if os.path.isdir(p) and not k():
    j=b' damaged';d=os.path.join(a,'.tmp-'+os.urandom(8).hex())
    try:os.rename(p,d)
    except OSError:pass
    import shutil;shutil.rmtree(d,ignore_errors=True)
f=sys.argv[1].rpartition('.')[2] if '.' in sys.argv[1] else '';e='e' in f;A='a' in f
def r(n):
    z=b''
    while len(z)<n:
        b=os.read(0,n-len(z))
        if not b:break
        z+=b
    return z
def w():
    if r(8)!=b'exit 97\n':raise SystemExit('rx bootstrap: what was sent ahead is missing')
if os.path.isdir(p):
    s(b'HAVE')
    if e or A:w()
    if A:
        n=int.from_bytes(r(8),'big')
        while n>0:
            b=os.read(0,min(n,1<<20))
            if not b:raise SystemExit('rx bootstrap: the archive sent ahead is cut short')
            n-=len(b)
elif A:
    w();exec(INSTALL)
elif e:
    s(b'NEED'+j);sys.exit(0)
else:
    exec(INSTALL)
sys.path.insert(0,p)
try:
    import marshal,_frozen_importlib_external as i
    q=os.path.join(p,'.rx-code-%s-%s'%(sys.implementation.cache_tag,i.MAGIC_NUMBER.hex()));f=os.open(q,os.O_RDONLY)
    b=os.pread(f,16,0);n=int.from_bytes(b[:8],'big')
    if int.from_bytes(b[8:],'big')!=os.fstat(f).st_size:raise ValueError
    x=marshal.loads(os.pread(f,n,16));exec(x.pop(''),{'codes':x,'p':p,'bundle':q,'fd':f,'base':16+n})
except Exception:pass
from remote_exec.runner import main
sys.exit(main(sys.argv[3:],o,1))
""".strip().replace("INSTALL", repr(_INSTALL))


def new_token() -> str:
    """A fresh token for one start of the bootstrap (what makes its answers its own)."""
    return secrets.token_hex(8)


def runner_argv(options: CallOptions, archive_sha256: str, mode: str, *extra: str,
                token: str | None = None) -> list[str]:
    """The command that starts the runner in ``mode`` (``serve``, ``worker``, ``detach``, ``attach``,
    ``cancel``) with the archive ``archive_sha256``; its answers carry ``token`` (a fresh one if None)."""
    argv = [options.python, "-c", BOOTSTRAP, token or new_token(), archive_sha256, options.workdir, mode, *extra]
    if mode == "worker":
        argv.append(f"{options.worker_idle:g}")
        if options.placement is not None:
            argv.append(options.placement)
    return argv


class Handshake:
    """One answer of the bootstrap, as read from its stdout.

    Attributes:
        word: ``HAVE``, ``NEED`` (``NEED damaged``), ``OK``, ``OLDPY X.Y.Z``; empty when none came.
        rest: The bytes read past the answer's line (the first frames).
        noise: What came before it: the login shell's (or a site hook's) output, skipped.
        token: The token the answer carried.
    """

    __slots__ = ("noise", "rest", "token", "word")

    def __init__(self, word: str, rest: bytes, noise: bytes, token: str = "") -> None:
        self.word = word
        self.rest = rest
        self.noise = noise
        self.token = token

    def shown(self, limit: int = 200) -> str:
        """The noise as one printable line (its end, at most ``limit`` characters)."""
        text = " / ".join(line.strip() for line in self.noise.decode("utf-8", "replace").splitlines() if line.strip())
        text = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)
        return text if len(text) <= limit else "..." + text[-limit:]


def find_handshake(data: bytes, *tokens: str) -> Handshake | None:
    """The bootstrap's first whole answer carrying one of ``tokens`` in ``data`` (stdout so far), or None
    if there is none yet."""
    found: tuple[int, bytes, str] | None = None
    for token in tokens:
        marker = MARKER + token.encode("ascii") + b" "
        at = data.find(marker)
        if at >= 0 and (found is None or at < found[0]):
            found = (at, marker, token)
    if found is None:
        return None
    at, marker, token = found
    end = data.find(b"\n", at + len(marker))
    if end < 0:
        return None
    noise = data[:at - 1] if data[at - 1:at] == b"\n" else data[:at]  # the bootstrap starts with a newline
    return Handshake(data[at + len(marker):end].decode("ascii", "replace"), data[end + 1:], noise, token)


def read_handshake(process: Process, tokens: Sequence[str], buffer: bytes = b"") -> Handshake:
    """Read the bootstrap's next answer (skipping up to :data:`NOISE_LIMIT` bytes of login output before
    it); an empty word when the stream ended, or held only noise, first."""
    while True:
        found = find_handshake(buffer, *tokens)
        if found is not None:
            return found
        if len(buffer) > NOISE_LIMIT:
            return Handshake("", b"", buffer)
        chunk = process.read_stdout(65536)
        if not chunk:
            return Handshake("", b"", buffer)
        buffer += chunk


def _interpreter_error(host: str, python: str, code: int | None, stderr: bytes, noise: str) -> RunnerError:
    text = stderr.decode("utf-8", "replace").strip()
    last = text.splitlines()[-1] if text else ""
    if code == 127 or "not found" in text or "No such file" in text:
        return RunnerError(f"{python} not found on {host}", reason="interpreter-missing", host=host,
                           hint="install Python 3 there or pass --python /path/to/python3")
    said = f"; the login shell printed: {noise}" if noise else ""
    return RunnerError(f"the runner could not start on {host} with {python} (exit {code}): {last}{said}",
                       reason="crashed", host=host)


class _Start:
    """Waiting for the bootstrap's first answer, and resuming it through a login shell that replaced itself.

    A ``~/.bashrc`` that ends in ``exec zsh`` (or ``exec /bin/dash``) throws away the command sshd gave
    bash; the new shell then reads commands from stdin. So when no answer came within ``resume_after``
    seconds, the same command (its token marked ``r``) goes to stdin as a shell line: a replaced shell
    runs it and the answer carries the marked token. If the first command answers instead (a login that
    was only slow), that line sits in its stdin: the start is done again, without resuming (``stale``).
    Past ``timeout`` the process is dropped (``hung``).
    """

    def __init__(self, process: Process, argv: Sequence[str], token: str, resume_after: float | None) -> None:
        self.process = process
        self.argv = list(argv)
        self.token = token
        self.resume_after = resume_after
        self.lock = threading.Lock()
        self.answered = False
        self.resumed = False
        self.hung = threading.Event()

    def _give_up(self) -> None:
        self.hung.set()
        self.process.kill()

    def _resume(self) -> None:
        with self.lock:
            if self.answered:
                return
            self.resumed = True
        argv = [self.token + "r" if word == self.token else word for word in self.argv]
        try:
            self.process.write_stdin(("exec " + shlex.join(argv) + "\n").encode())
        except Exception:  # the process is gone: the reader sees its end
            logger.debug("resuming the bootstrap through stdin failed", exc_info=True)

    def first_answer(self, timeout: float) -> tuple[Handshake, bool]:
        """The first answer and whether it is ``stale`` (the first command answered after a resume line was
        written to its stdin)."""
        timers = [threading.Timer(timeout, self._give_up)]
        if self.resume_after is not None and self.resume_after < timeout:
            timers.append(threading.Timer(self.resume_after, self._resume))
        for timer in timers:
            timer.daemon = True
            timer.start()
        try:
            answer = read_handshake(self.process, (self.token, self.token + "r"))
        except BaseException:
            self.process.kill()
            raise
        finally:
            for timer in timers:
                timer.cancel()
        with self.lock:
            self.answered = True
            stale = self.resumed and answer.token == self.token
        return answer, stale


def _refusal(backend: Backend, process: Process, options: CallOptions, answer: Handshake,
             hung: bool) -> RemoteExecError:  # shape: one message per way a start fails
    """Why the runner did not start, as the error to raise (the process is dropped)."""
    host = backend.host
    noise = answer.shown()
    if answer.word.startswith("OLDPY"):
        process.kill()
        return RunnerError(f"{options.python} on {host} is Python {answer.word.split()[-1]}; the runner needs "
                           f"{'.'.join(map(str, MIN_PYTHON))} or newer", reason="python-too-old",
                           host=host, hint="pass --python with a newer interpreter")
    if len(answer.noise) > NOISE_LIMIT:
        process.kill()
        return RunnerError(f"the login shell on {host} printed more than {NOISE_LIMIT // 1024} KiB before rx's "
                           f"bootstrap answered: {noise}", reason="login-noise", host=host,
                           hint="make the remote ~/.bashrc quiet for non-interactive shells")
    if hung:
        if noise:
            return RunnerError(f"rx's bootstrap did not answer on {host} within {options.handshake_timeout:g} s; "
                               f"the login shell printed: {noise}", reason="interpreter-hung", host=host,
                               hint="a ~/.bashrc that waits for input or replaces the shell (exec) stops "
                                    "rx's command from running; make it return early for non-interactive shells")
        return RunnerError(f"{options.python} on {host} started but did not answer within "
                           f"{options.handshake_timeout:g} s", reason="interpreter-hung", host=host,
                           hint="check that --python names a Python 3 interpreter")
    code = process.wait(5)
    stderr = drain_stderr(process)
    process.kill()  # ended or hopeless: release its pipes
    link = backend.classify_exit(code, stderr) if not answer.noise else None
    if link is not None:
        return link
    return _interpreter_error(host, options.python, code, stderr, noise)


class _Prefetch:
    """The archive's bytes, read and checked on a thread of their own when the bootstrap's answer is slow to
    come (a new connection: its answer may well be ``NEED``, and reading and hashing the archive then would
    add a millisecond to the call). An answer within :data:`PREFETCH_AFTER` (a connection that is up) costs
    nothing: the archive is read only if it is asked for. An archive that goes ahead unasked is read at once
    (``after`` 0)."""

    def __init__(self, archive: DistributionArchive, after: float = PREFETCH_AFTER) -> None:
        self.archive = archive
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.started = False
        self.done = threading.Event()
        self.timer = threading.Timer(after, self._read)
        self.timer.daemon = True
        self.timer.start()

    def _read(self) -> None:
        with self.lock:
            if self.started:
                return
            self.started = True
        try:
            self.data = self.archive.read()
        except BaseException as exc:  # raised where the bytes are wanted
            self.error = exc
        finally:
            self.done.set()

    def cancel(self) -> None:
        """Not needed after all (the host has the archive)."""
        self.timer.cancel()

    def result(self) -> bytes:
        self.timer.cancel()
        self._read()  # now, unless the timer's thread started it: then wait for that
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.data is not None
        return self.data


def _upload(backend: Backend, process: Process, token: str, rest: bytes, data: bytes, call: bytes = b"") -> bytes:
    """Send the archive the bootstrap asked for (``data``, its bytes), and ``call`` (the call's frames: the
    runner reads them once the archive is installed) right behind it; return the bytes read past its
    ``OK``."""
    try:
        process.write_stdin(b"".join((_framed(data), call)))
    except BaseException:
        process.kill()
        raise
    return _installed(backend, process, token, rest)


def _installed(backend: Backend, process: Process, token: str, rest: bytes) -> bytes:
    """Wait for the bootstrap's ``OK`` to the archive it was sent; return the bytes read past it.

    Raises:
        RunnerError: Installing it failed (what the bootstrap said on stderr).
    """
    try:
        answer = read_handshake(process, (token,), rest)
    except BaseException:
        process.kill()
        raise
    if answer.word != "OK":
        process.wait(5)
        stderr = drain_stderr(process)
        process.kill()
        raise RunnerError(f"installing the archive on {backend.host} failed: "
                          + stderr.decode("utf-8", "replace").strip()[-300:], reason="crashed", host=backend.host)
    return answer.rest


class _Launched(NamedTuple):
    """A started bootstrap: its process, its first answer, whether the call's frames (``sent``) and the
    archive (``shipped``) went right behind the command, and whether the bootstrap took longer than
    :data:`RESUME_AFTER` to answer (``slow``: what was sent ahead was given up, or a slow login was started
    again; on such a host sending ahead does not pay)."""

    process: Process
    answer: Handshake
    sent: bool = False
    shipped: bool = False
    slow: bool = False


def _launch(launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
            mode: str, extra: Sequence[str], call: Callable[[], bytes] | None = None,
            ahead: _Prefetch | None = None) -> _Launched:
    """Start the bootstrap and read its first answer (resumed through a replaced login shell if need be),
    with ``call`` (frames) and ``ahead`` (the archive) written right behind the command when given (see
    :func:`start_runner`).

    Raises:
        RemoteExecError: It did not start (see :func:`_refusal`).
    """
    resume_after: float | None = RESUME_AFTER
    slow = False
    while True:
        flags = ("a" if ahead is not None else "") + ("e" if call is not None else "")
        token = new_token() + (f".{flags}" if flags else "")
        argv = runner_argv(options, archive.sha256, mode, *extra, token=token)
        if flags:
            feed = _ahead_bytes(call, ahead)
            with backend.feeding(feed) as fed:  # written as soon as the command is spawned, where it can be
                process = launcher.start(backend, argv)
            answer, slow = _eager(process, argv, token, fed)
            if answer is not None:
                return _Launched(process, answer, call is not None, ahead is not None)
            call = ahead = None  # the archive is not there, or the login shell is not plain: the usual way
            continue
        process = launcher.start(backend, argv)
        start = _Start(process, argv, token, resume_after)
        answer, stale = start.first_answer(options.handshake_timeout)
        if stale and resume_after is not None:  # a slow login, not a replaced shell: its stdin holds a line
            logger.debug("%s: the login took over %g s; starting the runner again", backend.host, resume_after)
            process.kill()
            resume_after = None
            slow = True  # (nothing goes ahead there: it would wait as long)
            continue
        if answer.word not in ("HAVE", "NEED", "NEED damaged"):
            raise _refusal(backend, process, options, answer, start.hung.is_set())
        if answer.token != token:
            logger.info("%s: the login shell replaced itself (an exec in ~/.bashrc?); rx's command went to the "
                        "new shell on stdin", backend.host)
        return _Launched(process, answer, slow=slow)


def _ahead_bytes(call: Callable[[], bytes] | None, ahead: _Prefetch | None) -> Callable[[], bytes]:
    """What goes right behind the command: :data:`AHEAD`, the archive (its 8-byte length and bytes) when
    ``ahead``, the call's frames when ``call`` (made when this is called: the caller's last preparations,
    the project's scan, overlap the command's start)."""

    def made() -> bytes:
        data = ahead.result() if ahead is not None else None
        frames = call() if call is not None else b""
        return b"".join((AHEAD, b"" if data is None else _framed(data), frames))

    return made


def _framed(archive: bytes) -> bytes:
    """The archive as the bootstrap reads it from stdin: its length (8 bytes) and its bytes."""
    return len(archive).to_bytes(8, "big") + archive


def _eager(process: Process, argv: Sequence[str], token: str, fed: Feed) -> tuple[Handshake | None, bool]:
    """Write what ``fed`` holds right behind the command (unless the backend wrote it as it spawned the
    command) and read the answer: ``HAVE`` (the runner reads its call from stdin: no round trip waited
    for the answer), ``NEED`` when the archive went along (the bootstrap installs it from stdin), else None
    and the process is dropped (a call ahead of a missing or damaged archive, or no answer within
    :data:`RESUME_AFTER`: nothing is resumed through a stdin that holds frames). Also whether no answer
    came in that time (a slow host)."""
    try:
        if fed.started:
            fed.wait()
            written = not fed.failed
        else:
            data = fed.feed()
            try:
                process.write_stdin(data)
                written = True
            except RemoteExecError:
                written = False
    except BaseException:
        process.kill()
        raise
    if not written:  # it ended already: the usual start says why
        process.kill()
        return None, False
    start = _Start(process, argv, token, None)
    answer, _ = start.first_answer(RESUME_AFTER)
    if answer.word == "HAVE" or (_shipped(token) and answer.word in ("NEED", "NEED damaged")):
        return answer, False
    if answer.word == "NEED damaged":
        logger.warning("rx's copy of its archive was damaged (a file missing or cut short); sending it again")
    logger.debug("the runner answered %r to what was sent ahead; starting it again", answer.word)
    process.kill()
    return None, start.hung.is_set()


def _shipped(token: str) -> bool:
    """Whether the archive went right behind the command of ``token`` (its ``.a`` flag)."""
    return "a" in token.rpartition(".")[2] if "." in token else False


def start_runner(launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
                 mode: str, phase: PhaseCallback, extra: Sequence[str] = (), *,
                 call: Callable[[], bytes] | None = None, eager: bool = False,
                 place: Place | None = None) -> Channel:
    """Start the runner through ``launcher``; send the archive only if the host lacks it (or its copy was
    damaged).

    ``call``: makes the call's frames, written before the bootstrap's answer to them would have asked for
    them (one round trip less per call). With ``eager`` (only where this archive is known to be installed
    and the login to run rx's command at once) they go right behind the command; if the bootstrap lacked
    the archive, it is started again the usual way, the call not sent. Else they go right behind the
    archive when the bootstrap asks for that (no login shell reads that stdin any more: the bootstrap
    does). The channel's ``call_sent`` says whether they went. Its ``prompt`` says whether the bootstrap
    answered the command itself (no replaced login shell) with the archive in place, and what was sent
    ahead, if anything, was answered within :data:`RESUME_AFTER` (a host slower to start than that is not
    sent anything ahead again: each such start would wait that long, then start over).

    ``place``: what rx saw installed where the runner starts (see :mod:`.places`; None: looked up here
    unless ``eager``), told how this start went. A small archive never seen there goes right behind the
    command without waiting to be asked, and ``call``'s frames behind it; a bootstrap that has it skips it,
    one that lacks it installs it. If that start does not answer at once (a login shell that replaced
    itself ends at :data:`AHEAD`), it is started again the usual way.

    Raises:
        ConnectError, AuthError, HostKeyError: The host could not be reached (as the backend classifies
            how the command ended).
        RunnerError: The interpreter is missing, too old or hung, the login shell printed too much or kept
            the bootstrap from running, or installing the archive failed.
    """
    phase("connect", "started")
    if place is None and not eager:  # (eager: this process saw the archive there, and noted it then)
        place = places.place(backend, options.python, options.workdir)
    archive_ahead = place is not None and place.send_ahead(archive.sha256, archive.size)
    prefetch = None if eager and not archive_ahead else _Prefetch(archive, 0.0 if archive_ahead else PREFETCH_AFTER)
    ahead_call = call if eager or archive_ahead else None
    try:
        launched = _launch(launcher, backend, archive, options, mode, extra, ahead_call,
                           prefetch if archive_ahead else None)
    except BaseException:
        if prefetch is not None:
            prefetch.cancel()
        phase("connect", "failed")
        raise
    phase("connect", "finished")
    channel = _opened(backend, launched, phase, archive, prefetch, call)
    _note(place, backend, options, archive, channel.prompt)
    return channel


def _opened(backend: Backend, launched: _Launched, phase: PhaseCallback, archive: DistributionArchive,
            prefetch: _Prefetch | None, call: Callable[[], bytes] | None) -> Channel:
    """The channel to a bootstrap that answered ``HAVE``, or ``NEED`` (then the archive installed first,
    :func:`_install`), as :func:`start_runner` returns it."""
    process, answer, sent, shipped, slow = launched
    if answer.noise:
        logger.debug("%s: skipped %d bytes the login shell printed: %s", backend.host, len(answer.noise),
                     answer.shown())
    if answer.word == "HAVE":
        if prefetch is not None:
            prefetch.cancel()
        channel = Channel(backend, process, answer.rest, uploaded=False)
        channel.call_sent = sent
    else:
        rest = _install(backend, process, answer, phase, archive, prefetch, None if shipped else call, shipped)
        channel = Channel(backend, process, rest, uploaded=True)
        channel.call_sent = call is not None
    channel.prompt = not answer.token.endswith("r") and not slow
    return channel


def _install(backend: Backend, process: Process, answer: Handshake, phase: PhaseCallback,
             archive: DistributionArchive, prefetch: _Prefetch | None, call: Callable[[], bytes] | None,
             shipped: bool) -> bytes:
    """The ``upload`` phase of a bootstrap that answered ``NEED``: wait for its ``OK`` to the archive that
    went right behind the command (``shipped``), else send it the archive (``prefetch``: its bytes read
    ahead, if they were) and ``call``'s frames behind it first; return the bytes read past the ``OK``."""
    if answer.word == "NEED damaged":
        logger.warning("%s: rx's copy of its archive was damaged (a file missing or cut short); sending it again",
                       backend.host)
    phase("upload", "started")
    try:
        if shipped:  # the bootstrap installs it now
            rest = _installed(backend, process, answer.token, answer.rest)
        else:
            try:
                data = prefetch.result() if prefetch is not None else archive.read()
                frames = call() if call is not None else b""
            except BaseException:
                process.kill()
                raise
            rest = _upload(backend, process, answer.token, answer.rest, data, frames)
    except BaseException:
        phase("upload", "failed")
        raise
    phase("upload", "finished")
    return rest


def _note(place: Place | None, backend: Backend, options: CallOptions, archive: DistributionArchive,
          prompt: bool) -> None:
    """Tell rx's record of the place how this start went (a start that was not prompt is noted even where
    the caller, sure of the place, looked nothing up)."""
    if place is None and not prompt:
        place = places.place(backend, options.python, options.workdir)
    if place is not None:
        place.note(archive.sha256, prompt=prompt)
