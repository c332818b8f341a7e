"""Deterministic synthetic datasets (coloured shapes on textured backgrounds) in the JSONL format.

Every shape is drawn as a polygon with integer pixel vertices, so the polygon written to the JSONL
is exactly the drawn region (as PIL rasterises it) and each box is the exact bounding box of its
polygon: ``topX = min(x) / width``, ``bottomX = max(x) / width`` (likewise for y).
Shapes in one image never overlap (their boxes are at least 2 px apart), so every polygon is fully
visible. Labels are the shape names; colours are random and independent of the label.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from models.data.records import check_task_name

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
DEFAULT_IMAGE_SIZE: tuple[int, int] = (160, 120)
SMALL_OBJECTS_IMAGE_SIZE: tuple[int, int] = (1600, 1200)
SMALL_OBJECT_PIXELS: tuple[int, int] = (10, 30)
MIN_IMAGE_SIDE = 50
CIRCLE_VERTICES = 32
PROGRESS_THRESHOLD = 200
_GAP = 2  # minimum distance in pixels between the boxes of two shapes in one image
_ROTATES = {"circle": False, "square": True, "triangle": True, "star": True}
_BACKGROUNDS = ("noise", "gradient", "stripes")

Box = tuple[int, int, int, int]


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


@dataclass(frozen=True)
class DrawnShape:
    """One drawn shape: its label, integer pixel polygon and fill colour."""

    label: str
    polygon: tuple[tuple[int, int], ...]
    color: tuple[int, int, int]

    @property
    def box(self) -> Box:
        """Exact pixel bounds of the polygon: (xmin, ymin, xmax, ymax)."""
        xs = [p[0] for p in self.polygon]
        ys = [p[1] for p in self.polygon]
        return min(xs), min(ys), max(xs), max(ys)

    def flat_polygon(self) -> list[int]:
        """The polygon as [x1, y1, x2, y2, ...] in pixels."""
        return [c for point in self.polygon for c in point]


# ---------------------------------------------------------------- geometry


def _unit_polygon(name: str) -> np.ndarray:
    """Vertices (N, 2) of a shape with circumradius 1, centred at the origin, pointing up."""
    if name == "circle":
        angles = np.arange(CIRCLE_VERTICES) * (2 * math.pi / CIRCLE_VERTICES)
        radii = np.ones(CIRCLE_VERTICES)
    elif name == "square":
        angles = np.arange(4) * (math.pi / 2) + math.pi / 4
        radii = np.ones(4)
    elif name == "triangle":
        angles = np.arange(3) * (2 * math.pi / 3) - math.pi / 2
        radii = np.ones(3)
    elif name == "star":
        angles = np.arange(10) * (math.pi / 5) - math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    else:
        raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(_ROTATES)}")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _relative_polygon(name: str, size: float, rotation: float) -> np.ndarray:
    """Shape vertices rotated by `rotation` radians, scaled so max(w, h) == size, box centred on the origin."""
    pts = _unit_polygon(name)
    c, s = math.cos(rotation), math.sin(rotation)
    pts = pts @ np.array([[c, s], [-s, c]])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - (lo + hi) / 2) * (size / float((hi - lo).max()))


def _to_pixels(rel: np.ndarray, cx: float, cy: float, width: int, height: int) -> tuple[tuple[int, int], ...]:
    """Translate, round to integer pixels, clip to the image and drop repeated vertices."""
    pts = np.rint(rel + np.array([cx, cy]))
    pts[:, 0] = np.clip(pts[:, 0], 0, width - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, height - 1)
    out: list[tuple[int, int]] = []
    for x, y in pts.astype(int).tolist():
        if not out or out[-1] != (x, y):
            out.append((x, y))
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return tuple(out)


def shape_polygon(
    name: str, centre: tuple[float, float], size: float, width: int, height: int, rotation: float = 0.0
) -> tuple[tuple[int, int], ...]:
    """Integer pixel polygon of a shape whose box is centred on `centre` with larger side ~`size` px."""
    return _to_pixels(_relative_polygon(name, size, rotation), centre[0], centre[1], width, height)


def _boxes_clash(a: Box, b: Box, gap: int = _GAP) -> bool:
    """True when the boxes overlap or are closer than `gap` pixels."""
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


# ---------------------------------------------------------------- colours and backgrounds


def _background(
    width: int, height: int, rng: np.random.Generator, style: Literal["textured", "plain"]
) -> tuple[Image.Image, np.ndarray]:
    """A low-contrast background (smooth noise, gradient or stripes) and its base colour."""
    base = rng.uniform(40, 215, size=3)
    if style == "plain":
        return Image.new("RGB", (width, height), tuple(int(v) for v in base)), base
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    amplitude = rng.uniform(10, 30, size=3)
    if kind == "noise":
        grid = rng.uniform(-1, 1, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
        small = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8), "RGB")
        pattern = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
    else:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(0, math.pi)
        proj = xx * math.cos(angle) + yy * math.sin(angle)
        if kind == "gradient":
            proj = proj - proj.min()
            wave = 2 * proj / max(float(proj.max()), 1.0) - 1
        else:
            period = rng.uniform(8, 40) * max(width, height) / 160
            wave = np.sin(proj * (2 * math.pi / period))
        pattern = np.repeat(wave[:, :, None], 3, axis=2) * rng.choice([-1.0, 1.0], size=3)
        pattern += rng.normal(0, 0.15, size=pattern.shape)
    pixels = np.clip(base + amplitude * pattern, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), base


def _contrasting_color(rng: np.random.Generator, base: np.ndarray, min_distance: float = 110.0) -> tuple[int, int, int]:
    """A random colour at least `min_distance` (RGB Euclidean) away from the background's base colour."""
    best = rng.integers(0, 256, size=3)
    for _ in range(200):
        if float(np.linalg.norm(best - base)) >= min_distance:
            break
        best = rng.integers(0, 256, size=3)
    else:
        best = np.where(base > 127, 0, 255)
    return int(best[0]), int(best[1]), int(best[2])


