"""Plain records: dataclasses with the part of pydantic's surface lorastrap uses (``model_dump``,
``model_dump_json``, ``model_validate``, ``model_validate_json``, ``model_json_schema``), so that a command which
only builds and prints them (``detect``) never imports pydantic.  Reading one from outside (a file, another node's
``detect --json``) validates it with pydantic — strictly, unknown keys refused — imported only then.

    @dataclass(kw_only=True)
    class Gpu(Plain):
        index: int
        name: str | None = field(default=None, metadata={"description": "..."})

Nested records given as dicts (``Gpu(**probe_answer)``) are turned into their classes on construction.
"""

from __future__ import annotations

import dataclasses
import json
import re

_REGISTRY: dict[str, type] = {}
_NESTED: dict[type, dict[str, tuple[str, type]]] = {}  # class → field → ("one" | "list", record class)


def _nested(cls: type) -> dict[str, tuple[str, type]]:
    if cls not in _NESTED:
        out = {}
        for f in dataclasses.fields(cls):
            text = str(f.type).replace(" ", "")
            text = re.sub(r"\|None$|^None\|", "", text)
            match = re.fullmatch(r"list\[(\w+)\]", text)
            name, kind = (match.group(1), "list") if match else (text, "one")
            if name in _REGISTRY:
                out[f.name] = (kind, _REGISTRY[name])
        _NESTED[cls] = out
    return _NESTED[cls]


class Plain:
    """Base of plain records (decorate the subclass with ``@dataclass(kw_only=True)``)."""

    __pydantic_config__ = {"extra": "forbid"}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        for name, (kind, sub) in _nested(type(self)).items():
            value = getattr(self, name)
            if kind == "one" and isinstance(value, dict):
                setattr(self, name, sub(**value))
            elif kind == "list" and value and any(isinstance(v, dict) for v in value):
                setattr(self, name, [sub(**v) if isinstance(v, dict) else v for v in value])

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
        return cls._adapter().validate_python(obj)

    @classmethod
    def model_validate_json(cls, text: str | bytes):
        return cls._adapter().validate_json(text)

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
