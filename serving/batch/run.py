"""Batch scoring on Ray Data: a folder, JSONL file or MLTable of images → predictions.jsonl.

Ray Data reads the image bytes in parallel tasks and scores them in an actor pool (one
`Predictor` per actor, on a GPU when asked). The driver streams the results into part files
under `<output>.parts/` (each written to a temp name, then renamed), so a killed run resumes
where it stopped; at the end the parts are assembled into the output in input order, and
`<output>.manifest.json` records the model and settings that made it. A run holds a lock on its
output from start to end, so a second run on the same output is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy
from tqdm import tqdm

from models.data.formats import BATCH_LIMITS
from models.errors import ImageError, SettingsError
from models.runtime import ensure_ray
from serving.backends import ScoringPlan
from serving.batch.files import OutputLock, remove_temps
from serving.batch.inputs import Item, list_inputs, read_image, say
from serving.batch.parts import (
    PART_SIZE,
    Index,
    PartWriter,
    check_finished,
    fingerprint,
    finish,
    open_parts,
    output_manifest,
)
from serving.loading import ModelFolder
from serving.predictor import Predictor
from serving.scoring import Scoring

_READ_TASK_CPUS = 0.25
_ACTOR_CPUS = 0.5


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


def _read_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read each `path`'s bytes (regular files of at most the batch limit, 20 MB); a missing, unreadable
    or too large file gets an error code and message instead, and becomes its own error line."""
    data, codes, messages = [], [], []
    for path in batch.pop("path"):
        code, message, raw = read_image(str(path), BATCH_LIMITS.max_bytes)
        data.append(raw)
        codes.append(code)
        messages.append(message)
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {**batch, "data": column(data), "code": column(codes), "message": column(messages)}


class Scorer:
    """A Ray actor holding one model's scoring core: a batch of bytes → one JSON line per image."""

    def __init__(self, model: str, local: str, overrides: dict[str, Any] | None, plan: dict[str, Any],
                 threads: int | None) -> None:
        if threads:
            torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        folder = ModelFolder.open(local if (Path(local) / "MLmodel").is_file() else model, overrides)  # another node
        self.scoring = Scoring(Predictor.load(folder, plan=ScoringPlan(**plan), limits=BATCH_LIMITS))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One line per image; an image that cannot be scored gets an error line naming its input position
        (the Predictor scores a failing batch again image by image, so a bad image costs only itself)."""
        items = [ImageError(str(code), str(message)) if code else bytes(data)
                 for data, code, message in zip(batch["data"], batch["code"], batch["message"])]
        request = self.scoring.read_images(items, fields=[str(key) for key in batch["image"]])
        responses = self.scoring.answer_now(request, rows=[int(i) for i in batch["idx"]])
        lines = [json.dumps({"image": str(key), **response}) for key, response in zip(batch["image"], responses)]
        return {"idx": batch["idx"], "line": np.array(lines, dtype=object)}


def _resources(concurrency: int | None, gpus: float) -> tuple[int, int | None]:
    """Actors (default: one per GPU share, else one per 4 CPUs) and torch threads per CPU actor."""
    cluster = ray.cluster_resources()
    if gpus > 0:
        if cluster.get("GPU", 0) < gpus:
            raise ValueError(f"--gpus-per-actor {gpus}: the Ray cluster has {cluster.get('GPU', 0):g} GPUs")
        return concurrency or max(1, int(cluster["GPU"] / gpus)), None
    cpus = int(cluster.get("CPU", 1))
    actors = concurrency or max(1, cpus // 4)
    return actors, max(1, cpus // actors)


def _results(items: Sequence[Item], pending: Sequence[int], model: tuple[str, Path], overrides: dict | None,
             batch_size: int, concurrency: int | None, gpus: float, plan: ScoringPlan) -> Iterator[tuple[int, str]]:
    """(input index, output line) of each pending image, streamed as Ray Data produces them."""
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
                                                   "plan": plan.as_dict(), "threads": threads})
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield from zip((int(i) for i in batch["idx"]), (str(line) for line in batch["line"]))
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


def _open(model: str | Path, params: Mapping[str, Any] | None) -> ModelFolder:
    """The model folder with the run's --set values applied; a SettingsError that says which is wrong."""
    try:
        return ModelFolder.open(model, dict(params or {}))
    except SettingsError as exc:
        if not params:
            raise
        ModelFolder.open(model)  # settings.json itself is valid: the problem is an override
        raise SettingsError(exc.problems, "--set inference settings") from None


