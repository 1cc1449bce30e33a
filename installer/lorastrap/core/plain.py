"""Plain records: dataclasses with the part of pydantic's surface lorastrap uses (``model_dump``,
``model_dump_json``, ``model_validate``, ``model_validate_json``, ``model_json_schema``), so that a command which
only builds, reads and prints them (``detect``, an install) never imports pydantic.  And plain structs: the
dataclasses lorastrap keeps in memory only (an engine, a lock's entry), made as cheaply (``Struct``, below).

    @record  # dataclass(kw_only=True); frozen_record: also frozen
    class Gpu(Plain):
        index: int
        name: str | None = Field(None, description="...")
        sha256: Annotated[str, Checked(pattern=r"^[0-9a-f]{64}$")]

Nested records given as dicts (``Gpu(**probe_answer)``; in lists and as dict values too) are turned into their
classes on construction.  Reading one from outside (a file, another node's ``detect --json``) validates it
strictly, unknown keys refused: first in plain Python, which takes only data of exactly the declared types
(JSON's own: str, int, bool, float, None, lists, objects) and every ``Checked`` constraint met; anything else goes
to pydantic (imported only then), which answers with its ValidationError or accepts it the way pydantic does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import reprlib
import sys
import types
import typing

_REGISTRY: dict[str, type] = {}
_HINTS: dict[type, dict[str, tuple[object, bool]]] = {}  # class → field → (its annotation, resolved; required)
_NESTED: dict[type, dict[str, tuple[str, type]]] = {}  # class → field → ("one" | "list" | "dict", record class)
_BAD = object()  # what the plain check answers for data it does not vouch for
# A surrogate code point, or its JSON escape: Python's json takes one alone, pydantic's JSON refuses it.
_SURROGATE = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")


def _decorator(frozen: bool, kw_only: bool = True):
    """A dataclass (kw_only, or not for a Struct; frozen if FROZEN) whose __init__, __repr__, __eq__ and __hash__
    are Plain's (or Struct's), written once, not made for each class: a dataclass compiles those from source for
    every class it makes (0.3 ms a class, 0.5 ms a frozen one: ~20 ms of each install's start-up, in the ~40
    records it imports; 0.5-2.6 ms each, ~14 ms, for the 15 other dataclasses it imported, on a slower hour), these
    take 0.05 ms.  They behave as the dataclass's own would (keyword arguments only for a record, positional ones
    too for a struct, defaults and default factories, fields left out of __init__, __post_init__, equality by type
    and compared fields, frozen ones hashable by their hashed fields and immutable, a repr that stops at a record
    inside itself); tests/test_units.py holds them against dataclass.  What one may not use (its own
    __init__/__repr__/__eq__/__hash__, InitVar, a frozen and a non-frozen one in one line of inheritance, a struct
    field without a default after one with) is refused when the class is made."""
    base = Plain if kw_only else Struct

    def decorate(cls: type) -> type:
        if not issubclass(cls, base):
            raise TypeError(f"{cls.__name__} must subclass {base.__name__} to be made with this decorator")
        own = {"__init__", "__repr__", "__eq__", "__hash__"} & cls.__dict__.keys()
        if own:
            raise TypeError(f"{cls.__name__} defines {sorted(own)}: make it with dataclasses.dataclass instead")
        for parent in cls.__mro__[1:]:
            if parent in _FROZEN and _FROZEN[parent] != frozen:
                raise TypeError(f"cannot inherit {'' if frozen else 'non-'}frozen record {cls.__name__} from a "
                                f"{'non-' if frozen else ''}frozen one ({parent.__name__})")
        if not cls.__dict__.get("__doc__"):  # what dataclass would write, without its inspect.signature
            cls.__doc__ = f"{cls.__name__}(...)"
        cls = dataclasses.dataclass(kw_only=kw_only, init=False, repr=False, eq=False)(cls)
        if any(f._field_type is dataclasses._FIELD_INITVAR for f in cls.__dataclass_fields__.values()):
            raise TypeError(f"{cls.__name__} has an InitVar: make it with dataclasses.dataclass instead")
        if not kw_only:  # dataclass checks this in the __init__ it writes; this one is shared, so here
            defaulted = None
            for f in dataclasses.fields(cls):
                if not f.init or f.kw_only:
                    continue
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    defaulted = f.name
                elif defaulted:
                    raise TypeError(f"non-default argument {f.name!r} follows default argument")
        cls.__hash__ = _frozen_hash if frozen else None  # as dataclass(eq=True) sets it
        if frozen:
            cls.__setattr__, cls.__delattr__ = _frozen_setattr, _frozen_delattr
        _FROZEN[cls] = frozen
        return cls
    return decorate


def _frozen_hash(self) -> int:
    return hash(tuple(getattr(self, name) for name in _spec(type(self)).hashed))


def _frozen_setattr(self, name, value):
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


_FROZEN: dict[type, bool] = {}  # each record class → whether it is frozen


class _Spec(typing.NamedTuple):
    """What Plain's methods need of a record class's fields, read once from dataclasses.fields."""
    given: tuple  # (name, default, default factory) of each field __init__ takes
    rest: tuple  # the same of each field it does not (init=False)
    shown: tuple  # the names repr shows
    compared: tuple  # ... __eq__ compares
    hashed: tuple  # ... a frozen record's hash covers


_SPECS: dict[type, _Spec] = {}


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        fields = dataclasses.fields(cls)
        spec = _SPECS[cls] = _Spec(
            given=tuple((f.name, f.default, f.default_factory) for f in fields if f.init),
            rest=tuple((f.name, f.default, f.default_factory) for f in fields if not f.init),
            shown=tuple(f.name for f in fields if f.repr), compared=tuple(f.name for f in fields if f.compare),
            hashed=tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))
    return spec


def Field(default=dataclasses.MISSING, description: str | None = None, *,  # noqa: N802 - pydantic's spelling
          default_factory=dataclasses.MISSING):
    """A field with a description for the JSON schema (``metadata["description"]``)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"description": description} if description else {})


