"""Reading labelled data: JSONL files and MLTable folders (data.md), and where each `image_url` is.

Reading never drops a line quietly: every problem becomes a `Problem` naming file, line and
field, and `DataError` reports all of them at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from models.data.locations import Refused, locate
from models.data.records import LABEL_PARSERS, Dataset, LabelError, Record
from models.errors import DataError, Problem


# ---------------------------------------------------------------- image_url resolution


def resolve_image_url(url: str, base_dir: Path, image_root: Path | None) -> str:
    """Map `image_url` to a local path (data.md): relative, absolute, file://, cloud URLs
    (`models.data.locations`). A cloud URL maps under `image_root` (else `base_dir`) and must stay inside it,
    links followed; an unknown scheme is refused; either is a `LabelError` on `image_url`."""
    try:
        return locate(url, base_dir, image_root)
    except Refused as exc:
        raise LabelError("image_url", str(exc)) from None


# ---------------------------------------------------------------- JSONL and MLTable


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


PATH_KINDS = ("file", "pattern", "folder")  # what an MLTable `paths:` entry may be


def _entry_lines(text: str) -> list[int | None]:
    """The line (1-based) of each entry under `paths:` in an MLTable's YAML text."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "paths" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _entry_files(entry: dict, base: Path) -> list[Path]:
    if "file" in entry:
        return [base / str(entry["file"]).removeprefix("file://")]
    if "pattern" in entry:
        return sorted(base.glob(str(entry["pattern"]).removeprefix("./")))
    return sorted((base / str(entry["folder"])).glob("*.jsonl"))


def read_mltable(folder: Path) -> tuple[list[Path], dict, list[Problem]]:
    """An MLTable folder (or its MLTable file) → (the JSONL files it lists, its read_json_lines options,
    the problems of the MLTable file itself, each naming the file, the line and the `paths` entry)."""
    spec_file = folder / "MLTable" if folder.is_dir() else folder
    where = str(spec_file)
    try:
        text = spec_file.read_text(encoding="utf-8-sig")
        spec = yaml.safe_load(text) or {}
    except FileNotFoundError:
        return [], {}, [Problem(where, None, "", "file not found")]
    except UnicodeDecodeError as exc:
        return [], {}, [Problem(where, None, "", f"not UTF-8 text ({exc.reason})")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        return [], {}, [Problem(where, mark.line + 1 if mark else None, "", f"not valid YAML ({reason})")]
    if not isinstance(spec, dict):
        return [], {}, [Problem(where, None, "", "expected a YAML mapping with a paths: list")]
    paths = spec.get("paths", [])
    if not isinstance(paths, list):
        return [], {}, [Problem(where, None, "paths", "must be a list of entries such as `- file: train.jsonl` "
                                                      "(or `- pattern: ...`, `- folder: ...`)")]
    base, lines = spec_file.parent, _entry_lines(text)
    files: list[Path] = []
    problems: list[Problem] = []
    for i, entry in enumerate(paths):
        line = lines[i] if i < len(lines) else None
        if isinstance(entry, dict) and any(kind in entry for kind in PATH_KINDS):
            files += _entry_files(entry, base)
        elif isinstance(entry, str):
            problems.append(Problem(where, line, f"paths[{i}]", f"{entry!r} is a plain string; an MLTable lists "
                                    f"files as mappings: write `- file: {entry}` (or `- pattern: ...`, `- folder: ...`)"))
        else:
            problems.append(Problem(where, line, f"paths[{i}]", f"{entry!r} is not a path entry; use `- file: ...`, "
                                    "`- pattern: ...` or `- folder: ...`"))
    options: dict = {}
    for step in spec.get("transformations", []) or []:
        if isinstance(step, dict) and "read_json_lines" in step:
            options = step["read_json_lines"] or {}
    return files, options, problems


def mltable_files(folder: Path) -> tuple[list[Path], dict]:
    """The JSONL files an MLTable lists and its read_json_lines options; `DataError` for a malformed MLTable."""
    files, options, problems = read_mltable(folder)
    if problems:
        raise DataError(problems, f"the MLTable {folder}")
    return files, options


def read_dataset(path: str | Path, task: str, *, image_root: str | Path | None = None) -> Dataset:
    """A JSONL file, an MLTable folder (or its MLTable file) → records and problems."""
    path = Path(path)
    if path.is_dir() or path.name == "MLTable":
        if not (path / "MLTable").exists() and path.name != "MLTable":
            return Dataset(problems=[Problem(str(path), None, "", "folder has no MLTable file")], source=str(path))
        files, options, problems = read_mltable(path)
        invalid = str(options.get("invalid_lines", "error"))
        merged = Dataset(source=str(path), problems=problems)
        if not files and not problems:
            merged.problems.append(Problem(str(path), None, "paths", "the MLTable lists no JSONL file"))
        for file in files:
            part = read_jsonl(file, task, image_root=image_root, invalid_lines=invalid)
            merged.records += part.records
            merged.problems += part.problems
            merged.warnings += part.warnings
        return merged
    return read_jsonl(path, task, image_root=image_root)
