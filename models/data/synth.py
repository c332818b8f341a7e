"""Deterministic synthetic datasets (coloured shapes on textured backgrounds) in the JSONL format.

Every shape is drawn as a polygon with integer pixel vertices, so the polygon written to the JSONL
is exactly the drawn region (as PIL rasterises it) and each box is the exact bounding box of its
polygon: ``topX = min(x) / width``, ``bottomX = max(x) / width`` (likewise for y).
Shapes in one image never overlap (their boxes are at least 2 px apart), so every polygon is fully
visible. Labels are the shape names; colours are random and independent of the label.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.data.records import check_task_name
from models.data.shapes import SHAPES, DrawnShape, draw, draw_background, place_shapes

DEFAULT_SHAPES: tuple[str, ...] = SHAPES
DEFAULT_IMAGE_SIZE: tuple[int, int] = (160, 120)
SMALL_OBJECTS_IMAGE_SIZE: tuple[int, int] = (1600, 1200)
SMALL_OBJECT_PIXELS: tuple[int, int] = (10, 30)
MIN_IMAGE_SIDE = 50
PROGRESS_THRESHOLD = 200


@dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic_dataset` wrote."""

    task: str
    train_jsonl: Path
    validation_jsonl: Path
    images_dir: Path
    labels: list[str]
    n_train: int
    n_validation: int


# ---------------------------------------------------------------- labels


def _norm(value: float, scale: int) -> float:
    """Normalise a pixel coordinate to [0, 1], rounded to 6 decimals."""
    return round(min(max(value / scale, 0.0), 1.0), 6)


def _object_label(task: str, shape: DrawnShape, width: int, height: int) -> dict[str, Any]:
    """The JSONL object for one shape (detection: box; segmentation: polygon and box)."""
    x0, y0, x1, y1 = shape.box
    box = {"topX": _norm(x0, width), "topY": _norm(y0, height),
           "bottomX": _norm(x1, width), "bottomY": _norm(y1, height)}
    if task == "image_object_detection":
        return {"label": shape.label, **box, "isCrowd": 0}
    polygon = [_norm(v, width if i % 2 == 0 else height) for i, v in enumerate(shape.flat_polygon())]
    return {"label": shape.label, "isCrowd": 0, "polygon": [polygon], **box}


def _label(task: str, shapes: Sequence[DrawnShape], width: int, height: int) -> Any:
    """The JSONL `label` value of an image for `task`."""
    if task == "image_classification":
        return shapes[0].label
    if task == "image_classification_multilabel":
        return sorted({s.label for s in shapes})
    return [_object_label(task, s, width, height) for s in shapes]


# ---------------------------------------------------------------- planning


def _validate(task: str, images: int, small_objects: bool, image_size: tuple[int, int] | None,
              validation_fraction: float, shapes: Sequence[str]) -> tuple[int, int]:
    """Check the arguments; return the image size (width, height)."""
    check_task_name(task)
    if small_objects and task not in ("image_object_detection", "image_instance_segmentation"):
        raise ValueError(f"small_objects is only for detection and segmentation, not for task {task!r}")
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if not shapes or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes must be a non-empty list of distinct names, got {list(shapes)}")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known shapes: {', '.join(SHAPES)}")
    size = image_size or (SMALL_OBJECTS_IMAGE_SIZE if small_objects else DEFAULT_IMAGE_SIZE)
    width, height = int(size[0]), int(size[1])
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}, got {width}x{height}")
    return width, height


def _split_sizes(images: int, validation_fraction: float) -> tuple[int, int]:
    """(n_train, n_validation): at least one of each when images >= 2 and the fraction is > 0."""
    if images < 2 or validation_fraction == 0:
        return images, 0
    n_val = min(max(round(images * validation_fraction), 1), images - 1)
    return images - n_val, n_val