def _summary(output: Path, index: Index, scored: int, skipped: int, start: float) -> ScoreSummary:
    seconds = time.monotonic() - start
    return ScoreSummary(output, len(index.position), index.errors, scored, skipped, round(seconds, 3),
                        round(scored / seconds, 2) if seconds > 0 else 0.0)


def score(model: str | Path, input: str | Path, output: str | Path, *, batch_size: int | None = None,
          concurrency: int | None = None, num_gpus_per_actor: float = 0.0, params: Mapping[str, Any] | None = None,
          image_root: str | Path | None = None, progress: bool = True, overwrite: bool = False,
          part_size: int = PART_SIZE, address: str | None = None, num_cpus: float | None = None,
          backend: str = "auto") -> ScoreSummary:
    """Score every image of `input` into `output` (JSONL, input order), resuming an interrupted run.
    A finished output of another model or other settings is refused (`overwrite` re-scores it)."""
    start = time.monotonic()
    bad = [f"{name}={value}: must be at least 1" for name, value in
           (("batch_size", batch_size), ("concurrency", concurrency), ("part_size", part_size))
           if value is not None and value < 1]
    if bad or num_gpus_per_actor < 0:
        raise SettingsError(bad + ([f"num_gpus_per_actor={num_gpus_per_actor}: must be >= 0"]
                                   if num_gpus_per_actor < 0 else []), "scoring options")
    folder = _open(model, params)  # an unknown or invalid --set fails here, before Ray starts
    scoring = folder.plan(backend, "cuda" if num_gpus_per_actor > 0 else "cpu")  # and a backend that cannot score it
    settings = fingerprint(folder)
    items = list_inputs(input, image_root)
    output, index = Path(output), Index(items)
    parts = output.with_name(output.name + ".parts")
    output.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(output):  # a second run on this output is refused until this one ends
        remove_temps(output.parent, [output.name, output_manifest(output).name])  # a killed run's
        if overwrite:
            shutil.rmtree(parts, ignore_errors=True)
        elif output.exists() and not parts.exists():
            check_finished(output, settings)  # another model's or other settings' results are never kept
            if index.scan(output) < len(items):
                raise ValueError(f"{output} exists and lacks {len(index.missing())} of the {len(items)} input "
                                 "images; pass --overwrite to re-score, or choose another --output")
            say(f"{output} already has all {len(items)} images: nothing to do (--overwrite re-scores)")
            return _summary(output, index, 0, len(items), start)
        skipped = sum(index.scan(part) for part in open_parts(parts, settings))
        pending = index.missing()
        if skipped:
            say(f"resuming: {skipped} of {len(items)} images already scored in {parts}, skipping them")
        if pending:
            ensure_ray(address, num_cpus)
            writer = PartWriter(parts, part_size)
            with tqdm(total=len(items), initial=skipped, unit="img", file=sys.stderr, disable=not progress,
                      desc="scoring") as bar:
                for idx, line in _results(items, pending, (str(model), folder.path), dict(params or {}) or None,
                                          batch_size or max(32, settings["batch_size"]), concurrency,
                                          num_gpus_per_actor, scoring):
                    writer.add(idx, line)
                    bar.update(1)
            writer.flush()
            for part in sorted(parts.glob(f"part-{writer.run}-*.jsonl")):
                index.scan(part)
        if index.missing():
            raise RuntimeError(f"{len(index.missing())} images got no result; run again to score them")
        finish(parts, output, index, settings)
    summary = _summary(output, index, len(pending), skipped, start)
    say(str(summary))
    return summary
