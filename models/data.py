"""Labelled data: JSONL and MLTable reading (data.md), `image_url` resolution, validation.

Reading never drops a line quietly: every problem becomes a `Problem` naming file, line and
field, and `DataError` reports all of them at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from models.images import MIN_SIDE, MAX_TRAINING_BYTES, MAX_TRAINING_SIDE, ImageError, image_size

MIN_TRAINING_IMAGES = 10
MAX_REGIONS = 1000


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


@dataclass(frozen=True)
class Problem:
    source: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DataError(ValueError):
    """The data cannot be used; `problems` lists every reason."""

    def __init__(self, problems: Sequence[Problem | str], what: str = "data", shown: int = 50):
        self.problems = [str(p) for p in problems]
        head = "\n".join(f"  - {p}" for p in self.problems[:shown])
        more = f"\n  ... and {len(self.problems) - shown} more" if len(self.problems) > shown else ""
        super().__init__(f"{len(self.problems)} problem(s) in {what}:\n{head}{more}")


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
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise LabelError(f"{where}.isCrowd", f"expected 0/1 or true/false, got {value!r}")


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


# ---------------------------------------------------------------- image_url resolution


def resolve_image_url(url: str, base_dir: Path, image_root: Path | None) -> str:
    """Map `image_url` to a local path (data.md): relative, absolute, file://, cloud URLs."""
    url = url.strip()
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    root = image_root if image_root is not None else base_dir
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):  # file://./images/a.jpg: relative, not /images/a.jpg
            relative = Path(unquote(url[len("file://"):]))
            return str(relative if relative.is_absolute() else base_dir / relative)
        return unquote(parsed.path)
    if scheme == "azureml":
        marker = "/paths/"
        if marker in url:
            return str(root / unquote(url.split(marker, 1)[1]))
        return str(root / unquote(parsed.path.lstrip("/")))
    if scheme == "amldatastore":
        return str(root / unquote(url.split("://", 1)[1]))
    if scheme in ("http", "https", "wasb", "wasbs", "abfs", "abfss", "s3", "gs", "gcs", "adl"):
        path = unquote(parsed.path.lstrip("/"))
        if scheme in ("http", "https") and ".blob.core.windows.net" in parsed.netloc:
            path = path.split("/", 1)[1] if "/" in path else path  # drop the container
        return str(root / path)
    if len(scheme) == 1:  # a Windows drive letter, e.g. C:/data
        return url
    path = Path(url)
    return str(path if path.is_absolute() else base_dir / path)


# ---------------------------------------------------------------- JSONL and MLTable


LABEL_PARSERS = {
    "image_classification": parse_class_label,
    "image_classification_multilabel": parse_multilabel,
    "image_object_detection": lambda label: parse_boxes(label, polygons=False),
    "image_instance_segmentation": lambda label: parse_boxes(label, polygons=True),
}


def _parse_line(obj: Any, task: str, source: str, lineno: int, base: Path, root: Path | None) -> Record:
    if not isinstance(obj, dict):
        raise LabelError("", f"expected a JSON object, got {type(obj).__name__}")
    url = obj.get("image_url")
    if not isinstance(url, str) or not url.strip():
        raise LabelError("image_url", "missing or not a string")
    if "label" not in obj:
        raise LabelError("label", "missing")
    label = LABEL_PARSERS[task](obj["label"])
    return Record(resolve_image_url(url, base, root), label, source, lineno)


