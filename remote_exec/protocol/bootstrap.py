"""Starting a runner: the bootstrap one-liner, the handshake, and the archive upload when the host lacks it.

One exec per runner: ``python3 -c BOOTSTRAP <archive sha256> <workdir> <mode> [args]`` (see
:func:`runner_argv`), started by the target's launcher over its backend. The bootstrap answers on stdout
with one line: ``RXBOOT1 HAVE`` (the archive is installed), ``RXBOOT1 NEED`` (then it receives the archive
as an 8-byte length and the bytes, checks its sha256, installs it atomically under
``<workdir>/archives/<sha256>/`` and answers ``RXBOOT1 OK``), or ``RXBOOT1 OLDPY X.Y.Z``. Then it imports
the runner from the archive and hands it stdin and stdout: from there on, frames (:mod:`.wire`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..backends.base import Backend, Process
from ..errors import RemoteExecError, RunnerError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from .channel import Channel, drain_stderr
from .options import CallOptions, PhaseCallback

__all__ = ["BOOTSTRAP", "MIN_PYTHON", "runner_argv", "start_runner"]

#: Minimum remote Python version the runner supports.
MIN_PYTHON = (3, 8)

# The bootstrap, run as `python3 -c BOOTSTRAP <sha256> <cache-dir>`. It must stay small, standard-library
# only, and work on every Python from 2.7 upward far enough to report a version that is too old.
BOOTSTRAP = r"""
import sys,os
w=sys.stdout.buffer if hasattr(sys.stdout,'buffer') else sys.stdout
if sys.version_info<(3,8):
    w.write(('RXBOOT1 OLDPY %d.%d.%d\n'%sys.version_info[:3]).encode());w.flush();sys.exit(3)
h,c=sys.argv[1],os.path.expanduser(sys.argv[2])
a=os.path.join(c,'archives');p=os.path.join(a,h)
if os.path.isdir(p):
    w.write(b'RXBOOT1 HAVE\n');w.flush()
else:
    import zlib
    try:from _sha256 import sha256
    except ImportError:
        try:from _sha2 import sha256
        except ImportError:from hashlib import sha256
    os.makedirs(a,mode=0o700,exist_ok=True);os.chmod(c,0o700)
    w.write(b'RXBOOT1 NEED\n');w.flush()
    r=sys.stdin.buffer;n=int.from_bytes(r.read(8),'big');m=[]
    while n:
        b=r.read(min(n,1<<20))
        if not b:raise SystemExit('rx bootstrap: archive upload cut short')
        m.append(b);n-=len(b)
    d=b''.join(m);del m
    if sha256(d).hexdigest()!=h:raise SystemExit('rx bootstrap: archive sha256 mismatch')
    u=lambda i,k:int.from_bytes(d[i:i+k],'little')
    t=os.path.join(a,'.tmp-'+os.urandom(8).hex());os.mkdir(t,0o700);y=set([t])
    try:
        e=d.rfind(b'PK\x05\x06');o=u(e+16,4)
        for _ in range(u(e+10,2)):
            if d[o:o+4]!=b'PK\x01\x02':raise SystemExit('rx bootstrap: damaged archive')
            k,z,f,l=u(o+10,2),u(o+20,4),d[o+46:o+46+u(o+28,2)].decode('utf-8'),u(o+42,4);o+=46+u(o+28,2)+u(o+30,2)+u(o+32,2)
            if f.startswith('/') or '..' in f.split('/') or '\\' in f:raise SystemExit('rx bootstrap: bad entry')
            if f.endswith('/'):continue
            s=l+30+u(l+26,2)+u(l+28,2);b=d[s:s+z]
            if k==8:b=zlib.decompress(b,-15)
            elif k:raise SystemExit('rx bootstrap: unknown compression')
            q=os.path.join(t,f);v=os.path.dirname(q)
            if v not in y:os.makedirs(v,exist_ok=True);y.add(v)
            with open(q,'wb') as g:g.write(b)
        try:os.rename(t,p)
        except OSError:
            if not os.path.isdir(p):raise
    finally:
        if os.path.isdir(t):
            import shutil;shutil.rmtree(t,ignore_errors=True)
    w.write(b'RXBOOT1 OK\n');w.flush()
