"""The images a batch-scoring run reads: a folder (recursive), a JSONL file or an MLTable folder."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.data.formats import image_files

if TYPE_CHECKING:  # the model code loads where used, so Ray's read tasks start without it
    from models.errors import Problem



@dataclass(frozen=True)
class Item:
    """One input image: `key` as listed (the output's `image`) and the local `path` to read."""

    key: str
    path: str


def say(message: str) -> None:
    """A status line on stderr (stdout stays free for the caller)."""
    print(message, file=sys.stderr, flush=True)


def _folder_items(folder: Path) -> list[Item]:
    """Image files under `folder`, recursively, sorted by relative path."""
    return [Item(str(p), str(p)) for p in image_files(folder)]


def _jsonl_items(path: Path, image_root: Path | None, problems: list[Problem]) -> list[Item]:
    """The `image_url` of each line (scoring needs no labels)."""
    from models.data.jsonl import resolve_image_url
    from models.errors import Problem

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), None, "", f"cannot read ({exc})"))
        return []
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            obj = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as exc:
            problems.append(Problem(path.name, lineno, "", f"not valid JSON ({exc.msg})"))
            continue
        url = obj.get("image_url") if isinstance(obj, dict) else None
        if isinstance(url, str) and url.strip():
            items.append(Item(url.strip(), resolve_image_url(url, path.parent, image_root)))
        elif obj is not None:
            problems.append(Problem(path.name, lineno, "image_url", "missing or not a string"))
    return items


def list_inputs(source: str | Path, image_root: str | Path | None = None) -> list[Item]:
    """The images of a folder (recursive), JSONL file or MLTable folder; a repeated key counts once."""
    from models.data.jsonl import mltable_files
    from models.errors import DataError, Problem

    path, root = Path(source), Path(image_root) if image_root is not None else None
    problems: list[Problem] = []
    if path.is_dir() and not (path / "MLTable").is_file():
        items = _folder_items(path)
    elif path.is_dir() or path.name == "MLTable":
        files = mltable_files(path)[0]
        if not files:
            problems.append(Problem(str(path), None, "paths", "the MLTable lists no JSONL file"))
        items = [item for file in files for item in _jsonl_items(file, root, problems)]
    elif path.is_file():
        items = _jsonl_items(path, root, problems)
    else:
        raise FileNotFoundError(f"{source}: no such folder, JSONL file or MLTable")
    if problems:
        raise DataError(problems, f"scoring input {source}")
    first: dict[str, Item] = {}
    for item in items:
        first.setdefault(item.key, item)
    if len(first) < len(items):
        say(f"{len(items) - len(first)} repeated image entries in {source}: each image is scored once")
    if not first:
        raise DataError([Problem(str(source), None, "", "no images found")], "scoring input")
    return list(first.values())