# ---------------------------------------------------------------- drawing


def _place_shapes(
    kinds: Sequence[str],
    size_range: tuple[float, float],
    width: int,
    height: int,
    rng: np.random.Generator,
    base: np.ndarray,
) -> list[DrawnShape]:
    """Place shapes at random without overlap; a shape that cannot be placed is shrunk, then dropped."""
    placed: list[DrawnShape] = []
    for kind in kinds:
        size = float(rng.uniform(*size_range))
        for attempt in range(120):
            if attempt and attempt % 30 == 0:
                size = max(size * 0.8, 4.0)
            rotation = float(rng.uniform(0, 2 * math.pi)) if _ROTATES[kind] else 0.0
            rel = _relative_polygon(kind, size, rotation)
            lo, hi = rel.min(axis=0), rel.max(axis=0)
            if hi[0] - lo[0] > width - 1 or hi[1] - lo[1] > height - 1:
                size *= 0.8
                continue
            cx = float(rng.uniform(-lo[0], width - 1 - hi[0]))
            cy = float(rng.uniform(-lo[1], height - 1 - hi[1]))
            shape = DrawnShape(kind, _to_pixels(rel, cx, cy, width, height), (0, 0, 0))
            if len(shape.polygon) >= 3 and not any(_boxes_clash(shape.box, p.box) for p in placed):
                placed.append(DrawnShape(kind, shape.polygon, _contrasting_color(rng, base)))
                break
    return placed


def _draw(image: Image.Image, shapes: Sequence[DrawnShape]) -> None:
    """Fill each shape's polygon with its colour (no outline, no antialiasing)."""
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw.polygon(list(shape.polygon), fill=shape.color)


def render_shape_image(
    width: int,
    height: int,
    shapes: Sequence[tuple[str, tuple[float, float], float]],
    *,
    seed: int = 0,
    background: Literal["textured", "plain"] = "textured",
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw known shapes `(name, (cx, cy) box centre in px, max box side in px)`; no rotation; later on top.

    Returns the RGB image and, per shape, ``{"label", "polygon": [x1, y1, ...] (int px),
    "box": (xmin, ymin, xmax, ymax) (int px, exact polygon bounds), "color": (r, g, b)}``.
    The background depends only on (width, height, seed, background).
    """
    rng = np.random.default_rng(seed)
    image, base = _background(width, height, rng, background)
    drawn = [
        DrawnShape(name, shape_polygon(name, centre, size, width, height), _contrasting_color(rng, base))
        for name, centre, size in shapes
    ]
    _draw(image, drawn)
    objects = [{"label": s.label, "polygon": s.flat_polygon(), "box": s.box, "color": s.color} for s in drawn]
    return image, objects


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
    unknown = [s for s in shapes if s not in _ROTATES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known shapes: {', '.join(_ROTATES)}")
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
        image, base = _background(width, height, image_rng, background)
        drawn = _place_shapes(plans[i], size_range, width, height, image_rng, base)
        _draw(image, drawn)
        name = f"{i:06d}.{ext}"
        _write_image(images_dir / name, image, fmt)
        used.update(s.label for s in drawn)
        lines.append(_jsonl_line(f"images/{name}", fmt, width, height, _label(task, drawn, width, height)))
    train_jsonl, validation_jsonl = out / "train.jsonl", out / "validation.jsonl"
    train_jsonl.write_text("".join(line + "\n" for line in lines[:n_train]), encoding="utf-8")
    validation_jsonl.write_text("".join(line + "\n" for line in lines[n_train:]), encoding="utf-8")
    labels = sorted(used)
    return SynthSummary(task, train_jsonl, validation_jsonl, images_dir, labels, n_train, n_val)