sys.path.insert(0,p)
from remote_exec.runner import main
sys.exit(main(sys.argv[2:]))
""".strip()


def runner_argv(options: CallOptions, archive_sha256: str, mode: str, *extra: str) -> list[str]:
    """The command that starts the runner in ``mode`` (``serve``, ``worker``, ``detach``, ``attach``,
    ``cancel``) with the archive ``archive_sha256``."""
    argv = [options.python, "-c", BOOTSTRAP, archive_sha256, options.workdir, mode, *extra]
    if mode == "worker":
        argv.append(f"{options.worker_idle:g}")
        if options.placement is not None:
            argv.append(options.placement)
    return argv


def read_handshake(process: Process, buffer: bytes = b"") -> tuple[str, bytes]:
    """The bootstrap's next ``RXBOOT1 ...`` line, and the bytes read past it."""
    while b"\n" not in buffer:
        chunk = process.read_stdout(65536)
        if not chunk:
            return "", buffer
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line.decode("ascii", "replace"), rest


def _interpreter_error(host: str, python: str, code: int | None, stderr: bytes) -> RunnerError:
    text = stderr.decode("utf-8", "replace").strip()
    last = text.splitlines()[-1] if text else ""
    if code == 127 or "not found" in text or "No such file" in text:
        return RunnerError(f"{python} not found on {host}", reason="interpreter-missing", host=host,
                           hint="install Python 3 there or pass --python /path/to/python3")
    return RunnerError(f"the runner could not start on {host} with {python} (exit {code}): {last}",
                       reason="crashed", host=host)


def _first_line(process: Process, timeout: float) -> tuple[str, bytes, bool]:
    """The bootstrap's first line; past ``timeout`` the process is dropped (True: it hung)."""
    # An interpreter that starts but never answers (a wrapper waiting on stdin, a hung NFS home) must not
    # hang the call: past the deadline the process is dropped and the error says so.
    hung = threading.Event()

    def give_up() -> None:
        hung.set()
        process.kill()

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        line, rest = read_handshake(process)
    except BaseException:
        process.kill()
        raise
    finally:
        timer.cancel()
    return line, rest, hung.is_set()


def _refusal(backend: Backend, process: Process, options: CallOptions, line: str,
             hung: bool) -> RemoteExecError:
    """Why the runner did not start, as the error to raise (the process is dropped)."""
    host = backend.host
    if hung and not line.startswith("RXBOOT1"):
        return RunnerError(f"{options.python} on {host} started but did not answer within "
                           f"{options.handshake_timeout:g} s", reason="interpreter-hung", host=host,
                           hint="check that --python names a Python 3 interpreter")
    if line.startswith("RXBOOT1 OLDPY"):
        process.kill()
        return RunnerError(f"{options.python} on {host} is Python {line.split()[-1]}; the runner needs "
                           f"{'.'.join(map(str, MIN_PYTHON))} or newer", reason="python-too-old",
                           host=host, hint="pass --python with a newer interpreter")
    code = process.wait(5)
    stderr = drain_stderr(process)
    process.kill()  # ended or hopeless: release its pipes
    link = backend.classify_exit(code, stderr) if not line else None
    if link is not None:
        return link
    return _interpreter_error(host, options.python, code, stderr)


def _upload(backend: Backend, process: Process, archive: DistributionArchive, rest: bytes) -> bytes:
    """Send the archive the bootstrap asked for; return the bytes read past its ``OK``."""
    data = archive.read()
    try:
        process.write_stdin(len(data).to_bytes(8, "big") + data)
        line, rest = read_handshake(process, rest)
    except BaseException:
        process.kill()
        raise
    if line != "RXBOOT1 OK":
        process.wait(5)
        stderr = drain_stderr(process)
        process.kill()
        raise RunnerError(f"installing the archive on {backend.host} failed: "
                          + stderr.decode("utf-8", "replace").strip()[-300:], reason="crashed", host=backend.host)
    return rest


def start_runner(launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
                 mode: str, phase: PhaseCallback, extra: Sequence[str] = ()) -> Channel:
    """Start the runner through ``launcher``; send the archive only if the host lacks it.

    Raises:
        ConnectError, AuthError, HostKeyError: The host could not be reached (as the backend classifies
            how the command ended).
        RunnerError: The interpreter is missing, too old or hung, or installing the archive failed.
    """
    phase("connect", "started")
    try:
        process = launcher.start(backend, runner_argv(options, archive.sha256, mode, *extra))
        line, rest, hung = _first_line(process, options.handshake_timeout)
        if not line.startswith("RXBOOT1") or line.startswith("RXBOOT1 OLDPY"):
            raise _refusal(backend, process, options, line, hung)
    except BaseException:
        phase("connect", "failed")
        raise
    phase("connect", "finished")
    if line != "RXBOOT1 NEED":
        return Channel(backend, process, rest, uploaded=False)
    phase("upload", "started")
    try:
        rest = _upload(backend, process, archive, rest)
    except BaseException:
        phase("upload", "failed")
        raise
    phase("upload", "finished")
    return Channel(backend, process, rest, uploaded=True)
