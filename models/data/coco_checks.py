"""The cloud verifier's checks of one COCO file's content (image-analysis.md, "COCO files"): ids, references,
relative boxes, one category per classified image; every problem is named by file and id, none stops the rest.

Ids are positive integers ("starting from 1"), unique per kind; they need not be dense. Nothing here reads
an image or another file: `models.data.coco_files` does that.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from models.data.convert import EPS, crowd_flag
from models.data.records import MAX_REGIONS

MAX_ANNOTATIONS = 1_000_000  # per COCO file
MAX_IMAGES = {"imageClassification": 1_000_000, "imageObjectDetection": 200_000}  # the quota table
MAX_CATEGORIES = {"imageClassification": 2_500, "imageObjectDetection": 1_000}  # data.md
Corners = tuple[float, float, float, float]


class Problems:
    """A bounded list of problem messages: the first `cap` kept, the rest only counted."""

    def __init__(self, cap: int = 100):
        self.cap = cap
        self.shown: list[str] = []
        self.more = 0

    def add(self, message: str) -> None:
        if len(self.shown) < self.cap:
            self.shown.append(message)
        else:
            self.more += 1

    def __bool__(self) -> bool:
        return bool(self.shown)

    def __len__(self) -> int:
        return len(self.shown) + self.more

    def listed(self) -> list[str]:
        """The kept messages, then "… and N more" when some were only counted."""
        return self.shown + ([f"… and {self.more} more"] if self.more else [])


@dataclass
class Region:
    """One annotation of an image: its category's name and, for detection, its corners and crowd flag."""

    category: str
    corners: Corners | None = None
    crowd: bool = False


@dataclass
class CheckedImage:
    """One image entry that passed its checks: id, declared size, where it is (as written), its regions."""

    id: int
    size: tuple[int, int]
    url: str  # absolute_url or coco_url, else file_name (relative to the COCO file's folder)
    regions: list[Region] = field(default_factory=list)
    refused: int = 0  # annotations of this image refused (their problems already said)


@dataclass
class CheckedFile:
    """One COCO file's categories (id → name, in id order) and images (in file order)."""

    categories: dict[int, str]
    images: list[CheckedImage]


