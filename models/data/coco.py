"""Convert COCO JSON to the JSONL training format (data.md), for all four tasks.

Malformed input raises ``ValueError`` naming the file, the annotation and the field. What the output
holds, and how clipping and skipping are reported, is in `models.data.convert`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from models.data.records import check_task_name
from models.data.convert import (
    EPS, ConvertSummary, Json, Size, box_keys, clip_box, crowd_flag, finite_number, jsonl_line, positive,
    relative_url, rounded, write_jsonl,
)

BBoxFormat = Literal["auto", "pixel", "relative"]


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
    sizes_known = all(positive(im.get("width")) and positive(im.get("height")) for im in images.values())
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
    left, top, w, h = (finite_number(v, f"{where}: bbox value") for v in bbox)
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
        out.append([finite_number(v, f"{where}: segmentation value") / scale[i % 2] for i, v in enumerate(poly)])
    return out


def _clip_polygons(polygons: list[list[float]], where: str, summary: ConvertSummary) -> list[list[float]]:
    """Clip normalised polygon coordinates to [0, 1] (with a warning when anything moved)."""
    clipped = [[min(max(v, 0.0), 1.0) for v in poly] for poly in polygons]
    if any(abs(a - b) > EPS for p, q in zip(polygons, clipped) for a, b in zip(p, q)):
        summary.n_clipped += 1
        summary.warnings.append(f"{where}: polygon outside the image, clipped")
    return [[rounded(v) for v in poly] for poly in clipped]


def _coco_object(ann: Json, label: str, size: Size, fmt: str, task: str, where: str, summary: ConvertSummary
                 ) -> Json | None:
    """One JSONL object for a detection/segmentation annotation, or None when skipped."""
    crowd = crowd_flag(ann.get("iscrowd", 0), where)
    raw_box = _coco_bbox(ann, size, fmt, where)
    if task == "image_object_detection":
        if raw_box is None:
            raise ValueError(f"{where}: missing 'bbox'")
        box = clip_box(raw_box, where, summary)
        return None if box is None else {"label": label, **box_keys(box), "isCrowd": crowd}
    raw_polys = _coco_polygons(ann, size, fmt, where)
    if not raw_polys:
        summary.n_skipped += 1
        summary.warnings.append(f"{where}: segmentation has no polygon of >= 3 points (empty mask), skipped")
        return None
    xs = [v for p in raw_polys for v in p[0::2]]
    ys = [v for p in raw_polys for v in p[1::2]]
    box = clip_box(raw_box or [min(xs), min(ys), max(xs), max(ys)], where, summary)
    if box is None:
        return None
    return {"label": label, "isCrowd": crowd, "polygon": _clip_polygons(raw_polys, where, summary), **box_keys(box)}


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
        return relative_url(local, out_jsonl), found
    remote = image.get("absolute_url") or image.get("coco_url")
    if remote:
        return str(remote), None
    missing.append(name)
    return relative_url(local, out_jsonl), None


def _coco_size(image: Json, local: Path | None, fname: str) -> Size:
    """(width, height) from the COCO image entry, else from the local file."""
    w, h = positive(image.get("width")), positive(image.get("height"))
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
    check_task_name(task)
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
        lines.append(jsonl_line(url, str(image["file_name"]), size, label))
    summary.warn_missing(fname, missing)
    return write_jsonl(out, lines, summary, used)

