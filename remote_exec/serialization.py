"""Serializers for task payloads: pickle/cloudpickle (default) and JSON with value serializers.

This module travels to the remote (standard library only at import; cloudpickle is imported only when a
value needs it). :class:`PickleSerializer` writes with cloudpickle, which pickles importable functions and
classes by reference, so the runner loads most payloads with the plain :mod:`pickle` module; closures,
lambdas and ``__main__`` functions, written by value, are rebuilt by :class:`ValueUnpickler` with the
standard library, and only classes written by value import cloudpickle.

:class:`JsonSerializer` is for values that must stay readable and portable: JSON plus value serializers
for tuples, namedtuples, sets, bytes, exceptions and any object with ``serialized()`` /
``deserialize(data)``.
"""

from __future__ import annotations

# The C pickle module (`pickle` itself imports `re` and more), imported where it is used: even _pickle costs
# the runner milliseconds (it loads functools and collections), which a call of plain data never pays.
import marshal

TYPE_CHECKING = False  # typing is not imported at run time (the runner loads this module on every call)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, ClassVar, Protocol
else:
    Protocol = object

__all__ = ["EXCEPTION_PARTS", "JsonSerializer", "PickleSerializer", "RestrictedUnpickler",  # noqa: F822
           "Serializer", "exception_parts", "get_serializer", "package_versions", "reads_without_pickle",
           "rebuild_exception", "referenced_packages", "restricted_loads", "value_packages"]

_PROTOCOL = 5


class Serializer(Protocol):
    """Turns values into bytes and back."""

    name: str

    def dumps(self, value: Any) -> bytes:
        """Serialize ``value``."""
        ...

    def loads(self, data: bytes) -> Any:
        """Deserialize ``data``."""
        ...


class PickleSerializer:
    """cloudpickle to write (closures, lambdas and ``__main__`` code by value), plain pickle to read."""

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        import _pickle

        if _plain(value):  # what plain pickle writes exactly as cloudpickle would, at C speed
            return _pickle.dumps(value, protocol=_PROTOCOL)
        import cloudpickle

        try:
            return bytes(cloudpickle.dumps(value, protocol=_PROTOCOL))
        except Exception as exc:
            raise TypeError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc

    def dumps_fast(self, value: Any) -> bytes:
        """Plain pickle when it can (no cloudpickle import), cloudpickle when it must.

        Only for values whose classes are importable where they are loaded (results of a task): plain
        pickle writes ``__main__`` objects by a reference the other side cannot resolve.
        """
        import _pickle

        try:
            return _pickle.dumps(value, protocol=_PROTOCOL)
        except Exception:
            return self.dumps(value)

    def loads(self, data: bytes) -> Any:
        """Plain pickle; what cloudpickle wrote by value (a ``__main__`` function, a lambda, a closure) is
        rebuilt by :class:`ValueUnpickler` without importing cloudpickle (~20 ms on the host at each call)."""
        import sys

        if "_pickle" not in sys.modules and "cloudpickle" not in sys.modules and reads_without_pickle(data):
            try:  # a function by value, before the C pickle module is loaded: no need to load it
                return _FunctionLoader(data).load()
            except Exception:  # _NotSimple, or what the C module will say again in its own words
                pass
        import _pickle

        if len(data) <= _SCAN:
            if not isinstance(data, bytes):  # a view of a frame: `in` would look for one byte value
                data = bytes(data)
            if b"cloudpickle" not in data:
                return _pickle.loads(data)
        import io

        return __getattr__("ValueUnpickler")(io.BytesIO(data)).load()


#: Pickles of functions by value up to this size are read by :class:`_FunctionLoader` while the C pickle
#: module is not loaded (a function's is a kilobyte or two; the pure-Python reader's time grows with the size).
_SIMPLE = 8192
#: Pickles up to this size are searched for cloudpickle's name (a fast byte search); larger ones always go
#: through :class:`ValueUnpickler` (its find_class is asked once per global, the rest is C).
_SCAN = 1 << 20