class Checked:
    """A constraint on a field, checked when a record is read (and written into its JSON schema), named in the
    field's annotation, which stays a string until it is read (a module of plain records starts with ``from
    __future__ import annotations``): ``Annotated[str, Checked(pattern=r"^[0-9a-f]{64}$")]``.  Keywords:
    ``pattern``, ``min_length``, ``ge`` (pydantic.Field's), and ``after``: a function given the
    value that returns it or raises ValueError (as a field validator would)."""

    KNOWN = frozenset({"pattern", "min_length", "ge"})

    def __init__(self, after=None, **constraints):
        assert set(constraints) <= self.KNOWN, constraints
        self.after, self.constraints = after, constraints

    def holds(self, value):
        """VALUE (as ``after`` returns it) when every constraint holds, else _BAD."""
        c = self.constraints
        if "pattern" in c and not (type(value) is str and re.search(c["pattern"], value)
                                   and not value.endswith("\n")):  # Python's $ also matches before a last \n
            return _BAD
        if "min_length" in c and len(value) < c["min_length"]:
            return _BAD
        if "ge" in c and not value >= c["ge"]:
            return _BAD
        if self.after is not None:
            try:
                return self.after(value)
            except ValueError:
                return _BAD
        return value

    def __get_pydantic_core_schema__(self, source, handler):
        from typing import Annotated

        from pydantic import Field as PydanticField
        from pydantic_core import core_schema
        schema = (handler.generate_schema(Annotated[source, PydanticField(**self.constraints)]) if self.constraints
                  else handler(source))
        return core_schema.no_info_after_validator_function(self.after, schema) if self.after else schema


