"""What the COCO and Pascal VOC converters share: the summary of a conversion and the JSONL they write.

Output objects hold normalised floats in [0, 1] rounded to 6 decimals: detection
``{"label", "topX", "topY", "bottomX", "bottomY", "isCrowd"}``; instance segmentation
``{"label", "isCrowd", "polygon": [[x1, y1, ...], ...], "topX", "topY", "bottomX", "bottomY"}``.
``image_url`` is relative to the output JSONL's folder unless a prefix or remote URL is used.
Boxes and polygons outside the image are clipped (``warnings``, ``n_clipped``); objects with zero
area after clipping are skipped (``warnings``, ``n_skipped``); nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.values import to_flag

EPS = 1e-6
Json = dict[str, Any]
Size = tuple[int, int]


@dataclass
class ConvertSummary:
    """What a converter wrote; `labels` are the sorted names that made it into the output."""

    out_jsonl: Path
    n_images: int = 0
    n_annotations: int = 0
    n_skipped: int = 0
    n_clipped: int = 0
    labels: list[str] = field(default_factory=list)
    bbox_format_used: str = "pixel"
    warnings: list[str] = field(default_factory=list)

    def warn_missing(self, where: str, missing: list[str]) -> None:
        """Record one warning listing image files that were not found."""
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            self.warnings.append(f"{where}: {len(missing)} image file(s) not found: {shown}")


def rounded(value: float) -> float:
    """Round a normalised coordinate for output."""
    return round(float(value), 6)


def clip_box(box: Sequence[float], where: str, summary: ConvertSummary) -> tuple[float, ...] | None:
    """Clip a normalised (x0, y0, x1, y1) box to [0, 1]; None (with a warning) when degenerate."""
    clipped = tuple(min(max(v, 0.0), 1.0) for v in box)
    if any(abs(a - b) > EPS for a, b in zip(box, clipped)):
        summary.n_clipped += 1
        summary.warnings.append(f"{where}: box {[rounded(v) for v in box]} outside the image, clipped")
    if clipped[2] - clipped[0] <= EPS or clipped[3] - clipped[1] <= EPS:
        summary.n_skipped += 1
        summary.warnings.append(f"{where}: box has zero area after clipping, skipped")
        return None
    return clipped


def box_keys(box: Sequence[float]) -> dict[str, float]:
    """The topX/topY/bottomX/bottomY keys of a normalised box."""
    return {"topX": rounded(box[0]), "topY": rounded(box[1]), "bottomX": rounded(box[2]), "bottomY": rounded(box[3])}


def jsonl_line(url: str, name: str, size: Size | None, label: Any) -> Json:
    """One JSONL line; image_details has the format from the extension and the size when known."""
    details: dict[str, str] = {}
    suffix = Path(name.split("?")[0]).suffix.lower().lstrip(".")
    if suffix:
        details["format"] = suffix
    if size:
        details["width"], details["height"] = f"{size[0]}px", f"{size[1]}px"
    return {"image_url": url, "image_details": details, "label": label}


def relative_url(image: Path, out_jsonl: Path) -> str:
    """Path of `image` relative to the folder of the JSONL file, with forward slashes."""
    return Path(os.path.relpath(image.resolve(), out_jsonl.resolve().parent)).as_posix()


def write_jsonl(out_jsonl: Path, lines: list[Json], summary: ConvertSummary, used: set[str]) -> ConvertSummary:
    """Write one JSON object per line and complete the summary."""
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    out_jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    summary.n_images, summary.labels = len(lines), sorted(used)
    return summary


def finite_number(value: Any, where: str) -> float:
    """A finite number, or ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}, expected a number")
    return float(value)


def positive(value: Any) -> float | None:
    """A positive number, else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None


def crowd_flag(value: Any, where: str) -> int:
    """iscrowd / difficult (0/1, bool, yes/no, true/false strings) -> 0/1; ValueError naming `where` otherwise."""
    try:
        return int(to_flag(value))
    except ValueError:
        raise ValueError(f"{where}: crowd flag {value!r}, expected 0/1 or true/false") from None