def reads_without_pickle(data: bytes | memoryview) -> bool:
    """Whether :meth:`PickleSerializer.loads` tries ``data`` without the C pickle module (a small function
    by value, read by :class:`_FunctionLoader` while the C module is not loaded yet)."""
    return len(data) <= _SIMPLE and b"cloudpickle" in bytes(data)


def _cloudpickle_rebuilders() -> dict[str, Any]:
    """cloudpickle's functions that rebuild a function written by value (its code, globals, cells, the
    modules it refers to), as cloudpickle 2.2 to 3.x define them, from the standard library."""
    import sys
    import types

    def _make_function(code: Any, globals_: dict[str, Any], name: str, argdefs: Any, closure: Any) -> Any:
        globals_["__builtins__"] = __builtins__
        return types.FunctionType(code, globals_, name, argdefs, closure)

    def _builtin_type(name: str) -> Any:
        return type if name == "ClassType" else getattr(types, name)

    def _function_setstate(obj: Any, state: Any) -> None:
        state, slotstate = state
        obj.__dict__.update(state)
        obj_globals = slotstate.pop("__globals__")
        obj_closure = slotstate.pop("__closure__")
        slotstate.pop("_cloudpickle_submodules", None)
        obj.__globals__.update(obj_globals)
        obj.__globals__["__builtins__"] = __builtins__
        if obj_closure is not None:
            for index, cell in enumerate(obj_closure):
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                obj.__closure__[index].cell_contents = value
        for key, value in slotstate.items():
            setattr(obj, key, value)

    def _make_empty_cell() -> Any:
        if False:  # an empty cell: the compiler makes one for a name assigned but never bound
            cell: Any = None
        closure: Any = (lambda: cell).__closure__
        return closure[0]

    empty = object()

    def _make_cell(value: Any = empty) -> Any:
        cell = _make_empty_cell()
        if value is not empty:
            cell.cell_contents = value
        return cell

    def subimport(name: str) -> Any:
        __import__(name)
        return sys.modules[name]

    return {"_make_function": _make_function, "_builtin_type": _builtin_type,
            "_function_setstate": _function_setstate, "_make_empty_cell": _make_empty_cell,
            "_make_cell": _make_cell, "subimport": subimport}


class _NotSimple(Exception):
    """The pickle holds more than :class:`_FunctionLoader` reads: the C pickle module reads it."""