def read_jsonl(
    path: str | Path, task: str, *, image_root: str | Path | None = None, invalid_lines: str = "error"
) -> Dataset:
    """Read one JSONL file. `invalid_lines="drop"` (MLTable's option) turns problems into warnings."""
    path = Path(path)
    dataset = Dataset(source=str(path))
    root = Path(image_root) if image_root is not None else None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        dataset.problems.append(Problem(str(path), None, "", "file not found"))
        return dataset
    except UnicodeDecodeError as exc:
        dataset.problems.append(Problem(str(path), None, "", f"not UTF-8 text ({exc.reason})"))
        return dataset
    sink = dataset.warnings if invalid_lines == "drop" else dataset.problems
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            sink.append(Problem(path.name, lineno, "", f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        try:
            dataset.records.append(_parse_line(obj, task, path.name, lineno, path.parent, root))
        except LabelError as exc:
            sink.append(Problem(path.name, lineno, exc.field, str(exc)))
    if not dataset.records and not dataset.problems:
        dataset.problems.append(Problem(str(path), None, "", "no images listed"))
    return dataset


def mltable_files(folder: Path) -> tuple[list[Path], dict]:
    spec_file = folder / "MLTable" if folder.is_dir() else folder
    spec = yaml.safe_load(spec_file.read_text()) or {}
    base = spec_file.parent
    files: list[Path] = []
    for entry in spec.get("paths", []):
        if "file" in entry:
            files.append(base / str(entry["file"]).removeprefix("file://"))
        elif "pattern" in entry:
            files.extend(sorted(base.glob(str(entry["pattern"]).removeprefix("./"))))
        elif "folder" in entry:
            files.extend(sorted((base / str(entry["folder"])).glob("*.jsonl")))
    options: dict = {}
    for step in spec.get("transformations", []) or []:
        if isinstance(step, dict) and "read_json_lines" in step:
            options = step["read_json_lines"] or {}
    return files, options


def read_dataset(path: str | Path, task: str, *, image_root: str | Path | None = None) -> Dataset:
    """A JSONL file, an MLTable folder (or its MLTable file) → records and problems."""
    path = Path(path)
    if path.is_dir() or path.name == "MLTable":
        if not (path / "MLTable").exists() and path.name != "MLTable":
            return Dataset(problems=[Problem(str(path), None, "", "folder has no MLTable file")], source=str(path))
        files, options = mltable_files(path)
        invalid = str(options.get("invalid_lines", "error"))
        merged = Dataset(source=str(path))
        if not files:
            merged.problems.append(Problem(str(path), None, "paths", "the MLTable lists no JSONL file"))
        for file in files:
            part = read_jsonl(file, task, image_root=image_root, invalid_lines=invalid)
            merged.records += part.records
            merged.problems += part.problems
            merged.warnings += part.warnings
        return merged
    return read_jsonl(path, task, image_root=image_root)


# ---------------------------------------------------------------- validation before training


def check_images(records: Iterable[Record]) -> list[Problem]:
    """Every image exists, is readable, at least 50x50, at most 10,240 per side and 20 MB."""
    problems = []
    for r in records:
        try:
            size = os.stat(r.image).st_size
            width, height = image_size(r.image)
        except FileNotFoundError:
            problems.append(Problem(r.source, r.line, "image_url", f"image not found: {r.image}"))
            continue
        except ImageError as exc:
            problems.append(Problem(r.source, r.line, "image_url", f"{r.image}: {exc}"))
            continue
        if width < MIN_SIDE or height < MIN_SIDE:
            problems.append(Problem(r.source, r.line, "image_url",
                                    f"{r.image} is {width}x{height}; images must be at least {MIN_SIDE}x{MIN_SIDE}"))
        elif max(width, height) > MAX_TRAINING_SIDE:
            problems.append(Problem(r.source, r.line, "image_url",
                                    f"{r.image} is {width}x{height}; training images are at most {MAX_TRAINING_SIDE} per side"))
        if size > MAX_TRAINING_BYTES:
            problems.append(Problem(r.source, r.line, "image_url",
                                    f"{r.image} is {size / 1e6:.1f} MB; training images must be under 20 MB"))
    return problems


def check_labels(validation: Dataset, known: Sequence[str]) -> list[Problem]:
    """Validation labels must all be labels the model is trained on."""
    known_set = set(known)
    problems = []
    for r in validation.records:
        for i, name in enumerate(r.label_names()):
            if name not in known_set:
                where = "label" if isinstance(r.label, str) else f"label[{i}]"
                problems.append(Problem(r.source, r.line, where,
                                        f"{name!r} is not a label of the training data ({', '.join(sorted(known_set))})"))
    return problems


def check_training_set(train: Dataset, validation: Dataset | None) -> None:
    """All checks before any training starts; raises DataError listing every problem."""
    problems = list(train.problems)
    if validation is not None:
        problems += validation.problems
    if not problems:
        total = len(train.records)
        if total < MIN_TRAINING_IMAGES:
            problems.append(Problem(train.source, None, "",
                                    f"{total} image(s); at least {MIN_TRAINING_IMAGES} are needed to train"))
        labels = train.labels()
        if len(labels) < 2 and isinstance(train.records[0].label, str):
            problems.append(Problem(train.source, None, "label",
                                    f"only one class ({', '.join(labels)}); classification needs at least 2"))
        if validation is not None:
            problems += check_labels(validation, labels)
    problems += check_images(train.records)  # the lines that were read, even when others were not
    if validation is not None:
        problems += check_images(validation.records)
    if problems:
        raise DataError(problems, "the training data")
