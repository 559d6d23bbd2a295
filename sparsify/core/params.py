"""Typed method parameters: one dataclass per method, from which both the checks a recipe goes
through and the method's part of ``recipe.schema.json`` come.

A method declares its params as a :class:`Params` dataclass whose fields use :func:`param`
(default, one-line doc, range); the annotation gives the JSON type (``bool``, ``int``, ``float``,
``str``, ``dict``, ``list[int]``, ``Literal[...]`` for choices, ``| None`` for nullable).
Fields marked ``time=True`` are schedule times (steps, or fractions of ``total_steps``): the
recipe's ``schedule`` block fills them, and their range and order are checked once
``total_steps`` is known. Cross-field checks go into :meth:`Params.check`.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo(Params):
...     sparsity: float = param(0.9, "fraction of zeros", ge=0, lt=1)
...     scope: Literal["global", "layer"] = param("global", "one threshold or one per layer")
>>> Demo.problems({"sparsity": 1.5, "scope": "net"})
[('sparsity', 'must be a number >= 0 and < 1, got 1.5'), ('scope', "must be one of 'global', 'layer', got 'net'")]
>>> Demo.json_schema()["properties"]["scope"]["enum"]
['global', 'layer']
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, field, fields, is_dataclass
from typing import Any, ClassVar, Literal

__all__ = ["Params", "param", "Literal"]


def param(default, doc: str, *, ge=None, gt=None, le=None, lt=None, time: bool = False,
          what: str | None = None):
    """A :class:`Params` field: ``default``, a one-line ``doc`` (the schema's description),
    bounds for numbers, ``time=True`` for schedule times, ``what`` to word the error message
    (``"a fraction in [0, 1)"``)."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "time": time, "what": what}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _split(tp) -> tuple[Any, bool]:
    """``(type without None, whether None is allowed)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), nullable
    return tp, False


def _is(value, tp) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict:
        return isinstance(value, dict)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_is(v, item) for v in value)
    if typing.get_origin(tp) is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp))
    raise TypeError(f"unsupported parameter type {tp!r}")


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}


def _describe(tp, meta) -> str:
    if meta["what"]:
        return meta["what"]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return f"a list of {_NAMES[item].split(' ', 1)[1] if item in _NAMES else item}s"  # "an integer" -> integers
    bounds = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta[k] is not None]
    return " and ".join([f"{_NAMES[tp]} {bounds[0]}" if bounds else _NAMES[tp]] + bounds[1:])


def _in_range(value, meta) -> bool:
    return ((meta["ge"] is None or value >= meta["ge"]) and (meta["gt"] is None or value > meta["gt"])
            and (meta["le"] is None or value <= meta["le"]) and (meta["lt"] is None or value < meta["lt"]))


def _schema_type(tp) -> dict:
    if typing.get_origin(tp) is Literal:
        return {"enum": list(typing.get_args(tp))}
    if typing.get_origin(tp) is list:
        return {"type": "array", "items": _schema_type(typing.get_args(tp)[0])}
    return {"type": {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}[tp]}


def _supported(tp) -> bool:
    if tp in _NAMES:
        return True
    if typing.get_origin(tp) is list:
        return len(typing.get_args(tp)) == 1 and _supported(typing.get_args(tp)[0])
    return typing.get_origin(tp) is Literal


_TYPES = "bool, int, float, str, dict, list[...], Literal[...], each optionally | None"


class Params:
    """Base of a method's params dataclass (decorate the subclass with ``@dataclass``)."""

    #: pairs of time params ``(a, b)`` with ``a <= b`` (checked once ``total_steps`` is known)
    time_order: ClassVar[tuple[tuple[str, str], ...]] = (("begin", "end"), ("end", "fix"), ("begin", "fix"))
    #: ``end`` is where a ramp reaches the target (st3, gmp, semi-structured), not where the method stops
    ramp_end: ClassVar[bool] = False
    #: the method does nothing outside ``[begin, end)`` (the regularizers; l1-prune prunes at its end)
    window_only: ClassVar[bool] = False

    @classmethod
    def _fields(cls):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            tp, nullable = _split(hints[f.name])
            yield f, tp, nullable, f.metadata

    @classmethod
    def refusal(cls) -> str | None:
        """What is wrong with this params class as a method declares it, in one line; None when
        nothing is (checked when the method's class is defined).

        >>> from dataclasses import dataclass
        >>> class Undecorated(Params):
        ...     sparsity: float = param(0.5, "fraction of zeros")
        >>> Undecorated.refusal()
        'Undecorated is not a dataclass: decorate it with @dataclass (from dataclasses import dataclass)'
        >>> @dataclass
        ... class Plain(Params):
        ...     sparsity: float = 0.5
        >>> Plain.refusal()
        "Plain.sparsity is not made with sparsify.core.params.param(default, doc, ...): write sparsity: float = param(0.5, 'what it is')"
        """
        own = cls.__dict__.get("__annotations__", {})
        if not is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__ and own:
            return f"{cls.__name__} is not a dataclass: decorate it with @dataclass (from dataclasses import dataclass)"
        try:
            hints = typing.get_type_hints(cls)
        except Exception as e:
            return f"{cls.__name__}: a field's type cannot be resolved ({type(e).__name__}: {e})"
        for f in fields(cls):
            if "doc" not in f.metadata:
                default = f.default if f.default is not MISSING else "..."
                return (f"{cls.__name__}.{f.name} is not made with sparsify.core.params.param(default, doc, ...): "
                        f"write {f.name}: {getattr(hints[f.name], '__name__', hints[f.name])} = "
                        f"param({default!r}, 'what it is')")
            tp, _ = _split(hints[f.name])
            if not _supported(tp):
                return f"{cls.__name__}.{f.name}: unsupported parameter type {hints[f.name]!r} (supported: {_TYPES})"
        return None

    @classmethod
    def defaults(cls) -> dict:
        """Every param with its default."""
        return asdict(cls())

    @classmethod
    def time_keys(cls) -> tuple[str, ...]:
        """The params that are schedule times."""
        return tuple(f.name for f, *_, meta in cls._fields() if meta.get("time"))

    @classmethod
    def problems(cls, values: dict) -> list[tuple[str, str]]:
        """``(param, message)`` for each value of ``values`` (a complete params dict) that is
        wrong; empty when all are right. Unknown names are reported by the recipe loader."""
        out = []
        for f, tp, nullable, meta in cls._fields():
            if f.name not in values:
                continue
            v = values[f.name]
            if v is None:
                if not nullable:
                    out.append((f.name, f"must be {_describe(tp, meta)}, got None"))
                continue
            if isinstance(v, float) and not math.isfinite(v):
                out.append((f.name, f"must be a finite number, got {v!r}"))
            elif not _is(v, tp) or (tp in (int, float) and not meta.get("time") and not _in_range(v, meta)):
                what = _describe(tp, meta)
                null = " or null" if nullable and "null" not in what else ""  # a `what` may name null itself
                out.append((f.name, f"must be {what}{null}, got {v!r}"))
        if not out:
            out = cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}}).check()
        return out

    def check(self) -> list[tuple[str, str]]:
        """Checks across fields (``n < m``), run once every field has the right type."""
        return []

    @classmethod
    def json_schema(cls) -> dict:
        """The JSON Schema of a rule's ``params`` object for this method."""
        props = {}
        for f, tp, nullable, meta in cls._fields():
            s = {"description": meta["doc"], **_schema_type(tp)}
            if meta.get("time"):
                s = {"$ref": "#/$defs/time", "description": meta["doc"]}
                nullable = False  # the time definition allows null
            for key, word in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"),
                              ("lt", "exclusiveMaximum")):
                if meta[key] is not None and not meta.get("time"):
                    s[word] = meta[key]
            if nullable:
                if "enum" in s:
                    s["enum"] = s["enum"] + [None]
                else:
                    s["type"] = [s["type"], "null"]
            default = f.default if f.default is not MISSING else f.default_factory()
            s["default"] = default
            props[f.name] = s
        return {"type": "object", "additionalProperties": False, "properties": props}
