"""What a labelled dataset is in memory: records (image + label + where it was read), boxes, and
the label parsers of each task (data.md), which name the field inside the label they refuse."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.errors import Problem
from models.values import to_flag

MAX_REGIONS = 1000  # objects per image (data.md)


@dataclass(frozen=True)
class Box:
    """One object: label, normalised corners, crowd flag, optional instance polygons."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    is_crowd: bool = False
    polygons: tuple[tuple[float, ...], ...] = ()


Label = str | tuple[str, ...] | tuple[Box, ...]


@dataclass(frozen=True)
class Record:
    """One image and its label, with where it was read from."""

    image: str
    label: Label
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def label_names(self) -> list[str]:
        if isinstance(self.label, str):
            return [self.label]
        return [b.label if isinstance(b, Box) else b for b in self.label]



@dataclass
class Dataset:
    """Records read from one JSONL file or MLTable folder, with the problems found."""

    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    source: str = ""

    def labels(self) -> list[str]:
        return sorted({name for r in self.records for name in r.label_names()})


# ---------------------------------------------------------------- labels per task


class LabelError(ValueError):
    """A label value that does not fit the task; `field` names where inside the label."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(message)


def parse_class_label(label: Any) -> str:
    if isinstance(label, list) and len(label) == 1 and isinstance(label[0], str):
        label = label[0]
    if not isinstance(label, str) or not label.strip():
        raise LabelError("label", f"expected a class name (a non-empty string) for image_classification, got {label!r}")
    return label.strip()


def parse_multilabel(label: Any) -> tuple[str, ...]:
    if isinstance(label, str):
        label = [label] if label.strip() else []
    if not isinstance(label, list) or not all(isinstance(x, str) and x.strip() for x in label):
        raise LabelError("label", f"expected a list of class names for image_classification_multilabel, got {label!r}")
    return tuple(sorted({x.strip() for x in label}))


def _unit(value: Any, where: str) -> float:
    """A coordinate: a number (or numeric string) in [0, 1]."""
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number != number:
        raise LabelError(where, f"expected a number in [0, 1], got {value!r}")
    if not 0.0 <= number <= 1.0:
        raise LabelError(where, f"{value!r} is outside [0, 1] (coordinates are fractions of the image size)")
    return number


def _coordinate(obj: dict, key: str, where: str) -> float:
    if key not in obj:
        raise LabelError(f"{where}.{key}", "missing")
    return _unit(obj[key], f"{where}.{key}")


def _crowd(obj: dict, where: str) -> bool:
    value = obj.get("isCrowd", obj.get("iscrowd", 0))
    try:
        return to_flag(value)
    except ValueError:
        raise LabelError(f"{where}.isCrowd", f"expected 0/1 or true/false, got {value!r}") from None


def _polygons(obj: dict, where: str) -> tuple[tuple[float, ...], ...]:
    value = obj.get("polygon")
    if value is None:
        raise LabelError(f"{where}.polygon", "missing (instance segmentation needs polygons)")
    if isinstance(value, list) and value and all(isinstance(v, (int, float, str)) for v in value):
        value = [value]  # a single flat segment
    if not isinstance(value, list) or not value:
        raise LabelError(f"{where}.polygon", f"expected a list of [x1, y1, x2, y2, ...] lists, got {value!r}")
    segments = []
    for i, segment in enumerate(value):
        name = f"{where}.polygon[{i}]"
        if not isinstance(segment, list):
            raise LabelError(name, f"expected a list of numbers, got {segment!r}")
        if len(segment) % 2:
            raise LabelError(name, f"has an odd number of values ({len(segment)}); expected x, y pairs")
        if len(segment) < 6:
            raise LabelError(name, f"has {len(segment) // 2} point(s); a polygon needs at least 3")
        coords = tuple(_unit(v, f"{name}[{j}]") for j, v in enumerate(segment))
        segments.append(coords)
    return tuple(segments)


def parse_boxes(label: Any, *, polygons: bool) -> tuple[Box, ...]:
    """Detection/segmentation label: a list of objects (one object alone is accepted too)."""
    if isinstance(label, dict):
        label = [label]
    if not isinstance(label, list):
        raise LabelError("label", f"expected a list of objects, got {label!r}")
    if len(label) > MAX_REGIONS:
        raise LabelError("label", f"{len(label)} objects; at most {MAX_REGIONS} per image")
    boxes = []
    for i, obj in enumerate(label):
        where = f"label[{i}]"
        if not isinstance(obj, dict):
            raise LabelError(where, f"expected an object, got {obj!r}")
        name = obj.get("label")
        if not isinstance(name, str) or not name.strip():
            raise LabelError(f"{where}.label", f"expected a class name, got {name!r}")
        segs = _polygons(obj, where) if polygons else ()
        if segs and not all(k in obj for k in ("topX", "topY", "bottomX", "bottomY")):
            xs = [v for s in segs for v in s[0::2]]
            ys = [v for s in segs for v in s[1::2]]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        else:
            x0, y0 = _coordinate(obj, "topX", where), _coordinate(obj, "topY", where)
            x1, y1 = _coordinate(obj, "bottomX", where), _coordinate(obj, "bottomY", where)
        if x0 >= x1:
            raise LabelError(f"{where}.topX", f"topX={x0} is not less than bottomX={x1}")
        if y0 >= y1:
            raise LabelError(f"{where}.topY", f"topY={y0} is not less than bottomY={y1}")
        boxes.append(Box(name.strip(), x0, y0, x1, y1, _crowd(obj, where), segs))
    return tuple(boxes)


LABEL_PARSERS = {
    "image_classification": parse_class_label,
    "image_classification_multilabel": parse_multilabel,
    "image_object_detection": lambda label: parse_boxes(label, polygons=False),
    "image_instance_segmentation": lambda label: parse_boxes(label, polygons=True),
}
TASK_NAMES: tuple[str, ...] = tuple(LABEL_PARSERS)  # the four tasks, each defined first by its label format


def check_task_name(task: str) -> None:
    """ValueError naming the four tasks when `task` is not one of them."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_NAMES)}")