class _FunctionLoader:
    """Reads the pickle of a function written by value (and of a task holding one) as the C pickle module
    with :class:`ValueUnpickler` would, without loading it: the C module costs the host's task process
    ~2.5 ms (it imports functools and collections) on every call of a ``__main__`` function, this ~0.2 ms.

    It knows the opcodes cloudpickle and pickle write for such a function (protocol 4 and 5: built-in data,
    memo, marks, globals, REDUCE), and calls only what rebuilds it: cloudpickle's rebuilders (as
    :class:`ValueUnpickler` has them), the types they name, and rx's task rebuilder. Anything else (another
    opcode, another callable) raises :class:`_NotSimple` before it is called: the caller then reads the
    whole pickle again with the C module (what was done so far, imports and rebuilt objects, has no effect
    that reading it again would change).
    """

    def __init__(self, data: bytes | memoryview) -> None:
        import sys
        import types

        from .task import restore_task

        self.data = bytes(data)
        self.at = 0
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.rebuilders = _cloudpickle_rebuilders()
        self.callable_ids = {id(value) for value in self.rebuilders.values()} | {id(restore_task)}
        #: What ``_builtin_type`` may name that is then called: built from plain data, nothing else happens.
        self.plain_types = {id(kind) for kind in (types.CodeType, types.FunctionType, types.MethodType,
                                                  type(self.rebuilders["_make_empty_cell"]()))}
        self.sys = sys

    def load(self) -> Any:
        """The object, or :class:`_NotSimple`."""
        ops = self._OPS
        data = self.data
        while self.at < len(data):
            code = data[self.at]
            self.at += 1
            op = ops.get(code)
            if op is None:
                raise _NotSimple(code)
            if op(self) is True:  # STOP
                return self.stack.pop()
        raise _NotSimple("no STOP")

    def _take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise _NotSimple("truncated")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def _size(self, width: int) -> int:
        return int.from_bytes(self._take(width), "little")

    def _mark(self) -> list[Any]:
        items, self.stack = self.stack, self.marks.pop()
        return items

    def _global(self, module: str, name: str) -> Any:
        """What ``find_class`` gives (audited, imported, dotted names followed), cloudpickle's rebuilders
        as :class:`ValueUnpickler` gives them; none of cloudpickle's others."""
        if module in ("cloudpickle.cloudpickle", "cloudpickle.cloudpickle_fast"):
            if name not in self.rebuilders:
                raise _NotSimple(name)
            return self.rebuilders[name]
        if not isinstance(module, str) or not isinstance(name, str) or "<locals>" in name.split("."):
            raise _NotSimple(name)
        self.sys.audit("pickle.find_class", module, name)
        __import__(module)
        found: Any = self.sys.modules[module]
        for part in name.split("."):
            found = getattr(found, part)
        return found

    def _reduce(self) -> None:
        arguments = self.stack.pop()
        function = self.stack[-1]
        if id(function) not in self.callable_ids or type(arguments) is not tuple:
            raise _NotSimple(function)
        value = function(*arguments)
        if function is self.rebuilders["_builtin_type"] and id(value) in self.plain_types:
            self.callable_ids.add(id(value))
        self.stack[-1] = value

    def _pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._mark()

    def _proto(self) -> None:
        if not 4 <= self._size(1) <= 5:  # older ones map module names (_compat_pickle): the C module's work
            raise _NotSimple("protocol")

    def _push_mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def _set_item(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._dict().__setitem__(key, value)

    def _set_items(self) -> None:
        items = self._mark()
        target = self._dict()
        for index in range(0, len(items), 2):
            target[items[index]] = items[index + 1]

    def _dict(self) -> dict[Any, Any]:
        """The dict items go to (another mapping's ``__setitem__`` is not called here)."""
        target = self.stack[-1]
        if type(target) is not dict:
            raise _NotSimple(type(target))
        return target

    def _list(self, at: int = -1) -> list[Any]:
        target = self.stack[at]
        if type(target) is not list:
            raise _NotSimple(type(target))
        return target

    def _marked_tuple(self) -> None:
        items = self._mark()
        self.stack.append(tuple(items))

    def _appends(self) -> None:
        items = self._mark()
        self._list().extend(items)

    def _float(self) -> None:
        import struct

        self.stack.append(struct.unpack(">d", self._take(8))[0])

    def _stack_global(self) -> None:
        name = self.stack.pop()
        self.stack[-1] = self._global(self.stack[-1], name)

    def _text(self, width: int) -> None:
        self.stack.append(str(self._take(self._size(width)), "utf-8", "surrogatepass"))

    def _tuple(self, size: int) -> None:
        if size > len(self.stack):
            raise _NotSimple("stack")
        items = tuple(self.stack[len(self.stack) - size:])
        del self.stack[len(self.stack) - size:]
        self.stack.append(items)

    #: One entry per opcode (as pickletools names them); each does what the C module does with it.
    _OPS: ClassVar[dict[int, Callable[[_FunctionLoader], Any]]] = {
        0x80: _proto,  # PROTO
        0x95: lambda self: self._take(8),  # FRAME
        0x2e: lambda self: True,  # STOP
        0x94: lambda self: self.memo.__setitem__(len(self.memo), self.stack[-1]),  # MEMOIZE
        0x71: lambda self: self.memo.__setitem__(self._size(1), self.stack[-1]),  # BINPUT
        0x72: lambda self: self.memo.__setitem__(self._size(4), self.stack[-1]),  # LONG_BINPUT
        0x68: lambda self: self.stack.append(self.memo[self._size(1)]),  # BINGET
        0x6a: lambda self: self.stack.append(self.memo[self._size(4)]),  # LONG_BINGET
        0x28: _push_mark,  # MARK
        0x30: _pop,  # POP
        0x4e: lambda self: self.stack.append(None),  # NONE
        0x88: lambda self: self.stack.append(True),  # NEWTRUE
        0x89: lambda self: self.stack.append(False),  # NEWFALSE
        0x4b: lambda self: self.stack.append(self._size(1)),  # BININT1
        0x4d: lambda self: self.stack.append(self._size(2)),  # BININT2
        0x4a: lambda self: self.stack.append(int.from_bytes(self._take(4), "little", signed=True)),  # BININT
        0x8a: lambda self: self.stack.append(int.from_bytes(self._take(self._size(1)), "little", signed=True)),
        0x47: _float,  # BINFLOAT
        0x8c: lambda self: self._text(1),  # SHORT_BINUNICODE
        0x58: lambda self: self._text(4),  # BINUNICODE
        0x8d: lambda self: self._text(8),  # BINUNICODE8
        0x43: lambda self: self.stack.append(self._take(self._size(1))),  # SHORT_BINBYTES
        0x42: lambda self: self.stack.append(self._take(self._size(4))),  # BINBYTES
        0x8e: lambda self: self.stack.append(self._take(self._size(8))),  # BINBYTES8
        0x29: lambda self: self.stack.append(()),  # EMPTY_TUPLE
        0x85: lambda self: self._tuple(1),  # TUPLE1
        0x86: lambda self: self._tuple(2),  # TUPLE2
        0x87: lambda self: self._tuple(3),  # TUPLE3
        0x74: _marked_tuple,  # TUPLE
        0x5d: lambda self: self.stack.append([]),  # EMPTY_LIST
        0x61: lambda self: self._list(-2).append(self.stack.pop()),  # APPEND
        0x65: _appends,  # APPENDS
        0x7d: lambda self: self.stack.append({}),  # EMPTY_DICT
        0x73: _set_item,  # SETITEM
        0x75: _set_items,  # SETITEMS
        0x93: _stack_global,  # STACK_GLOBAL
        0x52: _reduce,  # REDUCE
    }


def _value_class() -> type[Any]:
    """Build :class:`ValueUnpickler` (a subclass of _pickle's, imported only when needed)."""
    import _pickle
    import sys

    rebuilders = _cloudpickle_rebuilders()

    class ValueUnpickler(_pickle.Unpickler):
        """cloudpickle's rebuilders of functions, cells and module references from the standard library
        (they are what a function written by value needs); anything else of cloudpickle's from cloudpickle."""

        def find_class(self, module: str, name: str) -> Any:
            if (module in ("cloudpickle.cloudpickle", "cloudpickle.cloudpickle_fast") and name in rebuilders
                    and "cloudpickle" not in sys.modules):  # once cloudpickle is imported, its own
                return rebuilders[name]
            return super().find_class(module, name)

    return ValueUnpickler


_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray})
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})


