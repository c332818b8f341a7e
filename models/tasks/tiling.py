"""Tile geometry shared by training (tiles added to the data) and tiled inference.

A grid of `cols x rows` tiles covers the image exactly; neighbouring tiles overlap by
`overlap` of a tile's side. With n tiles of side t over a length L:
    L = n*t - (n-1)*overlap*t   =>   t = L / (n - (n-1)*overlap),  stride = t*(1-overlap).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TILES = 25  # tiles per image: each is scored like a whole image
_GRID = re.compile(r"^\s*\(?\s*(-?\d+)\s*(?:[xX,]|\s)\s*(-?\d+)\s*\)?\s*$")


@dataclass(frozen=True)
class Tile:
    """A tile in pixel coordinates of the full image (x1, y1 exclusive)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def pixel_box(self) -> tuple[int, int, int, int]:
        """Integer crop box (left, top, right, bottom) covering the tile."""
        return (int(self.x0), int(self.y0), int(round(self.x1)), int(round(self.y1)))


def parse_tile_grid_size(value: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`"3x2"`, `"3X2"`, `"(3, 2)"` or `(3, 2)` → (tiles across, tiles down)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"tile_grid_size {value!r} must have two numbers (across, down)")
        cols, rows = (int(v) for v in value)
    else:
        match = _GRID.match(str(value))
        if not match:
            raise ValueError(
                f"tile_grid_size {value!r} is malformed: write it as \"3x2\" or \"(3, 2)\" "
                "(tiles across, tiles down)"
            )
        cols, rows = int(match.group(1)), int(match.group(2))
    if cols < 1 or rows < 1:
        raise ValueError(f"tile_grid_size {value!r}: both numbers must be positive")
    if cols * rows == 1:
        raise ValueError(f"tile_grid_size {value!r} is a single tile: use at least 2 tiles, e.g. \"2x1\"")
    if cols * rows > MAX_TILES:
        raise ValueError(f"tile_grid_size {value!r} is {cols * rows} tiles; at most {MAX_TILES} per image "
                         "(e.g. \"5x5\"), each scored as a whole image would be")
    return cols, rows


def check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile_overlap_ratio={overlap} must be in [0, 1)")


def _spans(length: float, count: int, overlap: float) -> list[tuple[float, float]]:
    side = length / (count - (count - 1) * overlap)
    stride = side * (1.0 - overlap)
    spans = [(i * stride, i * stride + side) for i in range(count)]
    # the last tile ends exactly at the image border, whatever the float rounding
    spans[-1] = (length - side, float(length))
    return spans


def tile_grid(width: float, height: float, grid: tuple[int, int], overlap: float) -> list[Tile]:
    """The tiles of `grid` (across, down) over a width x height image, row by row."""
    check_overlap(overlap)
    cols, rows = grid
    xs = _spans(width, cols, overlap)
    ys = _spans(height, rows, overlap)
    return [Tile(x0, y0, x1, y1) for (y0, y1) in ys for (x0, x1) in xs]
