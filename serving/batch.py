"""Batch scoring on Ray Data: a folder, JSONL file or MLTable of images → predictions.jsonl.

Ray Data reads the image bytes in parallel tasks and scores them in an actor pool (one
`Predictor` per actor, on a GPU when asked). The driver streams the results into part files
under `<output>.parts/` (each written to a temp name, then renamed), so a killed run resumes
where it stopped; at the end the parts are assembled into the output in input order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from models.params import SettingsError, as_dict
from serving.runtime import ensure_ray, resolve_model

if TYPE_CHECKING:  # torch and the model code load where used, so Ray's read tasks start without them
    from models.data import Problem

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jfif", ".jpe"})
PART_SIZE = 256
MANIFEST = "manifest.json"
_PREFIX = '{"image": '  # every line starts so: its key is read without parsing the response
_ERROR_MARK = ', "error": '
_READ_TASK_CPUS = 0.25
_ACTOR_CPUS = 0.5
USER_ERRORS = (SettingsError, ValueError, FileNotFoundError)  # DataError is a ValueError


@dataclass(frozen=True)
class Item:
    """One input image: `key` as listed (the output's `image`) and the local `path` to read."""

    key: str
    path: str


@dataclass
class ScoreSummary:
    """A run: output lines (= input images), error lines, scored now, already done, wall time."""

    output: Path
    images: int
    errors: int
    scored: int
    skipped: int
    seconds: float
    images_per_s: float

    def __str__(self) -> str:
        return (f"{self.images} images ({self.errors} errors) in {self.output}; scored {self.scored} in "
                f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s), {self.skipped} already done")


def _say(message: str) -> None:
    """A status line on stderr (stdout stays free for the caller)."""
    print(message, file=sys.stderr, flush=True)



def _folder_items(folder: Path) -> list[Item]:
    """Image files under `folder`, recursively, sorted by relative path."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return [Item(str(p), str(p)) for p in sorted(files, key=lambda p: p.relative_to(folder).as_posix())]


def _jsonl_items(path: Path, image_root: Path | None, problems: list[Problem]) -> list[Item]:
    """The `image_url` of each line (scoring needs no labels)."""
    from models.data import Problem, resolve_image_url

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
    from models.data import DataError, Problem, _mltable_files

    path, root = Path(source), Path(image_root) if image_root is not None else None
    problems: list[Problem] = []
    if path.is_dir() and not (path / "MLTable").is_file():
        items = _folder_items(path)
    elif path.is_dir() or path.name == "MLTable":
        files = _mltable_files(path)[0]
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
        _say(f"{len(items) - len(first)} repeated image entries in {source}: each image is scored once")
    if not first:
        raise DataError([Problem(str(source), None, "", "no images found")], "scoring input")
    return list(first.values())



def _read_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read each `path`'s bytes; a missing or unreadable file gets an error code instead."""
    data, codes, messages = [], [], []
    for path in batch.pop("path"):
        code, message, raw = "", "", b""
        try:
            raw = Path(str(path)).read_bytes()
        except FileNotFoundError:
            code, message = "missing", f"file not found: {path}"
        except OSError as exc:
            code, message = "unreadable", f"cannot read {path}: {exc.strerror or exc}"
        data.append(raw)
        codes.append(code)
        messages.append(message)
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {**batch, "data": column(data), "code": column(codes), "message": column(messages)}


def _with_row(response: dict, row: int) -> dict:
    """An error response renumbered with the image's input position instead of its batch row."""
    if "error" not in response:
        return response
    error = dict(response["error"])
    message = str(error.get("message", "")).removeprefix(f"image {error.get('row')}: ")
    return {"error": {**error, "row": row, "message": f"image {row}: {message}"}}


class Scorer:
    """A Ray actor holding one `Predictor`: a batch of bytes → one JSON line per image."""

    def __init__(self, model: str, local: str, overrides: dict[str, Any] | None, device: str,
                 threads: int | None) -> None:
        import torch

        from serving.inference import Predictor

        if threads:
            torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        folder = Path(local) if (Path(local) / "MLmodel").is_file() else resolve_model(model)  # another node
        self.predictor = Predictor.load(folder, overrides=overrides, device=torch.device(device))

    def _predict(self, items: list[bytes | Exception]) -> list[dict]:
        """Responses for a batch; if it fails unexpectedly, image by image, so a bad image costs only itself."""
        try:
            return self.predictor.predict_bytes(items)
        except Exception as exc:  # noqa: BLE001 - an exception here would fail the whole run
            if len(items) > 1:
                return [self._predict([item])[0] for item in items]
            return [{"error": {"row": 0, "code": "inference_failed", "message": f"image 0: {exc}"}}]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from models.images import ImageError

        items = [ImageError(str(code), str(message)) if code else bytes(data)
                 for data, code, message in zip(batch["data"], batch["code"], batch["message"])]
        lines = [json.dumps({"image": str(key), **_with_row(response, int(idx))})
                 for key, idx, response in zip(batch["image"], batch["idx"], self._predict(items))]
        return {"idx": batch["idx"], "line": np.array(lines, dtype=object)}


def _resources(concurrency: int | None, gpus: float) -> tuple[int, int | None]:
    """Actors (default: one per GPU share, else one per 4 CPUs) and torch threads per CPU actor."""
    import ray

    cluster = ray.cluster_resources()
    if gpus > 0:
        if cluster.get("GPU", 0) < gpus:
            raise ValueError(f"--gpus-per-actor {gpus}: the Ray cluster has {cluster.get('GPU', 0):g} GPUs")
        return concurrency or max(1, int(cluster["GPU"] / gpus)), None
    cpus = int(cluster.get("CPU", 1))
    actors = concurrency or max(1, cpus // 4)
    return actors, max(1, cpus // actors)


def _results(items: Sequence[Item], pending: Sequence[int], model: tuple[str, Path], overrides: dict | None,
             batch_size: int, concurrency: int | None, gpus: float) -> Iterator[tuple[int, str]]:
    """(input index, output line) of each pending image, streamed as Ray Data produces them."""
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    actors, threads = _resources(concurrency, gpus)
    rows = max(batch_size, -(-len(pending) // 5000))
    blocks = [pa.table({"idx": pa.array(chunk, pa.int64()), "image": [items[i].key for i in chunk],
                        "path": [items[i].path for i in chunk]})
              for chunk in (pending[s:s + rows] for s in range(0, len(pending), rows))]
    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars, context.print_on_execution_start = False, False  # our own bar instead
    try:
        ds = ray.data.from_arrow(blocks).map_batches(
            _read_batch, batch_size=batch_size, num_cpus=_READ_TASK_CPUS,
            compute=TaskPoolStrategy(size=max(1, min(2 * actors, len(blocks)))))
        ds = ds.map_batches(Scorer, batch_size=batch_size, compute=ActorPoolStrategy(size=actors),
                            num_cpus=_ACTOR_CPUS, num_gpus=gpus,
                            fn_constructor_kwargs={"model": model[0], "local": str(model[1]), "overrides": overrides,
                                                   "device": "cuda" if gpus > 0 else "cpu", "threads": threads})
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield from zip((int(i) for i in batch["idx"]), (str(line) for line in batch["line"]))
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved



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


def _fingerprint(model_dir: Path, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """What makes results of two runs interchangeable: the model files and the effective settings."""
    from models.export import read_settings
    from serving.inference import find_artifacts

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


def _open_parts(parts: Path, fingerprint: dict[str, Any]) -> list[Path]:
    """Create `<output>.parts/` or check it holds results of the same model and settings; its parts."""
    manifest = parts / MANIFEST
    same = ("model_sha256", "settings")
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if any(previous.get(k) != fingerprint[k] for k in same):
            raise ValueError(f"{parts} holds results of another model or other settings ({previous.get('model')}, "
                             f"{previous.get('settings')}); pass --overwrite to start again")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        _atomic_write(manifest, [json.dumps(fingerprint)])
    for stale in parts.glob(".*.tmp"):  # a killed run's unfinished part
        stale.unlink(missing_ok=True)
    return sorted(parts.glob("part-*.jsonl"))



def _summary(output: Path, index: Index, scored: int, skipped: int, start: float) -> ScoreSummary:
    seconds = time.monotonic() - start
    return ScoreSummary(output, len(index.position), index.errors, scored, skipped, round(seconds, 3),
                        round(scored / seconds, 2) if seconds > 0 else 0.0)


def score(model: str | Path, input: str | Path, output: str | Path, *, batch_size: int | None = None,
          concurrency: int | None = None, num_gpus_per_actor: float = 0.0, params: Mapping[str, Any] | None = None,
          image_root: str | Path | None = None, progress: bool = True, overwrite: bool = False,
          part_size: int = PART_SIZE, address: str | None = None, num_cpus: float | None = None) -> ScoreSummary:
    """Score every image of `input` into `output` (JSONL, input order), resuming an interrupted run."""
    from tqdm import tqdm

    start = time.monotonic()
    bad = [f"{name}={value}: must be at least 1" for name, value in
           (("batch_size", batch_size), ("concurrency", concurrency), ("part_size", part_size))
           if value is not None and value < 1]
    if bad or num_gpus_per_actor < 0:
        raise SettingsError(bad + ([f"num_gpus_per_actor={num_gpus_per_actor}: must be >= 0"]
                                   if num_gpus_per_actor < 0 else []), "scoring options")
    model_dir = resolve_model(model)
    fingerprint = _fingerprint(model_dir, params)  # an unknown or invalid --set fails here, before Ray starts
    items = list_inputs(input, image_root)
    output, index = Path(output), Index(items)
    parts = output.with_name(output.name + ".parts")
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
    elif output.exists() and not parts.exists():
        if index.scan(output) < len(items):
            raise ValueError(f"{output} exists and lacks {len(index.missing())} of the {len(items)} input images; "
                             "pass --overwrite to re-score, or choose another --output")
        _say(f"{output} already has all {len(items)} images: nothing to do (--overwrite re-scores)")
        return _summary(output, index, 0, len(items), start)
    skipped = sum(index.scan(part) for part in _open_parts(parts, fingerprint))
    pending = index.missing()
    if skipped:
        _say(f"resuming: {skipped} of {len(items)} images already scored in {parts}, skipping them")
    if pending:
        ensure_ray(address, num_cpus)
        writer = PartWriter(parts, part_size)
        with tqdm(total=len(items), initial=skipped, unit="img", file=sys.stderr, disable=not progress,
                  desc="scoring") as bar:
            for idx, line in _results(items, pending, (str(model), model_dir), dict(params or {}) or None,
                                      batch_size or max(32, fingerprint["batch_size"]), concurrency,
                                      num_gpus_per_actor):
                writer.add(idx, line)
                bar.update(1)
        writer.flush()
        for part in sorted(parts.glob(f"part-{writer.run}-*.jsonl")):
            index.scan(part)
    if index.missing():
        raise RuntimeError(f"{len(index.missing())} images got no result; run again to score them")
    index.assemble(output)
    shutil.rmtree(parts, ignore_errors=True)
    summary = _summary(output, index, len(pending), skipped, start)
    _say(str(summary))
    return summary



def _parse_set(pairs: Sequence[str]) -> dict[str, str]:
    """`--set name=value` flags → {name: value}."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SettingsError([f"--set {pair!r}: expected name=value"], "command line")
        out[name.strip()] = value.strip()
    return out


def _run(args: argparse.Namespace) -> int:
    """`visionserve score`: the exit code."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    score(args.model, args.input, args.output, batch_size=args.batch_size, concurrency=args.concurrency,
          num_gpus_per_actor=args.gpus_per_actor, params=_parse_set(args.set), image_root=args.image_root,
          progress=not args.no_progress, overwrite=args.overwrite, part_size=args.part_size, address=args.address,
          num_cpus=args.num_cpus)
    return 0


def add_score_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `score MODEL --input ... --output ...` on an argparse subparsers object."""
    p = subparsers.add_parser("score", help="batch-score a folder, JSONL file or MLTable of images on Ray Data")
    p.add_argument("model", help="MLflow model folder or MLflow URI (models:/name/1, runs:/...)")
    p.add_argument("--input", required=True, help="folder of images (recursive), JSONL file or MLTable folder")
    p.add_argument("--output", required=True, help="predictions JSONL: one line per image, in input order")
    p.add_argument("--batch-size", type=int, help="images per actor call (default: max(32, the model's batch_size))")
    p.add_argument("--concurrency", type=int, help="scoring actors (default: one per GPU share, else CPUs / 4)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor, e.g. 1 or 0.5 (default: CPU)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override an inference setting for this run, e.g. --set box_score_thresh=0.5")
    p.add_argument("--image-root", help="folder that cloud image URLs of a JSONL/MLTable map under")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local instance)")
    p.add_argument("--num-cpus", type=float, help="CPUs of the local Ray instance it starts (default: all)")
    p.add_argument("--part-size", type=int, default=PART_SIZE, help="images per part file (what a resume redoes)")
    p.add_argument("--overwrite", action="store_true", help="re-score even if the output or part files exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.batch score ...`: the score command on its own."""
    parser = argparse.ArgumentParser(prog="visionserve")
    add_score_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
