"""A function written by value (``__main__`` code, a lambda, a closure) is rebuilt on the host without
importing cloudpickle there (it costs ~20 ms at every process-per-call call), and behaves as the original."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from remote_exec.serialization import PickleSerializer

REPO = Path(__file__).resolve().parents[2]

#: Written in a process of its own as ``__main__`` code: functions by value, as a user's script's are.
WRITER = '''
import sys
from remote_exec.serialization import PickleSerializer

SCALE = 10

def outer(offset):
    hits = []
    def inner(a, b=2, *, c=3):
        """adds"""
        hits.append(a)
        return (a + b + c + offset) * SCALE, len(hits)
    return inner

def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)

class Point:
    def __init__(self, x):
        self.x = x

sys.stdout.buffer.write(PickleSerializer().dumps((outer(1), lambda q: q * 2, fact, Point(7))))
'''

READER = '''
import sys
from remote_exec.serialization import PickleSerializer

inner, double, fact, point = PickleSerializer().loads(sys.stdin.buffer.read())
print(inner(1), inner(1, 0, c=0), double(4), fact(5), inner.__doc__, inner.__defaults__, inner.__kwdefaults__)
print(point.x, type(point).__name__)
'''


def run(source: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", source], input=stdin, capture_output=True, timeout=60, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def written_then_read(writer: str, reader: str) -> str:
    """What ``reader`` prints of what ``writer`` wrote (each in a process of its own)."""
    written = run(writer)
    assert written.returncode == 0, written.stderr.decode()
    read = run(reader, written.stdout)
    assert read.returncode == 0, read.stderr.decode()
    return read.stdout.decode()


def test_main_functions_lambdas_and_closures_load_as_they_were() -> None:
    written = run(WRITER)
    assert written.returncode == 0, written.stderr.decode()

    read = run(READER, written.stdout)

    assert read.returncode == 0, read.stderr.decode()
    first, second = read.stdout.decode().splitlines()
    assert first == "(70, 1) (20, 2) 8 120 adds (2,) {'c': 3}"
    assert second == "7 Point"  # a class by value: cloudpickle's own rebuilders


def test_a_function_by_value_loads_without_importing_cloudpickle() -> None:
    written = run(WRITER.replace(", Point(7)", ""))
    reader = ("import sys\n"
              "from remote_exec.serialization import PickleSerializer\n"
              "inner, double, fact = PickleSerializer().loads(sys.stdin.buffer.read())\n"
              "print(fact(4), inner(0), sorted(m for m in sys.modules if 'cloudpickle' in m))\n")

    read = run(reader, written.stdout)

    assert read.returncode == 0, read.stderr.decode()
    assert read.stdout.decode().strip() == "24 (60, 1) []"


def test_plain_data_still_loads_with_plain_pickle() -> None:
    data = PickleSerializer().dumps({"a": [1, 2.5, b"x"]})
    assert b"cloudpickle" not in data
    assert PickleSerializer().loads(data) == {"a": [1, 2.5, b"x"]}


#: Functions by value of every shape a user's script gives (``__main__`` code, written in a process of its
#: own): each pickle is written on its own, as a task's is.
CORPUS = '''
import marshal
import math
import sys
from remote_exec.serialization import PickleSerializer

LIMIT = 2.5
NAMES = {"a": [1, -2, 3 ** 70, -(3 ** 70)], "b": (b"x", "\\u00e9t\\u00e9", None, True, False), "c": 1e-300}

def noop(i: int) -> int:
    return i

def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)

def helper(x):
    return x * LIMIT

def uses_globals(x, y=0.5, *, z=NAMES, w=(1, [2], {"k": "v"})):
    """uses globals, a module and another function by value"""
    return math.sqrt(x) + helper(y) + len(z["a"]) + sorted(NAMES)[0].count("a") + w[0]

def outer(offset):
    hits = []
    def inner(a, b=2, *, c=3):
        hits.append(a)
        return (a + b + c + offset), len(hits)
    return inner

def late():
    def get():
        return value
    value = 7
    return get

tagged = lambda q: q * 2
tagged.label = "double"
tagged.__doc__ = "a lambda with attributes"

def unbound():
    if False:
        never = 1
    def inner():
        return never
    return inner

functions = [noop, fact, uses_globals, outer(1), late(), tagged, unbound()]
sys.stdout.buffer.write(marshal.dumps([PickleSerializer().dumps(f) for f in functions]))
'''

COMPARE = '''
import io
import marshal
import sys
from remote_exec import serialization

def describe(f, args):
    try:
        value = repr(f(*args))
    except Exception as exc:
        value = type(exc).__name__
    cells = []
    for cell in f.__closure__ or ():
        try:
            cells.append(repr(cell.cell_contents))
        except ValueError:
            cells.append("<empty>")
    return repr((f.__name__, f.__qualname__, f.__module__, f.__doc__, f.__defaults__, f.__kwdefaults__,
                 f.__annotations__, f.__dict__, sorted(k for k in f.__globals__ if k != "__builtins__"),
                 {k: v for k, v in f.__globals__.items() if k.startswith("__") and k != "__builtins__"},
                 f.__globals__["__builtins__"] is __builtins__, cells, value))

ARGS = [(3,), (6,), (4.0,), (1,), (), (5,), ()]
blobs = marshal.loads(sys.stdin.buffer.read())
ours = [serialization.PickleSerializer().loads(blob) for blob in blobs]
print("pickle loaded:", sorted(set(sys.modules) & {"_pickle", "cloudpickle"}))
theirs = [serialization.ValueUnpickler(io.BytesIO(blob)).load() for blob in blobs]
for mine, other, args in zip(ours, theirs, ARGS):
    a, b = describe(mine, args), describe(other, args)
    print("same" if a == b and mine.__code__ == other.__code__ else f"differ: {a} != {b}")
'''


def test_functions_by_value_load_without_the_c_pickle_module_as_it_would_load_them() -> None:
    """Every shape of function a script sends by value is read without loading the C pickle module, and is
    what the C module (with cloudpickle's rebuilders) makes of the same pickle: name, defaults, docstring,
    annotations, attributes, globals, cells, code, what it returns."""
    lines = written_then_read(CORPUS, COMPARE).splitlines()
    assert lines[0] == "pickle loaded: []"
    assert lines[1:] == ["same"] * 7


def test_a_pickle_beyond_the_functions_reader_loads_with_the_c_module() -> None:
    """What the reader of functions does not know (a class by value, a set, an object's state) goes to the C
    module, whole: the objects come back as they were."""
    writer = ("import sys\n"
              "from remote_exec.serialization import PickleSerializer\n"
              "class Box:\n"
              "    def __init__(self, v):\n"
              "        self.v = v\n"
              "def make(v, kinds={1, 2}):\n"
              "    return Box(v), sorted(kinds)\n"
              "sys.stdout.buffer.write(PickleSerializer().dumps((make, Box(3))))\n")
    reader = ("import sys\n"
              "from remote_exec.serialization import PickleSerializer\n"
              "make, box = PickleSerializer().loads(sys.stdin.buffer.read())\n"
              "made, kinds = make(5)\n"
              "print(made.v, kinds, box.v, type(box).__name__, '_pickle' in sys.modules)\n")

    assert written_then_read(writer, reader).strip() == "5 [1, 2] 3 Box True"


def test_a_session_of_a_function_by_value_is_restored_without_the_c_pickle_module() -> None:
    """What the host's task process does with a ``__main__`` function's call: the session is restored (and
    the function runs) without loading the C pickle module."""
    writer = ("import sys\n"
              "from remote_exec.session import Session\n"
              "from remote_exec.task import Execution, Task\n"
              "def noop_by_value(i: int) -> int:\n"
              "    return i * 2\n"
              "task = Task.from_function(noop_by_value)\n"
              "sys.stdout.buffer.write(Session(task=task, execution=Execution.create(task, (21,)), run_id='r')"
              ".to_wire())\n")
    reader = ("import sys\n"
              "from remote_exec.session import Session\n"
              "session = Session.loads(sys.stdin.buffer.read())\n"
              "print(session.task.execute(session.execution), '_pickle' in sys.modules)\n")

    assert written_then_read(writer, reader).strip() == "42 False"
