"""Serializers: JSON with tagged values, pickle/cloudpickle with closures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict, namedtuple
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest

from remote_exec.serialization import JsonSerializer, PickleSerializer, get_serializer

Point = namedtuple("Point", ["x", "y"])


class Money:
    """A value type with serialized()/deserialize()."""

    def __init__(self, cents: int, currency: str) -> None:
        self.cents = cents
        self.currency = currency

    def serialized(self) -> dict[str, Any]:
        return {"cents": self.cents, "currency": self.currency}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> Money:
        return cls(data["cents"], data["currency"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (other.cents, other.currency) == (self.cents, self.currency)

    def __hash__(self) -> int:
        return hash((self.cents, self.currency))


class BadInput(Exception):
    """An exception type of the user's."""


@pytest.mark.parametrize("value", [
    None, True, 3, 2.5, "text", [1, "a", None],
    (1, (2, 3), "x"),
    Point(1, 2),
    {"nested": [Point(x=(1, 2), y={"k": b"\x00\xff"})]},
    {1, 2, 3},
    frozenset({"a", "b"}),
    b"\x00\x01binary\xff",
    Money(1999, "EUR"),
    {"money": [Money(1, "USD"), (Money(2, "CHF"),)]},
])
def test_json_round_trip(value: object) -> None:
    json_ = JsonSerializer()
    restored = json_.loads(json_.dumps(value))
    assert restored == value
    assert type(restored) is type(value)


def test_json_keeps_types_inside_containers() -> None:
    json_ = JsonSerializer()
    restored = json_.loads(json_.dumps([(1, 2), Point(3, 4), {5}, b"6"]))
    assert [type(item) for item in restored] == [tuple, Point, set, bytes]
    assert restored[1].y == 4


def test_json_exceptions_come_back_as_their_type() -> None:
    json_ = JsonSerializer()
    for error in (ValueError("bad", 3), BadInput("no such user"), KeyError("k")):
        restored = json_.loads(json_.dumps(error))
        assert type(restored) is type(error) and restored.args == error.args


def test_json_payload_is_readable_json() -> None:
    data = JsonSerializer().dumps({"point": Point(1, 2), "raw": b"hi"})
    assert data.startswith(b"{") and b'"__rx__":"namedtuple"' in data and b'"aGk="' in data


@pytest.mark.parametrize(("value", "message"), [
    ({1: "int key"}, "keys must be strings"),
    ({"__rx__": "tuple", "items": []}, "reserved key"),
    (object(), "cannot serialize object"),
])
def test_json_refuses_what_it_cannot_represent(value: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        JsonSerializer().dumps(value)


def test_json_refuses_unknown_tags() -> None:
    with pytest.raises(ValueError, match="unknown tag 'mystery'"):
        JsonSerializer().loads(b'{"__rx__": "mystery"}')
    with pytest.raises(ValueError, match=r"unknown tag \['tuple'\]"):
        JsonSerializer().loads(b'{"__rx__": ["tuple"]}')


class Level(IntEnum):
    HIGH = 3


def test_json_bytes_are_stable() -> None:
    """What the JSON serializer writes for every kind of value, in order of its checks (subclasses of
    the built-in types included), byte for byte: a payload written by one version is read by another."""
    value = {"all": [None, True, 1, 2.5, "s", (1, (True,)), Point(1, [2]), {3, 1, 2}, frozenset({"b", "a"}),
                     b"\x00\xff", bytearray(b"ab"), OrderedDict(z=1, a=2), BadInput("x", (1, 2)),
                     Money(5, "EUR"), Level.HIGH, float("inf")]}
    here = __name__
    expected = (
        '{"all":[null,true,1,2.5,"s",{"__rx__":"tuple","items":[1,{"__rx__":"tuple","items":[true]}]},'
        f'{{"__rx__":"namedtuple","type":"{here}:Point","items":[1,[2]]}},'
        '{"__rx__":"set","frozen":false,"items":[1,2,3]},{"__rx__":"set","frozen":true,"items":["a","b"]},'
        '{"__rx__":"bytes","b64":"AP8="},{"__rx__":"bytes","b64":"YWI="},{"z":1,"a":2},'
        f'{{"__rx__":"exception","type":"{here}:BadInput","args":["x",{{"__rx__":"tuple","items":[1,2]}}]}},'
        f'{{"__rx__":"object","type":"{here}:Money","data":{{"cents":5,"currency":"EUR"}}}},3,Infinity]}}')
    data = JsonSerializer().dumps(value)
    assert data == expected.encode()
    restored = JsonSerializer().loads(data)["all"]
    assert restored[:10] == value["all"][:10] and restored[10] == b"ab" and restored[11] == {"z": 1, "a": 2}
    assert type(restored[12]) is BadInput and restored[12].args == ("x", (1, 2))
    assert restored[13] == Money(5, "EUR") and restored[14] == 3 and restored[15] == float("inf")


def test_pickle_closures_and_lambdas() -> None:
    pickler = PickleSerializer()
    base = 7

    def closure(x: int) -> int:
        return x * base

    assert pickler.loads(pickler.dumps(closure))(6) == 42
    assert pickler.loads(pickler.dumps(lambda s: s.upper() + str(base)))("a") == "A7"


def test_pickled_closure_loads_in_another_process(tmp_path: Path) -> None:
    prefix = "value="
    payload = tmp_path / "closure.pkl"
    payload.write_bytes(PickleSerializer().dumps(lambda x: f"{prefix}{x * 2}"))
    code = "import pickle, sys; print(pickle.loads(open(sys.argv[1], 'rb').read())(21))"
    result = subprocess.run([sys.executable, "-c", code, str(payload)], capture_output=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "value=42"


def test_pickle_of_an_unpicklable_value_is_a_type_error() -> None:
    import threading

    with pytest.raises(TypeError, match="cannot pickle"):
        PickleSerializer().dumps({"lock": threading.Lock()})


def test_fast_pickle_is_plain_pickle_for_plain_values() -> None:
    pickler = PickleSerializer()
    value = {"a": [1, 2.5, "x"], "p": Point(1, 2)}
    assert pickler.loads(pickler.dumps_fast(value)) == value
    local = 3
    assert pickler.loads(pickler.dumps_fast(lambda: local))() == 3  # falls back to cloudpickle


def test_built_in_data_is_plain_pickle_and_anything_else_cloudpickle() -> None:
    import pickle

    pickler = PickleSerializer()
    plain = [[1, 2.5, "x", b"y", None, True, (3, frozenset({4}))], {"k": {5: [6]}}]
    assert pickler.dumps(plain) == pickle.dumps(plain, protocol=5)
    assert pickler.loads(pickler.dumps(plain)) == plain

    class Local:
        value = 7

    # A class of this test module (or of __main__) travels by value: cloudpickle, not a bare reference.
    assert pickler.loads(pickler.dumps([Local]))[0].value == 7
    big = list(range(10_000))  # past the scan's budget: still correct
    assert pickler.loads(pickler.dumps(big)) == big


def test_serializers_by_name() -> None:
    assert isinstance(get_serializer("pickle"), PickleSerializer)
    assert isinstance(get_serializer("json"), JsonSerializer)
    with pytest.raises(ValueError, match="unknown serializer 'yaml'"):
        get_serializer("yaml")
