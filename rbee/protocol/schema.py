"""Typed, validated frame classes: the machinery behind rbee's one message schema.

A frame type is a frozen dataclass whose fields carry their limits (``spec(...)``). Building one
validates it, whether the values come from a person's flags or from bytes off the network, so a
frame that exists is a frame that is valid. Validation collects every bad field before raising,
so an error names all of them at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, dataclass_transform

from rbee.errors import InvalidRequest

MAX_STRING_CHARS = 64 * 1024
MAX_BYTES = 1024 * 1024  # an encoded frame carried inside another (FramesReply)
MAX_LIST_ITEMS = 4096
_INVALID: Any = object()  # stands in for a nested record whose problems are already recorded


@dataclass(frozen=True)
class Limits:
    """Bounds checked for one field (None: unbounded)."""

    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None


def spec(
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    max_len: int | None = None,
    choices: tuple[str, ...] | None = None,
    pattern: str | None = None,
) -> Any:
    """Declare a field with its limits; ``max_len`` counts characters, bytes or list items;
    ``pattern`` is a regular expression the whole text must match."""
    compiled = re.compile(pattern) if pattern else None
    meta = {"limits": Limits(min=min, max=max, max_len=max_len, choices=choices, pattern=compiled)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Problems:
    """Collects validation problems as ``field: what is wrong`` lines."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, what: str) -> None:
        self.items.append(f"{path} {what}")


