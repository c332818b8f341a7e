"""Convert COCO JSON and Pascal VOC XML annotations to the JSONL training format (data.md).

COCO is here, with the helpers both converters share; Pascal VOC is in `models.data.voc`
(`voc_to_jsonl` is importable from either module).

Output objects hold normalised floats in [0, 1] rounded to 6 decimals: detection
``{"label", "topX", "topY", "bottomX", "bottomY", "isCrowd"}``; instance segmentation
``{"label", "isCrowd", "polygon": [[x1, y1, ...], ...], "topX", "topY", "bottomX", "bottomY"}``.
``image_url`` is relative to the output JSONL's folder unless a prefix or remote URL is used.
Malformed input raises ``ValueError`` naming the file and the annotation / xml file / field.
Boxes and polygons outside the image are clipped (``warnings``, ``n_clipped``); objects with zero
area after clipping are skipped (``warnings``, ``n_skipped``); nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

BBoxFormat = Literal["auto", "pixel", "relative"]
COCO_TASKS = (
    "image_object_detection",
    "image_instance_segmentation",
    "image_classification",
    "image_classification_multilabel",
)
_EPS = 1e-6
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


# ---------------------------------------------------------------- shared helpers


def _r(value: float) -> float:
    """Round a normalised coordinate for output."""
    return round(float(value), 6)


def _clip_box(box: Sequence[float], where: str, summary: ConvertSummary) -> tuple[float, ...] | None:
    """Clip a normalised (x0, y0, x1, y1) box to [0, 1]; None (with a warning) when degenerate."""
    clipped = tuple(min(max(v, 0.0), 1.0) for v in box)
    if any(abs(a - b) > _EPS for a, b in zip(box, clipped)):
        summary.n_clipped += 1
        summary.warnings.append(f"{where}: box {[_r(v) for v in box]} outside the image, clipped")
    if clipped[2] - clipped[0] <= _EPS or clipped[3] - clipped[1] <= _EPS:
        summary.n_skipped += 1
        summary.warnings.append(f"{where}: box has zero area after clipping, skipped")
        return None
    return clipped


def _box_keys(box: Sequence[float]) -> dict[str, float]:
    """The topX/topY/bottomX/bottomY keys of a normalised box."""
    return {"topX": _r(box[0]), "topY": _r(box[1]), "bottomX": _r(box[2]), "bottomY": _r(box[3])}


def _line(url: str, name: str, size: Size | None, label: Any) -> Json:
    """One JSONL line; image_details has the format from the extension and the size when known."""
    details: dict[str, str] = {}
    suffix = Path(name.split("?")[0]).suffix.lower().lstrip(".")
    if suffix:
        details["format"] = suffix
    if size:
        details["width"], details["height"] = f"{size[0]}px", f"{size[1]}px"
    return {"image_url": url, "image_details": details, "label": label}


def _relative_url(image: Path, out_jsonl: Path) -> str:
    """Path of `image` relative to the folder of the JSONL file, with forward slashes."""
    return Path(os.path.relpath(image.resolve(), out_jsonl.resolve().parent)).as_posix()


def _write_jsonl(out_jsonl: Path, lines: list[Json], summary: ConvertSummary, used: set[str]) -> ConvertSummary:
    """Write one JSON object per line and complete the summary."""
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    out_jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    summary.n_images, summary.labels = len(lines), sorted(used)
    return summary


def _number(value: Any, where: str) -> float:
    """A finite number, or ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{where} is {value!r}, expected a number")
    return float(value)


def _positive(value: Any) -> float | None:
    """A positive number, else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None


def _crowd(value: Any) -> int:
    """iscrowd / difficult (0/1, bool, strings) -> 0/1."""
    return 1 if str(value).strip().lower() in ("1", "true") else 0


# ---------------------------------------------------------------- COCO: reading and checking


def _load_coco(path: Path) -> Json:
    """Read the COCO JSON and check its top-level shape."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name}: cannot read COCO JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object with images, annotations, categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path.name}: missing or invalid '{key}' list")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{path.name}: 'annotations' must be a list")
    return data


