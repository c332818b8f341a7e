"""The images a batch-scoring run reads: a folder (recursive), a JSONL file or an MLTable folder; and
how one listed image is read (`read_image`, in Ray Data's read tasks)."""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.data.formats import MB, image_files
from models.errors import ErrorCode

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
    from models.data.records import LabelError
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
            try:  # a cloud URL whose path climbs out of the image root is refused
                items.append(Item(url.strip(), resolve_image_url(url, path.parent, image_root)))
            except LabelError as exc:
                problems.append(Problem(path.name, lineno, exc.field, str(exc)))
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


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: str, mode: int) -> tuple[str, str, bytes]:
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return ErrorCode.UNREADABLE.value, f"cannot read {path}: it is {kind}, not an image file", b""


def _too_large(path: str, size: str, max_bytes: int) -> tuple[str, str, bytes]:
    limit = f"{max_bytes // MB} MB" if max_bytes % MB == 0 else f"{max_bytes} bytes"
    return ErrorCode.TOO_LARGE.value, f"{path} is {size}; at most {limit} per image is allowed in batch scoring", b""


def read_image(path: str, max_bytes: int | None) -> tuple[str, str, bytes]:
    """("", "", the bytes) of one listed image, or (error code, message naming the file, b""); never raises.
    Only a regular file is opened, and only once its size is known to be within `max_bytes`: opening a
    FIFO would block, reading `/dev/zero` or a 50 GB file would never end or would exhaust memory."""
    try:
        info = os.stat(path)  # follows links: a link to /dev/zero is a character device
        if not stat.S_ISREG(info.st_mode):
            return _not_regular(path, info.st_mode)
        if max_bytes is not None and info.st_size > max_bytes:
            return _too_large(path, f"{info.st_size / MB:.1f} MB ({info.st_size} bytes)", max_bytes)
        # O_NONBLOCK: had it been replaced by a FIFO since the stat, the open returns instead of waiting
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                return _not_regular(path, info.st_mode)
            raw = f.read() if max_bytes is None else f.read(max_bytes + 1)  # one byte more: a file that grew
    except FileNotFoundError:
        return ErrorCode.MISSING.value, f"file not found: {path}", b""
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        return ErrorCode.UNREADABLE.value, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", b""
    if max_bytes is not None and len(raw) > max_bytes:
        return _too_large(path, "over the limit (it grew while being read)", max_bytes)
    return "", "", raw
