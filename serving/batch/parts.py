"""Resumable output of batch scoring: part files written atomically, an index of finished images,
and the manifest that ties `<output>.parts/` to one model and its settings."""

from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from models.errors import SettingsError
from serving.batch.inputs import Item

PART_SIZE = 256
MANIFEST = "manifest.json"
_PREFIX = '{"image": '  # every line starts so: its key is read without parsing the response
_ERROR_MARK = ', "error": '


def _key_of(line: str) -> tuple[str, bool] | None:
    """The `image` key of an output line and whether it is an error line; None if malformed."""
    try:
        key, end = json.JSONDecoder().raw_decode(line, len(_PREFIX)) if line.startswith(_PREFIX) else (None, 0)
    except json.JSONDecodeError:
        return None
    return (key, line.startswith(_ERROR_MARK, end)) if isinstance(key, str) else None


def _atomic_write(path: Path, lines: Sequence[str]) -> None:
    """Write lines to a temp name, fsync, rename: a reader (or a resume) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PartWriter:
    """Buffers (index, line) results and writes them `size` at a time as part files, sorted."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size, self.count, self.buffer = folder, size, 0, []
        self.run = f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"

    def add(self, idx: int, line: str) -> None:
        self.buffer.append((idx, line))
        if len(self.buffer) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.count += 1
            lines = [line for _, line in sorted(self.buffer)]
            _atomic_write(self.folder / f"part-{self.run}-{self.count:06d}.jsonl", lines)
            self.buffer = []


class Index:
    """Where each input image's finished line is: file number, byte offset, length (-1: none yet)."""

    def __init__(self, items: Sequence[Item]) -> None:
        self.position = {item.key: i for i, item in enumerate(items)}
        self.files: list[Path] = []
        self.file_of, self.offset = array("i", [-1]) * len(items), array("q", [0]) * len(items)
        self.length = array("q", [0]) * len(items)
        self.errors = 0

    def scan(self, path: Path) -> int:
        """Record the lines of a finished file (a key's first line wins); returns how many were new."""
        number, new, offset = len(self.files), 0, 0
        self.files.append(path)
        with open(path, "rb") as f:
            for raw in f:
                found = _key_of(raw.decode("utf-8", errors="replace"))
                i = self.position.get(found[0], -1) if found and raw.endswith(b"\n") else -1
                if i >= 0 and self.file_of[i] < 0:
                    self.file_of[i], self.offset[i], self.length[i] = number, offset, len(raw)
                    self.errors, new = self.errors + found[1], new + 1
                offset += len(raw)
        return new

    def missing(self) -> list[int]:
        return [i for i, number in enumerate(self.file_of) if number < 0]

    def assemble(self, output: Path) -> None:
        """Copy every image's line in input order into `output` (a temp name, then an atomic rename)."""
        handles: OrderedDict[int, BinaryIO] = OrderedDict()
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                for number, offset, length in zip(self.file_of, self.offset, self.length):
                    handles[number] = handles.pop(number, None) or open(self.files[number], "rb")
                    if len(handles) > 64:  # parts are mostly read in order: few need to stay open
                        handles.popitem(last=False)[1].close()
                    handles[number].seek(offset)
                    out.write(handles[number].read(length))
                out.flush()
                os.fsync(out.fileno())
        finally:
            for handle in handles.values():
                handle.close()
        os.replace(tmp, output)


def fingerprint(model_dir: Path, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """What makes results of two runs interchangeable: the model files and the effective settings."""
    from models.export import read_settings
    from models.tasks.fields import as_dict
    from serving.loading import find_artifacts

    settings_path, weights_path = find_artifacts(model_dir)
    try:
        spec = read_settings(settings_path, dict(params or {}))
    except SettingsError as exc:
        if not params:
            raise
        read_settings(settings_path)  # settings.json itself is valid: the problem is an override
        raise SettingsError(exc.problems, "--set inference settings") from None
    digest = hashlib.sha256()
    for path in (settings_path, weights_path):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    settings = as_dict(spec.settings, inference_only=True)
    return {"model": str(model_dir), "model_sha256": digest.hexdigest(), "batch_size": settings.pop("batch_size"),
            "settings": settings}


def open_parts(parts: Path, settings: dict[str, Any]) -> list[Path]:
    """Create `<output>.parts/` or check it holds results of the same model and settings; its parts."""
    manifest = parts / MANIFEST
    same = ("model_sha256", "settings")
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if any(previous.get(k) != settings[k] for k in same):
            raise ValueError(f"{parts} holds results of another model or other settings ({previous.get('model')}, "
                             f"{previous.get('settings')}); pass --overwrite to start again")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        _atomic_write(manifest, [json.dumps(settings)])
    for stale in parts.glob(".*.tmp"):  # a killed run's unfinished part
        stale.unlink(missing_ok=True)
    return sorted(parts.glob("part-*.jsonl"))