def _positive_id(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else None


def clip(text: str, limit: int = 200) -> str:
    """`text`, cut to `limit` characters with an ellipsis: a message never quotes a huge value whole."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def brief(value: Any) -> str:
    """The repr of a value from the file, clipped."""
    return clip(repr(value) if not isinstance(value, list) else "[" + ", ".join(map(repr, value[:8])) + "]", 80)


def _number(value: float) -> str:
    return repr(round(value, 9))


def bbox_corners(bbox: Any) -> tuple[Corners | None, list[str]]:
    """A relative [left, top, width, height] → normalised corners, or None and every reason it is refused."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None, [f"bbox {brief(bbox)} must be 4 numbers [left, top, width, height]"]
    try:  # bool is not a number here; a 400-digit integer is no float
        values = [float(v) for v in bbox if type(v) in (int, float)]
    except OverflowError:
        values = []
    if len(values) != 4 or not all(map(math.isfinite, values)):
        return None, [f"bbox {brief(bbox)} must be 4 finite numbers [left, top, width, height]"]
    left, top, width, height = values
    right, bottom = left + width, top + height
    if -EPS <= left < 1 and -EPS <= top < 1 and width > 0 and height > 0 and 0 < right <= 1 + EPS \
            and 0 < bottom <= 1 + EPS:
        return (max(left, 0.0), max(top, 0.0), min(right, 1.0), min(bottom, 1.0)), []
    return None, _bbox_reasons(bbox, values)


def _bbox_reasons(bbox: list, values: list[float]) -> list[str]:
    """Why a bbox of 4 finite numbers (`values`, as floats) is refused: at least one reason."""
    left, top, width, height = values
    shown = brief(bbox)
    if max(values) > 1 + EPS:
        return [f"bbox {shown} has values above 1, as pixels would: bbox must be relative [left, top, width, "
                "height], fractions (0..1) of the image's width and height"]
    reasons = []
    if left < -EPS:
        reasons.append(f"bbox {shown} starts left of the image (left = {brief(bbox[0])} < 0)")
    if top < -EPS:
        reasons.append(f"bbox {shown} starts above the image (top = {brief(bbox[1])} < 0)")
    if width <= 0:
        reasons.append(f"bbox {shown} has width {brief(bbox[2])}; it must be positive")
    if height <= 0:
        reasons.append(f"bbox {shown} has height {brief(bbox[3])}; it must be positive")
    if left + width > 1 + EPS:
        reasons.append(f"bbox {shown} ends past the image's right edge (left + width = {_number(left + width)} > 1)")
    if top + height > 1 + EPS:
        reasons.append(f"bbox {shown} ends past the image's bottom edge (top + height = {_number(top + height)} > 1)")
    return reasons or [f"bbox {shown} has no area inside the image"]


def _entries(data: dict, key: str, name: str, problems: Problems) -> list[tuple[int, int | None, dict]]:
    """(position, id or None, entry) of each object under `key`, with problems for non-objects and bad ids."""
    singular = {"images": "image", "annotations": "annotation", "categories": "category"}[key]
    out = []
    for pos, item in enumerate(data[key]):
        if not isinstance(item, dict):
            problems.add(f"{name}: {key}[{pos}]: expected an object, got {type(item).__name__}")
            continue
        if "id" not in item:
            problems.add(f"{name}: {key}[{pos}]: {singular} has no id")
            out.append((pos, None, item))
            continue
        ident = _positive_id(item["id"])
        if ident is None:
            problems.add(f"{name}: {key}[{pos}]: {singular} id {brief(item['id'])} must be a positive integer")
        out.append((pos, ident, item))
    return out


def _unique(entries: list[tuple[int, int | None, dict]], singular: str, name: str, problems: Problems) -> None:
    seen: set[int] = set()
    for _, ident, _ in entries:
        if ident is not None and ident in seen:
            problems.add(f"{name}: {singular} {ident}: duplicate id")
        elif ident is not None:
            seen.add(ident)


def _categories(data: dict, name: str, problems: Problems) -> tuple[dict[int, str], set[int]]:
    """The named categories (id → name, in id order) and every valid id (for the annotations' references)."""
    entries = _entries(data, "categories", name, problems)
    _unique(entries, "category", name, problems)
    out: dict[int, str] = {}
    names: dict[str, int] = {}
    for pos, ident, item in entries:
        where = f"{name}: category {ident}" if ident is not None else f"{name}: categories[{pos}]"
        value = item.get("name")
        if not isinstance(value, str) or not value.strip():
            problems.add(f"{where}: name {brief(value)} must be a non-empty string")
            continue
        label = value.strip()
        if label in names:
            problems.add(f"{where}: name {brief(label)} is already category {names[label]}'s; names must be unique")
        elif ident is not None:
            names[label] = ident
        if ident is not None:
            out.setdefault(ident, label)
    return dict(sorted(out.items())), {ident for _, ident, _ in entries if ident is not None}


def _size(item: dict, key: str, where: str, problems: Problems) -> int | None:
    value = item.get(key)
    if _positive_id(value) is None:
        problems.add(f"{where}: {key} {brief(value)} must be a positive integer (pixels)"
                     if key in item else f"{where}: {key} is missing")
        return None
    return value


def _location(item: dict) -> str | None:
    for key in ("absolute_url", "coco_url", "file_name"):
        if isinstance(item.get(key), str) and item[key].strip():
            return item[key].strip()
    return None


def _images(data: dict, name: str, problems: Problems) -> tuple[dict[int, CheckedImage], set[int]]:
    """The images that passed their checks, by id, and every valid id (for the annotations' references)."""
    entries = _entries(data, "images", name, problems)
    _unique(entries, "image", name, problems)
    good: dict[int, CheckedImage] = {}
    ids = {ident for _, ident, _ in entries if ident is not None}
    for pos, ident, item in entries:
        where = f"{name}: image {ident}" if ident is not None else f"{name}: images[{pos}]"
        width, height = _size(item, "width", where, problems), _size(item, "height", where, problems)
        location = _location(item)
        if location is None:
            problems.add(f"{where}: has no absolute_url, coco_url or file_name to find the image by")
        if ident is not None and ident not in good and width and height and location:
            good[ident] = CheckedImage(ident, (width, height), location)
    return good, ids


def _region(item: dict, category: str, detection: bool, where: str, problems: Problems) -> Region | None:
    if not detection:
        return Region(category)
    if "bbox" not in item:
        problems.add(f"{where}: bbox is missing (a detector needs one on every annotation)")
        return None
    corners, reasons = bbox_corners(item["bbox"])
    for reason in reasons:
        problems.add(f"{where}: {reason}")
    try:
        crowd = "iscrowd" in item and bool(crowd_flag(item["iscrowd"], "iscrowd"))
    except ValueError as exc:
        problems.add(f"{where}: {exc}")
        return None
    return Region(category, corners, crowd) if corners is not None else None


def _annotations(data: dict, name: str, kind: str, images: dict[int, CheckedImage], image_ids: set[int],
                 categories: dict[int, str], category_ids: set[int], problems: Problems) -> None:
    """Check every annotation and attach the good ones to their images."""
    entries = _entries(data, "annotations", name, problems)
    _unique(entries, "annotation", name, problems)
    for pos, ident, item in entries:
        where = f"{name}: annotation {ident}" if ident is not None else f"{name}: annotations[{pos}]"
        image_id = _reference(item, "image_id", image_ids, "image", where, problems)
        category_id = _reference(item, "category_id", category_ids, "category", where, problems)
        category = categories.get(category_id) if category_id is not None else None
        region = _region(item, category or "", kind == "imageObjectDetection", where, problems)
        image = images.get(image_id) if image_id is not None else None
        if image is None:
            continue
        if region is not None and category is not None:
            image.regions.append(region)
        else:
            image.refused += 1


def _reference(item: dict, key: str, known: Collection[int], what: str, where: str, problems: Problems) -> int | None:
    """The id `item[key]` refers to when it names one of `known`, else None (and a problem)."""
    if key not in item:
        problems.add(f"{where}: {key} is missing")
        return None
    ident = _positive_id(item[key])
    if ident is None or ident not in known:
        problems.add(f"{where}: {key} {brief(item[key])} names no {what} of this file")
        return None
    return ident


def _per_image(images: dict[int, CheckedImage], name: str, kind: str, problems: Problems) -> None:
    for image in images.values():
        where = f"{name}: image {image.id} ({clip(image.url)})"
        if kind == "imageObjectDetection":
            if len(image.regions) > MAX_REGIONS:
                problems.add(f"{where}: has {len(image.regions)} boxes; at most {MAX_REGIONS} per image")
            continue
        names = sorted({r.category for r in image.regions})
        if not names and not image.refused:
            problems.add(f"{where}: has no category annotation; a classifier needs exactly one per image")
        elif len(names) > 1:
            problems.add(f"{where}: has categories {clip(', '.join(map(repr, names)))}; a classifier takes "
                         "exactly one per image")


def check_coco(data: Any, name: str, kind: str, problems: Problems) -> CheckedFile | None:
    """Check one parsed COCO file for `kind`; every problem goes to `problems`, named by `name` and id. The
    entries that passed come back (None when the file's shape is wrong): usable only if no problem was added."""
    if not isinstance(data, dict):
        problems.add(f"{name}: expected a JSON object with images, annotations and categories")
        return None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    for key in missing:
        problems.add(f"{name}: {key!r} is missing or not a list" if key in data else f"{name}: {key!r} is missing")
    limits = (("annotations", MAX_ANNOTATIONS), ("images", MAX_IMAGES[kind]), ("categories", MAX_CATEGORIES[kind]))
    over = [(key, limit) for key, limit in limits if key not in missing and len(data[key]) > limit]
    for key, limit in over:
        problems.add(f"{name}: has {len(data[key]):,} {key}; at most {limit:,} are allowed")
    if missing or over:
        return None
    categories, category_ids = _categories(data, name, problems)
    images, image_ids = _images(data, name, problems)
    _annotations(data, name, kind, images, image_ids, categories, category_ids, problems)
    _per_image(images, name, kind, problems)
    return CheckedFile(categories, list(images.values()))