def _plain(value: Any, budget: int = 256) -> bool:
    """True when ``value`` is built-in data only (exact built-in types, at most ``budget`` objects): no
    class, function or module reference that cloudpickle could write by value."""
    return _built_in_only(value, _ATOMIC, budget)


def _built_in_only(value: Any, atomic: frozenset[type], budget: int = 256, max_size: int | None = None) -> bool:
    """True when ``value`` holds only the ``atomic`` types in built-in containers (exact types), at most
    ``budget`` objects and, with ``max_size``, at most that many characters and bytes of str and bytes."""
    stack = [value]
    size = 0
    while stack:
        budget -= 1
        if budget < 0:
            return False
        item = stack.pop()
        kind = type(item)
        if kind in atomic:
            if max_size is not None and (kind is str or kind is bytes):
                size += len(item)
                if size > max_size:
                    return False
            continue
        if kind not in _CONTAINERS:
            return False
        if kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            stack.extend(item)
    return True


#: What marshal writes exactly as the value is (no bytearray: marshal reads it back as bytes).
_MARSHAL_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes})
#: marshal's format version: readable by every Python 3.4 and later.
MARSHAL_VERSION = 4


def marshal_dumps(value: Any, max_size: int = 65536) -> bytes | None:
    """``value`` written with :mod:`marshal` when it is small built-in data that marshal gives back
    exactly (exact built-in types, at most 256 objects, no bytearray, strings and bytes of at most
    ``max_size`` in all), else None.

    marshal is built in: reading it costs the runner no import, where even the C pickle module loads
    functools and collections; for large data that import does not matter, and a pickle already made is
    not copied again. It is as trusting as pickle (use it only where pickle would do).
    """
    if not _built_in_only(value, _MARSHAL_ATOMIC, max_size=max_size):
        return None
    try:
        return marshal.dumps(value, MARSHAL_VERSION)
    except ValueError:
        return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(qualified: str) -> Any:
    from .task import import_module  # (no importlib: the runner's hot path)

    module_name, _, attribute = qualified.partition(":")
    obj: Any = import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