def _hints(cls: type) -> dict[str, tuple[object, bool]]:
    if cls not in _HINTS:
        module = vars(sys.modules[cls.__module__])
        _HINTS[cls] = {f.name: (eval(f.type, module) if isinstance(f.type, str) else f.type,  # noqa: S307 - its own
                                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                       for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _shape(annotation) -> tuple[str, type] | None:
    """("one" | "list" | "dict", the record class) when a field holds records (None allowed), else None."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) != 1:
            return None
        annotation = rest[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    kind, sub = (("list", args[0]) if origin is list and args else ("dict", args[-1]) if origin is dict and args
                 else ("one", annotation) if origin is None else (None, None))
    return (kind, sub) if isinstance(sub, type) and issubclass(sub, Plain) else None


def _nested(cls: type) -> dict[str, tuple[str, type]]:
    if cls not in _NESTED:
        _NESTED[cls] = {name: shape for name, (annotation, _) in _hints(cls).items() if (shape := _shape(annotation))}
    return _NESTED[cls]


def _record(cls: type, data):
    """CLS built from DATA when DATA is exactly what it declares, else _BAD."""
    if type(data) is cls:
        return data
    hints = _hints(cls)
    if type(data) is not dict or not data.keys() <= hints.keys():
        return _BAD
    values = {}
    for name, (annotation, required) in hints.items():
        if name in data:
            values[name] = _value(annotation, data[name])
            if values[name] is _BAD:
                return _BAD
        elif required:
            return _BAD
    return cls(**values)


def _value(annotation, value):
    """VALUE checked against ANNOTATION (records built, lists and dicts copied), or _BAD."""
    if annotation in (str, int, bool, float):
        return value if type(value) is annotation else _BAD
    if annotation is type(None):
        return value if value is None else _BAD
    if annotation is dict:
        return dict(value) if type(value) is dict else _BAD
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return next((v for v in (_value(a, value) for a in args) if v is not _BAD), _BAD)
    if origin is typing.Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else _BAD
    if origin is typing.Annotated:
        value = _value(args[0], value)
        for check in args[1:]:
            if value is _BAD or not isinstance(check, Checked):
                return _BAD
            value = check.holds(value)
        return value
    if origin is list and len(args) == 1 and type(value) is list:
        out = [_value(args[0], v) for v in value]
        return _BAD if any(v is _BAD for v in out) else out
    if origin is dict and len(args) == 2 and type(value) is dict:
        out = {_value(args[0], k): _value(args[1], v) for k, v in value.items()}
        return _BAD if _BAD in out or any(v is _BAD for v in out.values()) else out
    if origin is None and isinstance(annotation, type) and issubclass(annotation, Plain):
        return _record(annotation, value)
    return _BAD


def _fill(self, spec: _Spec, values: dict, kind: str) -> None:
    """Set the fields of SELF from VALUES (keyword arguments) as the dataclass's __init__ would."""
    cls = type(self)
    missing = []
    for name, default, factory in spec.given:
        if name in values:
            value = values.pop(name)
        elif default is not dataclasses.MISSING:
            value = default
        elif factory is not dataclasses.MISSING:
            value = factory()
        else:
            missing.append(repr(name))
            continue
        object.__setattr__(self, name, value)  # also on a frozen one
    if missing:  # worded as Python words it
        names = (missing[0] if len(missing) == 1 else " and ".join(missing) if len(missing) == 2
                 else ", ".join(missing[:-1]) + ", and " + missing[-1])
        raise TypeError(f"{cls.__qualname__}.__init__() missing {len(missing)} required {kind}"
                        f"argument{'s' if len(missing) > 1 else ''}: {names}")
    if values:
        raise TypeError(f"{cls.__qualname__}.__init__() got an unexpected keyword argument {next(iter(values))!r}")
    for name, default, factory in spec.rest:  # init=False: set as the dataclass sets it, when it has a default
        if default is not dataclasses.MISSING:
            object.__setattr__(self, name, default)
        elif factory is not dataclasses.MISSING:
            object.__setattr__(self, name, factory())


@reprlib.recursive_repr()
def _repr(self) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in _spec(type(self)).shown)
    return f"{type(self).__qualname__}({shown})"


def _eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    names = _spec(type(self)).compared
    return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)


class Struct:
    """Base of a plain struct (decorate the subclass with ``@struct`` or ``@frozen_struct``): a dataclass kept in
    memory only — never read from outside, so no checks and no model methods — whose __init__ takes positional
    arguments too, in field order, as the dataclass's does."""

    def __init__(self, *args, **values) -> None:
        cls = type(self)
        if args:
            names, required = _positional(cls)
            if len(args) > len(names):  # worded as Python words it, self counted
                most, least = len(names) + 1, required + 1
                takes = f"from {least} to {most}" if least < most else f"{most}"
                raise TypeError(f"{cls.__qualname__}.__init__() takes {takes} positional argument"
                                f"{'s' if most > 1 else ''} but {len(args) + 1} were given")
            for name, value in zip(names, args):
                if name in values:
                    raise TypeError(f"{cls.__qualname__}.__init__() got multiple values for argument {name!r}")
                values[name] = value
        _fill(self, _spec(cls), values, "positional ")
        self.__post_init__()

    __repr__ = _repr
    __eq__ = _eq

    def __post_init__(self) -> None:
        pass


_POSITIONAL: dict[type, tuple[tuple[str, ...], int]] = {}


