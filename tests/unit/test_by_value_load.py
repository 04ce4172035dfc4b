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
