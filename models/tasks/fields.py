"""Declarative settings fields (default, allowed range, aliases) and one parser for all of them.

Every settings dataclass in `models.tasks.settings` is made of `param(...)` fields. `parse_settings`
turns a user's mapping (CLI `--param name=value` strings, YAML values, settings.json) into a
validated, frozen instance and reports *every* problem at once, each naming the parameter and
its allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from models.errors import SettingsError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Spec:
    """What a field accepts: its kind, bounds or choices, and whether it is an inference setting."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    inference: bool = False
    per_request: bool = True  # an inference setting a request may override (False: fixed at load)
    doc: str = ""

    def describe(self) -> str:
        """Human wording of the allowed values, used in every error message."""
        if dataclasses.is_dataclass(self.kind):
            text = "a JSON object with keys " + ", ".join(field_specs(self.kind))
        elif self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is bool:
            text = "0 or 1 (or true/false)"
        else:
            noun = {int: "an integer", float: "a float", str: "a string"}.get(self.kind, self.kind.__name__)
            text = noun + _describe_bounds(self)
        return text + (" or null" if self.nullable else "")


def _describe_bounds(spec: Spec) -> str:
    low = spec.ge if spec.ge is not None else spec.gt
    high = spec.le if spec.le is not None else spec.lt
    if low is not None and high is not None:
        left = "[" if spec.ge is not None else "("
        right = "]" if spec.le is not None else ")"
        return f" in {left}{_num(low)}, {_num(high)}{right}"
    if low is not None:
        return f" {'>=' if spec.ge is not None else '>'} {_num(low)}"
    if high is not None:
        return f" {'<=' if spec.le is not None else '<'} {_num(high)}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def param(
    default: Any,
    kind: type | None = None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    nullable: bool | None = None,
    inference: bool = False,
    per_request: bool = True,
    doc: str = "",
) -> Any:
    """A dataclass field carrying its `Spec` in metadata."""
    if kind is None:
        kind = type(default) if default is not None else str
    spec = Spec(
        kind=kind, ge=ge, gt=gt, le=le, lt=lt,
        choices=tuple(choices) if choices is not None else None,
        nullable=default is None if nullable is None else nullable,
        inference=inference, per_request=per_request, doc=doc,
    )
    return dataclasses.field(default=default, metadata={"spec": spec})


def spec_of(field: dataclasses.Field) -> Spec:
    return field.metadata["spec"]


def coerce(value: Any, spec: Spec) -> Any:
    """Convert one raw value (often a string from the command line) to the field's kind."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null"}):
        if spec.nullable:
            return None
        raise ValueError("a value is required")
    if spec.kind is bool:
        return _to_bool(value)
    if spec.kind is int:
        return _to_int(value)
    if spec.kind is float:
        return _to_float(value)
    if spec.kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value.strip()
    if dataclasses.is_dataclass(spec.kind):
        return _to_nested(value, spec.kind)
    return value


def _to_nested(value: Any, cls: type) -> Any:
    """A nested settings object given as a dict or as a JSON string (`advanced_settings`)."""
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


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected 0 or 1, got {value!r}")


def _to_int(value: Any) -> int:
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


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError("NaN is not allowed")
    return number


def check(value: Any, spec: Spec) -> bool:
    """Whether an already-coerced value is within the spec's range or choices."""
    if value is None:
        return spec.nullable
    if spec.choices is not None:
        return value in spec.choices
    if spec.ge is not None and value < spec.ge:
        return False
    if spec.gt is not None and value <= spec.gt:
        return False
    if spec.le is not None and value > spec.le:
        return False
    if spec.lt is not None and value >= spec.lt:
        return False
    return True


def _match_choice(value: Any, spec: Spec) -> Any:
    """Choices are case-insensitive for strings (`SGD` is `sgd`)."""
    if spec.choices is None or not isinstance(value, str):
        return value
    for choice in spec.choices:
        if isinstance(choice, str) and choice.lower() == value.lower():
            return choice
    return value


def unknown_name_message(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{name}: unknown parameter{hint}"


def parse_settings(
    cls: type[T],
    raw: Mapping[str, Any],
    *,
    source: str = "settings",
    defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
    ignore: Sequence[str] = (),
    unsupported: Mapping[str, str] | None = None,
    cross_check: Callable[[T], list[str]] | None = None,
) -> T:
    """Build `cls` from `raw` on top of `defaults`; raise `SettingsError` listing every problem.

    `aliases` maps an alternative spelling to the canonical name; `unsupported` maps names the
    spec knows but this project does not provide to the reason; `ignore` names keys that are
    accepted and dropped (metadata kept next to the settings).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if "spec" in f.metadata}
    aliases = dict(aliases or {})
    problems: list[str] = []
    values: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name in ignore:
            continue
        if unsupported and name in unsupported:
            problems.append(f"{key}: {unsupported[name]}")
            continue
        if name not in fields:
            problems.append(unknown_name_message(key, sorted(set(fields) | set(aliases))))
            continue
        if name in given_by:
            problems.append(f"{key}: given twice (also as {given_by[name]!r})")
            continue
        given_by[name] = key
        spec = spec_of(fields[name])
        try:
            coerced = _match_choice(coerce(value, spec), spec)
        except ValueError as exc:
            problems.append(f"{key}={_show(value)}: {exc}; must be {spec.describe()}")
            continue
        if not check(coerced, spec):
            problems.append(f"{key}={_show(value)} is out of range: must be {spec.describe()}")
            continue
        values[name] = coerced
    for name, value in (defaults or {}).items():
        if name in fields and name not in values:
            values[name] = value
    if problems:
        raise SettingsError(problems, source)
    instance = cls(**values)
    if cross_check is not None:
        problems = cross_check(instance)
        if problems:
            raise SettingsError(problems, source)
    return instance


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def field_specs(cls: type) -> dict[str, Spec]:
    """Name → Spec for every declared parameter of a settings class."""
    return {f.name: spec_of(f) for f in dataclasses.fields(cls) if "spec" in f.metadata}


def as_dict(instance: Any, *, inference_only: bool = False) -> dict[str, Any]:
    """The declared parameters of a settings instance as plain JSON-able values."""
    out = {}
    for f in dataclasses.fields(instance):
        if "spec" not in f.metadata:
            continue
        if inference_only and not spec_of(f).inference:
            continue
        value = getattr(instance, f.name)
        out[f.name] = value.to_json() if hasattr(value, "to_json") else value
    return out


def parse_param_flags(pairs: Sequence[str], flag: str = "--param") -> dict[str, str]:
    """`--param name=value` (or `--set`) flags → {name: value}; a pair without `=` is an error naming it."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SettingsError([f"{flag} {pair!r}: expected name=value"], "command line")
        out[name.strip()] = value.strip()
    return out