class JsonSerializer:
    """JSON with tagged values for what JSON lacks.

    Tagged values are objects with a single ``"__rx__"`` key naming the kind: ``tuple``, ``namedtuple``,
    ``set``, ``bytes``, ``exception``, ``object`` (anything with ``serialized()`` and a
    ``deserialize(data)`` classmethod). Dicts must have string keys.
    """

    name = "json"

    def dumps(self, value: Any) -> bytes:
        import json

        return json.dumps(self._encode(value), separators=(",", ":"), allow_nan=True).encode("utf-8")

    def loads(self, data: bytes) -> Any:
        import json

        return self._decode(json.loads(data.decode("utf-8")))

    def _encode(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        for kinds, encode in self._ENCODERS:
            if isinstance(value, kinds):
                return encode(self, value)
        if callable(getattr(value, "serialized", None)) and callable(getattr(type(value), "deserialize", None)):
            return {"__rx__": "object", "type": _qualname(type(value)), "data": self._encode(value.serialized())}
        raise TypeError(f"JSON serializer cannot serialize {type(value).__qualname__}")

    def _encode_list(self, value: list[Any]) -> Any:
        return [self._encode(item) for item in value]

    def _encode_tuple(self, value: tuple[Any, ...]) -> Any:
        items = [self._encode(item) for item in value]
        if hasattr(value, "_fields"):
            return {"__rx__": "namedtuple", "type": _qualname(type(value)), "items": items}
        return {"__rx__": "tuple", "items": items}

    def _encode_set(self, value: set[Any] | frozenset[Any]) -> Any:
        return {"__rx__": "set", "frozen": isinstance(value, frozenset),
                "items": [self._encode(item) for item in sorted(value, key=repr)]}

    def _encode_bytes(self, value: bytes | bytearray) -> Any:
        import base64

        return {"__rx__": "bytes", "b64": base64.b64encode(bytes(value)).decode("ascii")}

    def _encode_dict(self, value: dict[Any, Any]) -> Any:
        if not all(isinstance(key, str) for key in value):
            raise TypeError("JSON serializer: dict keys must be strings")
        if "__rx__" in value:
            raise TypeError("JSON serializer: '__rx__' is a reserved key")
        return {key: self._encode(item) for key, item in value.items()}

    def _encode_exception(self, value: BaseException) -> Any:
        return {"__rx__": "exception", "type": _qualname(type(value)),
                "args": [self._encode(arg) for arg in value.args]}

    #: How each kind of value is written, tried in this order after the JSON scalars (a namedtuple is a
    #: tuple); what none of them takes must have ``serialized()`` and ``deserialize()``. A constant.
    _ENCODERS: ClassVar[tuple[tuple[type | tuple[type, ...], Callable[[JsonSerializer, Any], Any]], ...]] = (
        (list, _encode_list), (tuple, _encode_tuple), ((set, frozenset), _encode_set),
        ((bytes, bytearray), _encode_bytes), (dict, _encode_dict), (BaseException, _encode_exception))

    def _decode(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        kind = value.get("__rx__")
        if kind is None:
            return {key: self._decode(item) for key, item in value.items()}
        decode = self._DECODERS.get(kind) if isinstance(kind, str) else None
        if decode is None:
            raise ValueError(f"JSON serializer: unknown tag {kind!r}")
        return decode(self, value)

    def _decode_tuple(self, value: dict[str, Any]) -> Any:
        return tuple(self._decode(item) for item in value["items"])

    def _decode_namedtuple(self, value: dict[str, Any]) -> Any:
        return _import(value["type"])(*(self._decode(item) for item in value["items"]))

    def _decode_set(self, value: dict[str, Any]) -> Any:
        items = (self._decode(item) for item in value["items"])
        return frozenset(items) if value["frozen"] else set(items)

    def _decode_bytes(self, value: dict[str, Any]) -> Any:
        import base64

        return base64.b64decode(value["b64"])

    def _decode_exception(self, value: dict[str, Any]) -> Any:
        return _import(value["type"])(*(self._decode(arg) for arg in value["args"]))

    def _decode_object(self, value: dict[str, Any]) -> Any:
        return _import(value["type"]).deserialize(self._decode(value["data"]))

    #: The reader of each tag. A constant.
    _DECODERS: ClassVar[dict[str, Callable[[JsonSerializer, dict[str, Any]], Any]]] = {
        "tuple": _decode_tuple, "namedtuple": _decode_namedtuple, "set": _decode_set, "bytes": _decode_bytes,
        "exception": _decode_exception, "object": _decode_object}


#: What restricted mode unpickles without being told: plain data types and the standard exceptions.
SAFE_GLOBALS = frozenset({
    "builtins.bool", "builtins.bytearray", "builtins.bytes", "builtins.complex", "builtins.dict",
    "builtins.float", "builtins.frozenset", "builtins.int", "builtins.list", "builtins.range",
    "builtins.set", "builtins.slice", "builtins.str", "builtins.tuple", "builtins.NoneType",
    "collections.OrderedDict", "collections.defaultdict", "collections.deque", "collections.Counter",
    "datetime.date", "datetime.datetime", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "copyreg._reconstructor", "builtins.object",
})


def _restricted_class() -> type[Any]:
    """Build :class:`RestrictedUnpickler` (a subclass of _pickle's, which is imported only when needed)."""
    import _pickle

    class RestrictedUnpickler(_pickle.Unpickler):
        """Unpickles only plain data, the built-in exceptions, and the globals or modules allowed.

        For results from hosts you do not fully trust: a pickle can call any importable function when it
        is loaded, so restricted mode refuses every global that is not on the allow-list.

        Args:
            allow: Extra globals (``module.name``) or whole modules (``module`` or ``module.*``) to accept.
        """

        def __init__(self, file: Any, *, allow: Iterable[str] = ()) -> None:
            super().__init__(file)
            self.allow = frozenset(allow)

        def find_class(self, module: str, name: str) -> Any:
            qualified = f"{module}.{name}"
            allowed = (qualified in SAFE_GLOBALS or qualified in self.allow or module in self.allow
                       or f"{module}.*" in self.allow or any(module.startswith(f"{m}.") for m in self.allow))
            if not allowed and module == "builtins":
                import builtins

                value = getattr(builtins, name, None)
                allowed = isinstance(value, type) and issubclass(value, BaseException)
            if not allowed:
                from .errors import SerializationError

                raise SerializationError(f"restricted mode refused to unpickle {qualified}",
                                         hint=f"allow_unpickle=['{qualified}'] accepts it, if you trust what it does")
            return super().find_class(module, name)

    return RestrictedUnpickler


def __getattr__(name: str) -> Any:
    if name in ("RestrictedUnpickler", "ValueUnpickler"):
        value = globals()[name] = (_restricted_class if name == "RestrictedUnpickler" else _value_class)()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def restricted_loads(data: bytes, allow: Iterable[str] = ()) -> Any:
    """Unpickle ``data`` through :class:`RestrictedUnpickler`."""
    import io

    return __getattr__("RestrictedUnpickler")(io.BytesIO(data), allow=allow).load()


def referenced_packages(data: bytes | memoryview) -> list[str]:
    """The top-level packages whose classes or functions a pickle (or bytes holding pickles, such as a
    session) refers to by name, in order: what has to be importable, at a compatible version, to read it.

    Read from the bytes without unpickling anything (the ``module`` ``name`` pairs of protocol 4 and 5's
    STACK_GLOBAL and older protocols' GLOBAL); for messages only, on the path of a failure.
    """
    import re

    found: dict[str, None] = {}
    raw = bytes(data)
    for match in re.finditer(rb"\x8c([\x01-\xff])([A-Za-z_][\w.]*)\x94?\x8c[\x01-\xff][A-Za-z_][\w.]*\x94?\x93", raw):
        if match[1][0] == len(match[2]):
            found[match[2].decode().partition(".")[0]] = None
    for match in re.finditer(rb"(?:^|[^\w])c([A-Za-z_][\w.]*)\n[A-Za-z_][\w.]*\n", raw):
        found[match[1].decode().partition(".")[0]] = None
    return [name for name in found if name not in ("builtins", "copyreg", "_codecs", "__builtin__", "__main__")]


def package_versions(names: Iterable[str], *, metadata: bool = True) -> dict[str, str | None]:
    """The version of each top-level package here (its ``__version__``, else, with ``metadata``, its
    distribution's: importlib.metadata costs tens of milliseconds to import), None when it is not installed
    or says no version."""
    import sys

    versions: dict[str, str | None] = {}
    for name in names:
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if not isinstance(version, str) and metadata:
            try:
                from importlib import metadata as distributions

                version = distributions.version(name)
            except Exception:  # not installed, or its distribution has another name
                version = None
        versions[name] = version if isinstance(version, str) else None
    return versions


def value_packages(value: Any, budget: int = 64) -> list[str]:
    """The top-level packages of the classes in ``value`` (a bounded walk through built-in containers):
    cheap enough for every pickled result, so that a reader whose version differs can be told which."""
    found: dict[str, None] = {}
    stack = [value]
    while stack and budget > 0:
        budget -= 1
        item = stack.pop()
        kind = type(item)
        if kind in _CONTAINERS:
            stack.extend(list(item.values()) if kind is dict else list(item)[:budget])
            continue
        module = getattr(kind, "__module__", "") or ""
        top = module.partition(".")[0]
        if top and top not in ("builtins", "__main__") and top not in found:
            found[top] = None
    return list(found)


#: Marks an exception that travels as its parts (see :func:`exception_parts`).
EXCEPTION_PARTS = "rx-exception-1"


def exception_parts(exc: BaseException) -> object:
    """What to pickle for a task's exception: ``(EXCEPTION_PARTS, class, args, attributes)`` when its class
    pickles the default way, else the exception itself (a class with its own ``__reduce__`` says how).

    The default way rebuilds with ``cls(*args)``, which fails for an ``__init__`` that takes other arguments
    than its message (``TrainingDiverged(step, loss)`` calling ``super().__init__(message)``); sent as its
    parts, :func:`rebuild_exception` can fall back to what pickle's ``__reduce__`` contract allows.
    """
    cls = type(exc)
    if cls.__reduce__ is not BaseException.__reduce__ or cls.__reduce_ex__ is not BaseException.__reduce_ex__:
        return exc
    return (EXCEPTION_PARTS, cls, exc.args, dict(getattr(exc, "__dict__", None) or {}))


def rebuild_exception(loaded: object) -> BaseException | None:
    """The exception an unpickled X frame stands for: ``cls(*args)`` as pickle would, else (an ``__init__``
    that wants other arguments) ``cls.__new__(cls, *args)``; then its attributes, as pickle's BUILD sets
    them. None when ``loaded`` is neither an exception nor its parts."""
    if isinstance(loaded, BaseException):
        return loaded
    if not (isinstance(loaded, tuple) and len(loaded) == 4 and loaded[0] == EXCEPTION_PARTS):
        return None
    _, cls, args, state = loaded
    if not (isinstance(cls, type) and issubclass(cls, BaseException) and isinstance(args, tuple)):
        return None
    try:
        exc = cls(*args)
    except Exception:
        exc = cls.__new__(cls, *args)
    exc.args = args
    if isinstance(state, dict) and state:
        exc.__dict__.update(state)
    return exc


_SERIALIZERS: dict[str, type[PickleSerializer] | type[JsonSerializer]] = {
    "pickle": PickleSerializer,
    "json": JsonSerializer,
}


def get_serializer(name: str) -> PickleSerializer | JsonSerializer:
    """The serializer registered under ``name`` (``pickle`` or ``json``).

    Raises:
        ValueError: No serializer has that name.
    """
    try:
        return _SERIALIZERS[name]()
    except KeyError:
        raise ValueError(f"unknown serializer {name!r}; choose one of {', '.join(_SERIALIZERS)}") from None

