"""How settings are declared (pydantic models with the spec's names, defaults, ranges and aliases) and
parsed, with every problem reported at once, each naming the parameter and its allowed range.

A settings class is a `SettingsModel` whose fields use the value types below (`Int`, `Float`, `Flag`,
`Text`, `Triple`, `one_of(...)`, `maybe(...)`) and `param(...)` for the default, bounds, documentation, aliases
and role (`inference`: part of settings.json; `per_request`: a request may override it). pydantic
does the coercion and the checks; `parse_settings` adds what users of the cloud expect on top:
aliases, "did you mean", "given twice", names the spec knows but this project does not provide, and
messages in the spec's words (`learning_rate=3 is out of range: must be a float in [0, 1]`).
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from models.errors import SettingsError
from models.values import to_flag

T = TypeVar("T", bound="SettingsModel")


class SettingsModel(BaseModel):
    """Frozen, no unknown keys; values of the types below; compared and hashed by value."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- value types (lenient input, strict result)


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    return int(number)


def _to_float(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError("NaN is not allowed")
    return number


def _to_text(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value.strip()


def _to_triple(value: Any) -> Any:
    """Three numbers, one per channel (R, G, B): a list, or a string such as "0.5, 0.5, 0.5"."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"expected three numbers (R, G, B), got {value!r}")
    return tuple(_to_float(v) for v in value)


def _nested(cls: type[SettingsModel]) -> Callable[[Any], Any]:
    """A nested settings object given as a mapping or as a JSON string (`advanced_settings`)."""

    def read(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a JSON object, got {value!r}")
        try:
            return parse_settings(cls, value)
        except SettingsError as exc:
            raise ValueError("; ".join(exc.problems)) from None

    return read


def _choice(choices: tuple[Any, ...]) -> Callable[[Any], Any]:
    """Choices are case-insensitive for strings (`SGD` is `sgd`); integer choices take "1" too."""
    numbers = all(isinstance(c, int) and not isinstance(c, bool) for c in choices)

    def match(value: Any) -> Any:
        if numbers:
            return _to_int(value)
        if isinstance(value, str):
            for choice in choices:
                if isinstance(choice, str) and choice.lower() == value.strip().lower():
                    return choice
        return value

    return match


def _nullable(read: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def maybe_read(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null"}):
            return None
        return read(value) if read is not None else value

    return maybe_read


Int = Annotated[int, BeforeValidator(_to_int)]
Float = Annotated[float, BeforeValidator(_to_float)]
Flag = Annotated[bool, BeforeValidator(to_flag)]
Text = Annotated[str, BeforeValidator(_to_text)]
Triple = Annotated[tuple[float, float, float], BeforeValidator(_to_triple)]


def one_of(*choices: Any) -> Any:
    """A value among `choices` (strings matched without regard to case)."""
    return Annotated[Literal[choices], BeforeValidator(_choice(choices))]


def nested(cls: type[SettingsModel]) -> Any:
    """A nested settings object (a mapping or its JSON string)."""
    return Annotated[cls, BeforeValidator(_nested(cls))]


def maybe(kind: Any) -> Any:
    """`kind` or None (also written "none" / "null")."""
    base, read = _unwrap(kind)
    return Annotated[base | None, BeforeValidator(_nullable(read))]


def _unwrap(kind: Any) -> tuple[Any, Callable[[Any], Any] | None]:
    if typing.get_origin(kind) is Annotated:
        base, *meta = typing.get_args(kind)
        reads = [m.func for m in meta if isinstance(m, BeforeValidator)]
        return base, reads[0] if reads else None
    return kind, None


def param(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, inference: bool = False, per_request: bool = True, doc: str = "",
          aliases: Sequence[str] = ()) -> Any:
    """A field's default, bounds and documentation; `inference`: stored in settings.json; `per_request`:
    an inference setting a request may override (False: fixed when the model loads); `aliases`: other
    spellings from the cloud's documents."""
    extra: dict[str, Any] = {}
    if inference:
        extra["inference"] = True
        if not per_request:
            extra["per_request"] = False
    if aliases:
        extra["aliases"] = list(aliases)
    return Field(default, ge=ge, gt=gt, le=le, lt=lt, description=doc or None, json_schema_extra=extra or None)


# ---------------------------------------------------------------- what a field is


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def is_inference(field: FieldInfo) -> bool:
    return bool(_extra(field).get("inference"))


def is_per_request(field: FieldInfo) -> bool:
    return is_inference(field) and _extra(field).get("per_request", True)


def aliases_of(cls: type[SettingsModel]) -> dict[str, str]:
    """alias → field name, for every alias a class's fields declare."""
    return {alias: name for name, f in cls.model_fields.items() for alias in _extra(f).get("aliases", ())}


def kind_of(field: FieldInfo) -> tuple[Any, tuple[Any, ...] | None, bool]:
    """(base type, choices or None, nullable) of a field."""
    annotation, nullable = field.annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, nullable = args[0], True
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, nullable
    return annotation, None, nullable


def _bounds(field: FieldInfo) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in field.metadata:
        for kind, attr in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
            if isinstance(m, kind):
                out[attr] = getattr(m, attr)
    return out


def describe(field: FieldInfo) -> str:
    """Human wording of the allowed values, used in every error message."""
    kind, choices, nullable = kind_of(field)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        text = "a JSON object with keys " + ", ".join(kind.model_fields)
    elif choices is not None:
        text = "one of " + ", ".join(repr(c) for c in choices)
    elif kind is bool:
        text = "0 or 1 (or true/false)"
    elif typing.get_origin(kind) is tuple:
        text = "three numbers (R, G, B)"
    else:
        noun = {int: "an integer", float: "a float", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))
        text = noun + _describe_bounds(_bounds(field))
    return text + (" or null" if nullable else "")


def _describe_bounds(b: Mapping[str, float]) -> str:
    low, high = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
    if low is not None and high is not None:
        return f" in {'[' if 'ge' in b else '('}{_num(low)}, {_num(high)}{']' if 'le' in b else ')'}"
    if low is not None:
        return f" {'>=' if 'ge' in b else '>'} {_num(low)}"
    if high is not None:
        return f" {'<=' if 'le' in b else '<'} {_num(high)}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


# ---------------------------------------------------------------- parsing


def unknown_name_message(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{name}: unknown parameter{hint}"


def _problems(cls: type[SettingsModel], error: ValidationError, given_by: Mapping[str, str],
              raw: Mapping[str, Any]) -> list[str]:
    """pydantic's errors in the spec's words, one per parameter, in the order they were given."""
    out: dict[str, str] = {}
    for e in error.errors():
        name = str(e["loc"][0]) if e["loc"] else ""
        if name in out or name not in cls.model_fields:
            continue
        key = given_by.get(name, name)
        value = raw.get(key, e.get("input"))
        field = cls.model_fields[name]
        if e["type"] == "value_error":
            out[name] = f"{key}={_show(value)}: {e['ctx']['error']}; must be {describe(field)}"
        else:
            out[name] = f"{key}={_show(value)} is out of range: must be {describe(field)}"
    order = {name: i for i, name in enumerate(given_by)}
    return [out[name] for name in sorted(out, key=lambda n: order.get(n, len(order)))]


def parse_settings(cls: type[T], raw: Mapping[str, Any], *, source: str = "settings",
                   defaults: Mapping[str, Any] | None = None, ignore: Sequence[str] = (),
                   unsupported: Mapping[str, str] | None = None,
                   cross_check: Callable[[T], list[str]] | None = None) -> T:
    """Build `cls` from `raw` on top of `defaults`; raise `SettingsError` listing every problem.

    `unsupported` maps names the spec knows but this project does not provide to the reason;
    `ignore` names keys that are accepted and dropped (metadata kept next to the settings)."""
    aliases = aliases_of(cls)
    problems: list[str] = []
    values: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name in ignore:
            continue
        if unsupported and name in unsupported:
            problems.append(f"{key}: {unsupported[name]}")
        elif name not in cls.model_fields:
            problems.append(unknown_name_message(key, sorted(set(cls.model_fields) | set(aliases))))
        elif name in given_by:
            problems.append(f"{key}: given twice (also as {given_by[name]!r})")
        else:
            given_by[name] = key
            values[name] = value
    values = {**{k: v for k, v in (defaults or {}).items() if k in cls.model_fields}, **values}
    try:
        instance = cls.model_validate(values)
    except ValidationError as exc:
        problems += _problems(cls, exc, given_by, raw)
        instance = None
    if problems:
        raise SettingsError(problems, source)
    if cross_check is not None:
        problems = cross_check(instance)
        if problems:
            raise SettingsError(problems, source)
    return instance


def check_value(cls: type[SettingsModel], name: str, value: Any) -> tuple[str | None, str]:
    """(None or why `value` is refused as `name` of `cls`, the wording of what is allowed); the reason is
    "out of range" for a value of the right type outside the field's bounds or choices."""
    field = cls.model_fields[name]
    try:
        cls.model_validate({name: value})
    except ValidationError as exc:
        for e in exc.errors():
            if e["loc"] and e["loc"][0] == name:
                reason = str(e["ctx"]["error"]) if e["type"] == "value_error" else "out of range"
                return reason, describe(field)
    return None, describe(field)


def as_dict(instance: SettingsModel, *, inference_only: bool = False) -> dict[str, Any]:
    """The declared parameters of a settings instance as plain JSON-able values."""
    fields = type(instance).model_fields
    include = {n for n, f in fields.items() if is_inference(f)} if inference_only else None
    return instance.model_dump(include=include)


def form_of(cls: type[SettingsModel], values: SettingsModel | None = None, *,
            keep: Callable[[FieldInfo], bool] = lambda f: True) -> list[dict[str, Any]]:
    """The fields of `cls` that `keep` keeps, as a form needs them (a web page builds its inputs from this):
    name, type (integer, number, boolean, string, choice, triple, object), default (`values`' value, else the
    class's), bounds, choices, nullable, the allowed values in words and the doc."""
    out = []
    for name, field in cls.model_fields.items():
        if not keep(field):
            continue
        kind, choices, nullable = kind_of(field)
        if choices is not None:
            type_name = "choice"
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            type_name = "object"
        elif typing.get_origin(kind) is tuple:
            type_name = "triple"
        else:
            type_name = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(kind, "string")
        default = getattr(values, name) if values is not None and name in type(values).model_fields else field.default
        entry: dict[str, Any] = {"name": name, "type": type_name, "default": default, "nullable": nullable,
                                 "allowed": describe(field), "doc": field.description or ""}
        names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
        entry.update({names[k]: v for k, v in _bounds(field).items()})
        if choices is not None:
            entry["choices"] = list(choices)
        out.append(json.loads(json.dumps(entry, default=str)))
    return out