@dataclass_transform(
    frozen_default=True, kw_only_default=True, field_specifiers=(spec, dataclasses.field)
)
class Record:
    """A validated, frozen value; subclasses are made dataclasses automatically."""

    _hints: ClassVar[dict[str, Any]]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True, kw_only=True)(cls)

    def __post_init__(self) -> None:
        problems = Problems()
        check_record(self, "", problems)
        problems.items += self.whole_problems() if not problems.items else []
        if problems.items:
            raise InvalidRequest(
                f"invalid {type(self).__name__}: " + "; ".join(problems.items),
                suggestion="fix the fields named above",
            )

    def whole_problems(self) -> list[str]:
        """What is wrong across fields, beyond each field's own bounds (a subclass's rules)."""
        return []

    def to_wire(self) -> dict[str, Any]:
        """The plain dict msgpack sends (nested records become dicts too)."""
        return {f.name: _to_wire(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _to_wire(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    return value


_RESOLVED: dict[tuple[str, str], Any] = {}  # (module, annotation text) → the type it names


def hints(cls: type[Record]) -> dict[str, Any]:
    """Resolved field annotations of a record class, cached on the class.

    Annotations are text (``from __future__ import annotations``); each distinct text is
    evaluated once per module. typing.get_type_hints did the same work per class at ~0.2 ms
    each, which a fresh keeper paid on its first frames.
    """
    cached = cls.__dict__.get("_hints")
    if cached is None:
        cached = {}
        for klass in reversed(cls.__mro__):
            module = klass.__module__
            for name, annotation in inspect.get_annotations(klass).items():
                if isinstance(annotation, str):
                    key = (module, annotation)
                    if key not in _RESOLVED:
                        _RESOLVED[key] = eval(annotation, vars(sys.modules[module]))
                    annotation = _RESOLVED[key]
                cached[name] = annotation
        cls._hints = cached
    return cached


def check_record(rec: Record, prefix: str, problems: Problems) -> None:
    """Validate every field of ``rec`` against its annotation and limits."""
    annotations = hints(type(rec))
    for f in dataclasses.fields(rec):
        limits = f.metadata.get("limits", Limits())
        check_value(getattr(rec, f.name), annotations[f.name], limits, prefix + f.name, problems)


def check_value(value: Any, tp: Any, limits: Limits, path: str, problems: Problems) -> None:
    """Validate one value against a type annotation and limits, recording problems."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return
        tp = next(o for o in options if o is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list | tuple):
            problems.add(path, f"must be a list (got {type(value).__name__})")
            return
        cap = limits.max_len if limits.max_len is not None else MAX_LIST_ITEMS
        if len(value) > cap:
            problems.add(path, f"must have at most {cap} items (got {len(value)})")
            return
        (item_tp,) = typing.get_args(tp)
        for i, item in enumerate(value):
            check_value(item, item_tp, Limits(), f"{path}[{i}]", problems)
        return
    if isinstance(tp, type) and issubclass(tp, Record):
        if value is _INVALID:
            return
        if not isinstance(value, tp):
            problems.add(path, f"must be a {tp.__name__}")
        return
    _check_scalar(value, tp, limits, path, problems)


def _check_scalar(value: Any, tp: Any, limits: Limits, path: str, problems: Problems) -> None:
    if tp is bool:
        if not isinstance(value, bool):
            problems.add(path, f"must be true or false (got {value!r})")
        return
    if tp is int or tp is float:
        ok = isinstance(value, int) if tp is int else isinstance(value, int | float)
        if not ok or isinstance(value, bool):
            problems.add(
                path, f"must be {'an integer' if tp is int else 'a number'} (got {value!r})"
            )
            return
        if not math.isfinite(value):
            problems.add(path, f"must be a finite number (got {value})")
        elif limits.min is not None and value < limits.min:
            problems.add(path, f"must be ≥ {_num(limits.min)} (got {value})")
        elif limits.max is not None and value > limits.max:
            problems.add(path, f"must be ≤ {_num(limits.max)} (got {value})")
        return
    if tp is str or tp is bytes:
        if not isinstance(value, tp):
            problems.add(path, f"must be {'text' if tp is str else 'bytes'} (got {value!r:.40})")
            return
        default_cap = MAX_STRING_CHARS if tp is str else MAX_BYTES
        cap = limits.max_len if limits.max_len is not None else default_cap
        if len(value) > cap:
            problems.add(path, f"must be at most {cap} long (got {len(value)})")
        elif isinstance(value, str) and (bad := not_unicode(value)):
            problems.add(path, bad)
        elif limits.choices is not None and value not in limits.choices:
            problems.add(path, f"must be one of {', '.join(limits.choices)} (got {value!r})")
        elif limits.pattern is not None and not limits.pattern.fullmatch(str(value)):
            problems.add(path, f"has characters it may not have (got {value!r:.40})")
        return
    raise TypeError(f"unsupported field type {tp!r} at {path}")  # a schema bug, not bad input


def not_unicode(text: str) -> str:
    """Why ``text`` cannot travel as UTF-8, or "". Python carries bytes of argv (or of stdin in
    the C locale) that are not UTF-8, and JSON's lone ``\\udXXX`` escapes, as surrogates, which
    msgpack would refuse deep inside an encode."""
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:  # how Python's surrogateescape keeps a byte
            return f"is not UTF-8 text (the byte 0x{code - 0xDC00:02x} at character {exc.start})"
        return f"is not text (a lone surrogate U+{code:04X} at character {exc.start})"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


R = TypeVar("R", bound=Record)


def record_from_wire(cls: type[R], data: Any, path: str = "") -> R:
    """Build ``cls`` from decoded msgpack data, turning nested dicts into records first.

    Raises InvalidRequest naming every missing, unknown-typed or out-of-range field.
    """
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path or cls.__name__} must be a map")
    problems = Problems()
    kwargs: dict[str, Any] = {}
    annotations = hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.add(path + f.name, "is required")
            continue
        value = _from_wire(data[f.name], annotations[f.name], path + f.name, problems)
        limits = f.metadata.get("limits", Limits())
        check_value(value, annotations[f.name], limits, path + f.name, problems)
        kwargs[f.name] = value
    if problems.items:
        raise InvalidRequest(f"invalid {cls.__name__}: " + "; ".join(problems.items))
    record = _checked(cls, kwargs)
    if whole := record.whole_problems():
        raise InvalidRequest(f"invalid {cls.__name__}: " + "; ".join(whole))
    return record


def fitted(cls: type[R], values: dict[str, Any]) -> tuple[R, list[str]]:
    """``cls`` built from ``values`` made to fit its limits (texts cut, ending in "…"; integers
    clamped into range) and the names of the fields that had to change: a record read from a
    file must never make the reply that carries it invalid."""
    changed = []
    fitted_values = dict(values)
    for f in dataclasses.fields(cls):
        limits, value = f.metadata.get("limits", Limits()), values.get(f.name)
        new = value
        if isinstance(value, str) and limits.max_len is not None and len(value) > limits.max_len:
            new = value[: limits.max_len - 1] + "…"
        elif isinstance(value, int) and not isinstance(value, bool):
            low = int(limits.min) if limits.min is not None else -(2**63)
            high = int(limits.max) if limits.max is not None else 2**63 - 1
            new = min(max(value, low), high)
        if new != value:
            changed.append(f.name)
            fitted_values[f.name] = new
    return cls(**fitted_values), changed


def _checked(cls: type[R], values: dict[str, Any]) -> R:
    """``cls(**values)`` without the constructor's validation, which would repeat the checks
    record_from_wire just made field by field (half of decoding a frame); missing fields take
    their defaults."""
    record = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:  # pragma: no cover - record_from_wire reported the missing field already
            raise AssertionError(f"{cls.__name__}.{f.name} is required")
        object.__setattr__(record, f.name, value)
    return record


def _from_wire(value: Any, tp: Any, path: str, problems: Problems) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(o for o in typing.get_args(tp) if o is not type(None))
        origin = typing.get_origin(tp)
    if origin is list and isinstance(value, list):
        (item_tp,) = typing.get_args(tp)
        return [_from_wire(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, Record):
        try:
            return record_from_wire(tp, value, path + ".")
        except InvalidRequest as exc:
            problems.add(path, f"is invalid ({exc.message})")
            return _INVALID
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
