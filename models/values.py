"""How loosely typed values (command-line strings, YAML, JSON) are read, the same way everywhere."""

from __future__ import annotations


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def to_flag(value: object) -> bool:
    """The one reading of a yes/no value everywhere (settings, isCrowd, model_explainability): a bool,
    0/1, or one of 1/true/yes/on, 0/false/no/off in any case; ValueError for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"expected 0 or 1, got {value!r}")