def _index_by_id(items: list[Any], kind: str, required: Sequence[str], fname: str) -> dict[Any, Json]:
    """Map id -> item, checking required keys and duplicate ids."""
    out: dict[Any, Json] = {}
    for pos, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{fname}: {kind} #{pos}: missing 'id'")
        for key in required:
            if key not in item:
                raise ValueError(f"{fname}: {kind} {item['id']}: missing '{key}'")
        if item["id"] in out:
            raise ValueError(f"{fname}: {kind} {item['id']}: duplicate id")
        out[item["id"]] = item
    return out


def _group_annotations(data: Json, images: dict[Any, Json], categories: dict[Any, Json], fname: str
                       ) -> dict[Any, list[tuple[str, Json]]]:
    """image id -> [(where, annotation)], checking that image and category ids exist."""
    by_image: dict[Any, list[tuple[str, Json]]] = {i: [] for i in images}
    for pos, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            raise ValueError(f"{fname}: annotation #{pos}: expected an object")
        where = f"{fname}: annotation {ann.get('id', f'#{pos}')}"
        for key, known, kind in (("image_id", images, "images"), ("category_id", categories, "categories")):
            if key not in ann:
                raise ValueError(f"{where}: missing '{key}'")
            if ann[key] not in known:
                raise ValueError(f"{where}: {key} {ann[key]!r} is not in '{kind}'")
        by_image[ann["image_id"]].append((where, ann))
    return by_image


def _check_segmentation_present(annotations: list[Json], fname: str) -> None:
    """Instance segmentation needs a segmentation on every annotation; list the ids lacking one."""
    lacking = [a.get("id") for a in annotations if a.get("segmentation") in (None, [], {})]
    if lacking:
        shown = ", ".join(str(i) for i in lacking[:20]) + (" ..." if len(lacking) > 20 else "")
        raise ValueError(f"{fname}: {len(lacking)} annotation(s) have no segmentation, required for "
                         f"image_instance_segmentation: ids {shown}")


def _detect_bbox_format(annotations: list[Json], images: dict[Any, Json], summary: ConvertSummary) -> str:
    """'relative' when every bbox value is <= 1 and every image's pixel size is known, else 'pixel'."""
    boxes = [a["bbox"] for a in annotations if isinstance(a.get("bbox"), list) and a["bbox"]]
    all_small = bool(boxes) and all(isinstance(v, (int, float)) and v <= 1 for b in boxes for v in b)
    sizes_known = all(_positive(im.get("width")) and _positive(im.get("height")) for im in images.values())
    if all_small and not sizes_known:
        summary.warnings.append("all bbox values are <= 1 but image sizes are missing: read as pixels "
                                "(pass bbox_format='relative' if they are relative)")
    return "relative" if all_small and sizes_known else "pixel"


# ---------------------------------------------------------------- COCO: geometry


def _coco_bbox(ann: Json, size: Size, fmt: str, where: str) -> list[float] | None:
    """Normalised unclipped (x0, y0, x1, y1) from a COCO bbox, or None when the annotation has none."""
    bbox = ann.get("bbox")
    if bbox is None:
        return None
    if not isinstance(bbox, list) or len(bbox) != 4:
        n = len(bbox) if isinstance(bbox, list) else type(bbox).__name__
        raise ValueError(f"{where}: bbox has {n} values, expected 4 [left, top, width, height]")
    left, top, w, h = (_number(v, f"{where}: bbox value") for v in bbox)
    if w < 0 or h < 0:
        raise ValueError(f"{where}: bbox has a negative width or height {bbox}")
    sx, sy = (1, 1) if fmt == "relative" else size
    return [left / sx, top / sy, (left + w) / sx, (top + h) / sy]


