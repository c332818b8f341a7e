"""Coloured shapes on low-contrast backgrounds: the drawing under the synthetic datasets (`synth`).

Every shape is drawn as a polygon with integer pixel vertices, so its polygon is exactly the drawn
region (as PIL rasterises it) and its box the exact bounding box of the polygon. Shapes placed in one
image never overlap (their boxes are at least 2 px apart).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

CIRCLE_VERTICES = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
_GAP = 2  # minimum distance in pixels between the boxes of two shapes in one image
_ROTATES = {"circle": False, "square": True, "triangle": True, "star": True}
_BACKGROUNDS = ("noise", "gradient", "stripes")

Box = tuple[int, int, int, int]


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


def draw_background(
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


def place_shapes(
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


def draw(image: Image.Image, shapes: Sequence[DrawnShape]) -> None:
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
    image, base = draw_background(width, height, rng, background)
    drawn = [
        DrawnShape(name, shape_polygon(name, centre, size, width, height), _contrasting_color(rng, base))
        for name, centre, size in shapes
    ]
    draw(image, drawn)
    objects = [{"label": s.label, "polygon": s.flat_polygon(), "box": s.box, "color": s.color} for s in drawn]
    return image, objects