def _positional(cls: type) -> tuple[tuple[str, ...], int]:
    """The fields a struct's __init__ takes by position (those in __init__ and not keyword-only, in order), and
    how many of them it requires."""
    known = _POSITIONAL.get(cls)
    if known is None:
        fields = [f for f in dataclasses.fields(cls) if f.init and not f.kw_only]
        known = _POSITIONAL[cls] = (tuple(f.name for f in fields), sum(
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields))
    return known


class Plain:
    """Base of plain records (decorate the subclass with ``@record`` or ``@frozen_record``)."""

    __pydantic_config__ = {"extra": "forbid"}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    def __init__(self, **values) -> None:
        _fill(self, _spec(type(self)), values, "keyword-only ")
        self.__post_init__()

    __repr__ = _repr
    __eq__ = _eq

    def __post_init__(self) -> None:
        for name, (kind, sub) in _nested(type(self)).items():
            value = getattr(self, name)
            if kind == "one" and isinstance(value, dict):
                value = sub(**value)
            elif kind == "list" and value and any(isinstance(v, dict) for v in value):
                value = [sub(**v) if isinstance(v, dict) else v for v in value]
            elif kind == "dict" and value and any(isinstance(v, dict) for v in value.values()):
                value = {k: sub(**v) if isinstance(v, dict) else v for k, v in value.items()}
            else:
                continue
            object.__setattr__(self, name, value)  # also on a frozen record

    def model_dump(self, mode: str = "python", include: set | None = None, exclude: set | None = None) -> dict:
        out = dataclasses.asdict(self)
        if include is not None:
            out = {k: v for k, v in out.items() if k in include}
        if exclude is not None:
            out = {k: v for k, v in out.items() if k not in exclude}
        return out

    def model_dump_json(self, indent: int | None = None) -> str:
        return json.dumps(self.model_dump(), indent=indent, ensure_ascii=False,
                          separators=None if indent is not None else (",", ":"))

    @classmethod
    def _adapter(cls):
        adapter = cls.__dict__.get("_pydantic_adapter")
        if adapter is None:
            from pydantic import TypeAdapter
            adapter = TypeAdapter(cls)
            cls._pydantic_adapter = adapter
        return adapter

    @classmethod
    def model_validate(cls, obj):
        """A record from Python data, checked (pydantic.ValidationError when it does not fit)."""
        record = _record(cls, obj)
        return cls._adapter().validate_python(obj) if record is _BAD else record

    @classmethod
    def model_validate_plain(cls, obj):
        """A record from Python data that is exactly what the record declares (as its model_dump gives), else
        None: never pydantic."""
        record = _record(cls, obj)
        return None if record is _BAD else record

    @classmethod
    def model_validate_json(cls, text: str | bytes):
        try:  # UTF-8 (no BOM, no lone surrogate) and JSON, as pydantic reads it; else pydantic says how it is not
            decoded = text if isinstance(text, str) else bytes(text).decode()
            record = _BAD if _SURROGATE.search(decoded) else _record(cls, json.loads(decoded))
        except (ValueError, RecursionError):
            record = _BAD
        return cls._adapter().validate_json(text) if record is _BAD else record

    @classmethod
    def model_json_schema(cls) -> dict:
        """pydantic's JSON schema of the record, with each field's ``metadata["description"]``."""
        schema = cls._adapter().json_schema()
        for entry in [schema, *schema.get("$defs", {}).values()]:
            record = _REGISTRY.get(entry.get("title", ""))
            if record is None or not dataclasses.is_dataclass(record):
                continue
            if record.__doc__ and not record.__doc__.startswith(record.__name__ + "("):
                import inspect
                entry["description"] = inspect.cleandoc(record.__doc__)
            for f in dataclasses.fields(record):
                prop = entry.get("properties", {}).get(f.name)
                if prop is None:
                    continue
                if "description" in f.metadata:
                    prop["description"] = f.metadata["description"]
                if f.default_factory is not dataclasses.MISSING:
                    value = f.default_factory()
                    prop["default"] = value.model_dump() if isinstance(value, Plain) else value
        return schema


record = _decorator(frozen=False)  # a plain record's decorator
frozen_record = _decorator(frozen=True)
struct = _decorator(frozen=False, kw_only=False)  # a plain struct's
frozen_struct = _decorator(frozen=True, kw_only=False)
