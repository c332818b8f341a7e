"""Resumable output of batch scoring: part files written atomically, an index of finished images,
and the manifests that tie `<output>.parts/` and a finished output to one model and its settings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from serving.batch.files import atomic_file, atomic_write, fsync_dir
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
            atomic_write(self.folder / f"part-{self.run}-{self.count:06d}.jsonl", lines)
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
        try:
            with atomic_file(output, "wb") as out:
                for number, offset, length in zip(self.file_of, self.offset, self.length):
                    handles[number] = handles.pop(number, None) or open(self.files[number], "rb")
                    if len(handles) > 64:  # parts are mostly read in order: few need to stay open
                        handles.popitem(last=False)[1].close()
                    handles[number].seek(offset)
                    out.write(handles[number].read(length))
        finally:
            for handle in handles.values():
                handle.close()


def fingerprint(folder: Any) -> dict[str, Any]:
    """What makes results of two runs interchangeable: the model files and the effective settings (of a
    serving.loading.ModelFolder, opened with the run's --set overrides)."""
    from models.export import SETTINGS_FILE, WEIGHTS_FILE
    from models.tasks.fields import as_dict

    digest = hashlib.sha256()
    for path in (folder.artifacts / SETTINGS_FILE, folder.artifacts / WEIGHTS_FILE):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    settings = as_dict(folder.model_settings.settings, inference_only=True)
    fields = {"model": str(folder.path), "model_sha256": digest.hexdigest(), "batch_size": settings.pop("batch_size"),
              "settings": settings}
    return json.loads(json.dumps(fields))  # as a manifest reads back (lists, not tuples), so they compare


def differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between the fingerprint results were made with and this run's, in words."""
    found = []
    if previous.get("model_sha256") != current["model_sha256"]:
        found.append(f"the model: sha256 {previous.get('model_sha256')} (from {previous.get('model')}), "
                     f"this run's {current['model_sha256']} (from {current['model']})")
    old, new = previous.get("settings") or {}, current["settings"]
    show = lambda values, name: json.dumps(values[name]) if name in values else "not set"  # noqa: E731
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new or old[name] != new[name]:
            found.append(f"setting {name}: {show(old, name)} then, {show(new, name)} in this run")
    return found


def _refuse(what: Path, holds: str, found: Sequence[str]) -> ValueError:
    lines = "".join(f"\n  - {line}" for line in found)
    return ValueError(f"{what} holds results of {holds}:{lines}\n"
                      "pass --overwrite to re-score with this run's model and settings, or choose another --output")


def open_parts(parts: Path, settings: dict[str, Any]) -> list[Path]:
    """Create `<output>.parts/` or check it holds results of the same model and settings; its parts."""
    manifest = parts / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if found := differences(previous, settings):
            raise _refuse(parts, "another model or other settings", found)
    else:
        parts.mkdir(parents=True, exist_ok=True)
        fsync_dir(parts.parent)
        atomic_write(manifest, [json.dumps(settings)])
    for stale in parts.glob(".*.tmp"):  # a killed run's unfinished part
        stale.unlink(missing_ok=True)
    return sorted(parts.glob("part-*.jsonl"))


def output_manifest(output: Path) -> Path:
    """`<output>.manifest.json`: the model and settings a finished output was scored with."""
    return output.with_name(output.name + ".manifest.json")


def check_finished(output: Path, settings: dict[str, Any]) -> None:
    """Refuse a finished output unless its manifest says this run's model and settings made it."""
    manifest = output_manifest(output)
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _refuse(output, "an unknown model and settings",
                      [f"{manifest.name}, which names them, is missing"]) from None
    except (OSError, ValueError) as exc:
        raise _refuse(output, "an unknown model and settings", [f"{manifest} cannot be read ({exc})"]) from None
    if not isinstance(previous, dict) or (found := differences(previous, settings)):
        raise _refuse(output, "another model or other settings", found if isinstance(previous, dict)
                      else [f"{manifest} is not a JSON object"])


def finish(parts: Path, output: Path, index: Index, settings: dict[str, Any]) -> None:
    """Assemble the output, record its manifest, and drop the parts. A crash anywhere in between leaves
    the parts folder (with its own manifest), so the next run assembles again."""
    manifest = output_manifest(output)
    manifest.unlink(missing_ok=True)  # never a manifest beside an output another run made
    index.assemble(output)
    atomic_write(manifest, [json.dumps({**settings, "images": len(index.position), "errors": index.errors})])
    shutil.rmtree(parts, ignore_errors=True)