def _primary_kinds(n: int, shapes: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Round-robin shape names for `n` images (balanced, random order), from a random start."""
    offset = int(rng.integers(len(shapes)))
    kinds = [shapes[(offset + i) % len(shapes)] for i in range(n)]
    return [kinds[i] for i in rng.permutation(n)]


def _image_kinds(
    task: str, primary: str, shapes: Sequence[str], small: bool, rng: np.random.Generator, needed: Sequence[str]
) -> list[str]:
    """The shape names to draw in one image: `primary`, then as many `needed` names as fit, then random ones."""
    if task == "image_classification":
        return [primary]
    if task == "image_classification_multilabel":
        others = [str(s) for s in rng.permutation([s for s in shapes if s != primary])]
        count = min(max(int(rng.integers(1, 4)), 1 + len(needed)), 3, len(shapes))
        extras = [s for s in needed if s != primary] + [s for s in others if s not in needed]
        return [primary] + extras[: count - 1]
    low, high = (8, 20) if small else (1, 4)
    count = min(max(int(rng.integers(low, high + 1)), 1 + len(needed)), high)
    extras = list(needed[: count - 1])
    return [primary] + extras + [str(s) for s in rng.choice(list(shapes), size=count - 1 - len(extras))]


def _plan_split(
    task: str, primaries: Sequence[str], shapes: Sequence[str], small: bool, rng: np.random.Generator
) -> list[list[str]]:
    """Shape names per image of one split; extra shapes first add labels the split would otherwise lack."""
    seen: set[str] = set()
    plans = []
    for j, primary in enumerate(primaries):
        needed = [s for s in shapes if s not in seen and s not in primaries[j:]]
        kinds = _image_kinds(task, primary, shapes, small, rng, needed)
        seen.update(kinds)
        plans.append(kinds)
    return plans


def _size_range(task: str, small: bool, width: int, height: int) -> tuple[float, float]:
    """Range of shape sizes (larger box side, px) for a task."""
    if small:
        lo, hi = SMALL_OBJECT_PIXELS
        return lo + 1.0, hi - 1.0  # rounding vertices moves the extent by at most 1 px
    side = min(width, height)
    fractions = {
        "image_classification": (0.35, 0.70),
        "image_classification_multilabel": (0.25, 0.50),
    }.get(task, (0.15, 0.45))
    return fractions[0] * side, fractions[1] * side


# ---------------------------------------------------------------- writing


def _write_image(path: Path, image: Image.Image, fmt: str) -> None:
    """Save as PNG, or JPEG at quality 90."""
    if fmt == "png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=90)


def _jsonl_line(rel_url: str, fmt: str, width: int, height: int, label: Any) -> str:
    """One JSONL line in the data.md format."""
    details = {"format": fmt, "width": f"{width}px", "height": f"{height}px"}
    return json.dumps({"image_url": rel_url, "image_details": details, "label": label})


def write_synthetic_dataset(
    task: str,
    out_dir: str | Path,
    images: int,
    *,
    small_objects: bool = False,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    validation_fraction: float = 0.2,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    background: Literal["textured", "plain"] = "textured",
) -> SynthSummary:
    """Write `out_dir/train.jsonl`, `out_dir/validation.jsonl` and `out_dir/images/NNNNNN.(png|jpg)`.

    `image_url` is relative to the JSONL files (e.g. ``images/000017.png``). Training images come
    first (indices 0..n_train-1), then validation images. Each split cycles through all labels
    for its images' first shape and uses extra shapes for labels it would otherwise lack, so each
    split holds every label whenever it can. The same arguments give byte-identical files.
    """
    width, height = _validate(task, images, small_objects, image_size, validation_fraction, shapes)
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    fmt, ext = ("jpg", "jpg") if small_objects else ("png", "png")
    rng = np.random.default_rng(seed)
    n_train, n_val = _split_sizes(images, validation_fraction)
    plans = [
        kinds
        for n in (n_train, n_val)
        for kinds in _plan_split(task, _primary_kinds(n, shapes, rng), shapes, small_objects, rng)
    ]
    size_range = _size_range(task, small_objects, width, height)
    lines: list[str] = []
    used: set[str] = set()
    indices = tqdm(range(images), desc="synth images", file=sys.stderr, disable=images <= PROGRESS_THRESHOLD)
    for i in indices:
        image_rng = np.random.default_rng([seed, i])
        image, base = draw_background(width, height, image_rng, background)
        drawn = place_shapes(plans[i], size_range, width, height, image_rng, base)
        draw(image, drawn)
        name = f"{i:06d}.{ext}"
        _write_image(images_dir / name, image, fmt)
        used.update(s.label for s in drawn)
        lines.append(_jsonl_line(f"images/{name}", fmt, width, height, _label(task, drawn, width, height)))
    train_jsonl, validation_jsonl = out / "train.jsonl", out / "validation.jsonl"
    train_jsonl.write_text("".join(line + "\n" for line in lines[:n_train]), encoding="utf-8")
    validation_jsonl.write_text("".join(line + "\n" for line in lines[n_train:]), encoding="utf-8")
    labels = sorted(used)
    return SynthSummary(task, train_jsonl, validation_jsonl, images_dir, labels, n_train, n_val)