def _rle_polygons(seg: Json, where: str) -> tuple[list[list[float]], Size]:
    """Pixel polygons (outer contours) of an RLE mask, and the mask's (width, height)."""
    try:
        h, w = (int(v) for v in seg["size"])
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else dict(seg)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            binary = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises several types for bad RLE
        raise ValueError(f"{where}: segmentation RLE cannot be decoded: {e}") from e
    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3], (w, h)


def _coco_polygons(ann: Json, size: Size, fmt: str, where: str) -> list[list[float]]:
    """Normalised unclipped polygons from a COCO segmentation (polygon list or RLE)."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        polygons, scale = _rle_polygons(seg, where)
    elif isinstance(seg, list) and all(isinstance(p, list) for p in seg):
        polygons, scale = seg, ((1, 1) if fmt == "relative" else size)
    else:
        raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict")
    out = []
    for k, poly in enumerate(polygons):
        if len(poly) % 2 or len(poly) < 6:
            raise ValueError(f"{where}: segmentation polygon {k} has {len(poly)} values, expected an even number >= 6")
        out.append([_number(v, f"{where}: segmentation value") / scale[i % 2] for i, v in enumerate(poly)])
    return out


def _clip_polygons(polygons: list[list[float]], where: str, summary: ConvertSummary) -> list[list[float]]:
    """Clip normalised polygon coordinates to [0, 1] (with a warning when anything moved)."""
    clipped = [[min(max(v, 0.0), 1.0) for v in poly] for poly in polygons]
    if any(abs(a - b) > _EPS for p, q in zip(polygons, clipped) for a, b in zip(p, q)):
        summary.n_clipped += 1
        summary.warnings.append(f"{where}: polygon outside the image, clipped")
    return [[_r(v) for v in poly] for poly in clipped]


def _coco_object(ann: Json, label: str, size: Size, fmt: str, task: str, where: str, summary: ConvertSummary
                 ) -> Json | None:
    """One JSONL object for a detection/segmentation annotation, or None when skipped."""
    crowd = _crowd(ann.get("iscrowd", 0))
    raw_box = _coco_bbox(ann, size, fmt, where)
    if task == "image_object_detection":
        if raw_box is None:
            raise ValueError(f"{where}: missing 'bbox'")
        box = _clip_box(raw_box, where, summary)
        return None if box is None else {"label": label, **_box_keys(box), "isCrowd": crowd}
    raw_polys = _coco_polygons(ann, size, fmt, where)
    if not raw_polys:
        summary.n_skipped += 1
        summary.warnings.append(f"{where}: segmentation has no polygon of >= 3 points (empty mask), skipped")
        return None
    xs = [v for p in raw_polys for v in p[0::2]]
    ys = [v for p in raw_polys for v in p[1::2]]
    box = _clip_box(raw_box or [min(xs), min(ys), max(xs), max(ys)], where, summary)
    if box is None:
        return None
    return {"label": label, "isCrowd": crowd, "polygon": _clip_polygons(raw_polys, where, summary), **_box_keys(box)}


# ---------------------------------------------------------------- COCO: images and labels


def _coco_image_url(image: Json, coco_dir: Path, out_jsonl: Path, prefix: str | None, missing: list[str]
                    ) -> tuple[str, Path | None]:
    """The `image_url` for a COCO image (see `coco_to_jsonl`) and its local path when it exists."""
    name = str(image["file_name"])
    local = coco_dir / name
    found = local if local.is_file() else None
    if prefix is not None:
        return prefix + name, found
    if found:
        return _relative_url(local, out_jsonl), found
    remote = image.get("absolute_url") or image.get("coco_url")
    if remote:
        return str(remote), None
    missing.append(name)
    return _relative_url(local, out_jsonl), None


def _coco_size(image: Json, local: Path | None, fname: str) -> Size:
    """(width, height) from the COCO image entry, else from the local file."""
    w, h = _positive(image.get("width")), _positive(image.get("height"))
    if w and h:
        return int(w), int(h)
    if local is not None:
        with Image.open(local) as im:
            return im.size
    raise ValueError(f"{fname}: image {image['id']}: missing width/height and no local file {image['file_name']!r}")


def _classification_label(task: str, names: list[str], image: Json, fname: str) -> Any:
    """Label of an image for the classification tasks."""
    distinct = sorted(set(names))
    if task == "image_classification_multilabel":
        return distinct
    if len(distinct) != 1:
        raise ValueError(f"{fname}: image {image['id']} ({image['file_name']}): has categories {distinct}, "
                         "expected exactly one for image_classification")
    return distinct[0]


def coco_to_jsonl(
    coco_json: str | Path,
    out_jsonl: str | Path,
    *,
    task: str = "image_object_detection",
    image_url_prefix: str | None = None,
    bbox_format: BBoxFormat = "auto",
) -> ConvertSummary:
    """Convert a COCO JSON file to JSONL for `task` (one line per COCO image, in file order).

    Image location: with `image_url_prefix`, ``image_url = image_url_prefix + file_name`` (plain
    concatenation, e.g. an ``azureml://.../paths/`` prefix). Otherwise ``file_name`` is resolved
    against the COCO file's folder; when that file exists, ``image_url`` is its path relative to the
    output JSONL's folder; when it does not and the image has ``absolute_url`` / ``coco_url``, that
    URL is used; else the relative path is written anyway and a warning lists the missing files.
    Image sizes come from the COCO ``width``/``height``, else from the local file.
    `bbox_format="auto"` picks "relative" when every bbox value is <= 1 and every image has its
    pixel size, else "pixel"; relative files have relative polygons too (RLE is always in pixels).
    Images without annotations get an empty label list (classification: an error). Detection
    writes boxes only; instance segmentation needs a segmentation (polygons, or RLE converted to
    outer-contour polygons) on every annotation and adds the box keys (bbox, else polygon bounds).
    Classification needs exactly one distinct category per image; multilabel takes the sorted set.
    """
    path, out = Path(coco_json), Path(out_jsonl)
    if task not in COCO_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(COCO_TASKS)}")
    if bbox_format not in ("auto", "pixel", "relative"):
        raise ValueError(f"bbox_format must be auto, pixel or relative, got {bbox_format!r}")
    fname, data = path.name, _load_coco(path)
    images = _index_by_id(data["images"], "image", ("file_name",), fname)
    categories = _index_by_id(data["categories"], "category", ("name",), fname)
    by_image = _group_annotations(data, images, categories, fname)
    if task == "image_instance_segmentation":
        _check_segmentation_present(data.get("annotations", []), fname)
    summary = ConvertSummary(out_jsonl=out)
    fmt = bbox_format if bbox_format != "auto" else _detect_bbox_format(data.get("annotations", []), images, summary)
    summary.bbox_format_used = fmt
    missing: list[str] = []
    used: set[str] = set()
    lines = []
    for image_id, image in images.items():
        url, local = _coco_image_url(image, path.parent, out, image_url_prefix, missing)
        size = _coco_size(image, local, fname)
        named = [(where, ann, str(categories[ann["category_id"]]["name"])) for where, ann in by_image[image_id]]
        if task in ("image_classification", "image_classification_multilabel"):
            label: Any = _classification_label(task, [n for _, _, n in named], image, fname)
            summary.n_annotations += len(named)
            used.update(n for _, _, n in named)
        else:
            objects = [(n, _coco_object(a, n, size, fmt, task, w, summary)) for w, a, n in named]
            label = [obj for _, obj in objects if obj is not None]
            summary.n_annotations += len(label)
            used.update(n for n, obj in objects if obj is not None)
        lines.append(_line(url, str(image["file_name"]), size, label))
    summary.warn_missing(fname, missing)
    return _write_jsonl(out, lines, summary, used)


def __getattr__(name: str) -> Any:
    """`from models.data.coco import voc_to_jsonl` keeps working (loaded lazily: no import cycle)."""
    if name == "voc_to_jsonl":
        from models.data.voc import voc_to_jsonl

        return voc_to_jsonl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
