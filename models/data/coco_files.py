"""A dataset's COCO annotation files (image-analysis.md, "Datasets"): where each URI and image is locally, each
file read within bounds and verified, several merged into the records the training code reads.

A URI or image URL is a local path, a file:// URL or a cloud URL; a cloud URL's query (a SAS token) is ignored,
never shown in a message, and its path maps under the image root as `resolve_image_url` maps an `image_url`
(an Azure blob URL at `<root>/<container>/<path>`, else `<root>/<path>`), refused when it would leave the root.
Every problem of every file is reported at once (`CocoProblems`), each naming the file and the id concerned.
Memory is bounded: one file is parsed at a time, at most 200 MB and 1,000,000 annotations each.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.data.coco_checks import (
    MAX_ANNOTATIONS, MAX_IMAGES, CheckedFile, CheckedImage, Problems, brief, check_coco,
)
from models.data.convert import jsonl_line
from models.data.formats import MB, TRAINING_LIMITS
from models.data.locations import Refused, is_cloud, locate, shown
from models.data.records import Box, Label, Record
from models.errors import ImageError

CLASSIFICATION, DETECTION = "imageClassification", "imageObjectDetection"
KINDS = {"imageclassification": CLASSIFICATION, "multiclassclassification": CLASSIFICATION,
         "imageobjectdetection": DETECTION, "objectdetection": DETECTION}  # lower-cased → the spec's spelling
TASKS = {CLASSIFICATION: "image_classification", DETECTION: "image_object_detection"}
MIN_CATEGORIES = {CLASSIFICATION: 2, DETECTION: 1}  # the quota table
MAX_FILES = 10
MAX_FILE_BYTES = 200 * MB
MAX_OBJECTS = 3 * MAX_ANNOTATIONS  # JSON objects in one file, counted before it is parsed
MAX_PROBLEMS = 100


class CocoProblems(ValueError):
    """COCO files that cannot be used; `problems` lists every reason (the last may be "… and N more")."""

    def __init__(self, problems: Sequence[str], total: int | None = None):
        self.problems = list(problems)
        count = total if total is not None else len(self.problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{count} problem(s) in the COCO files:\n{listed}")


@dataclass
class CocoDataset:
    """The records of a dataset's COCO files, its labels (category id order) and images or boxes per label."""

    kind: str
    records: list[Record]
    labels: list[str]
    counts: dict[str, int]

    @property
    def task(self) -> str:
        """The training task of the records: image_classification or image_object_detection."""
        return TASKS[self.kind]


def annotation_kind(kind: Any) -> str | None:
    """`imageClassification` / `imageObjectDetection` for any spelling the API took (any case), else None."""
    return KINDS.get(kind.strip().lower()) if isinstance(kind, str) else None


def _locate_file(uri: str, root: Path | None, problems: Problems, confined: bool = False) -> str | None:
    named = shown(uri)
    if is_cloud(uri) and root is None:
        problems.add(f"{named}: a cloud URL, and no image root is set to map it to a local file")
        return None
    try:
        return os.path.abspath(locate(uri, Path("."), root, confined=confined))
    except Refused as exc:  # it names the URI itself
        problems.add(str(exc))
        return None


def _load(path: str, shown: str, problems: Problems) -> Any:
    """The parsed JSON of one COCO file, or None (and a problem) when it is missing, too large or not JSON."""
    try:
        info = os.stat(path)
    except OSError:
        problems.add(f"{shown}: file not found ({path})")
        return None
    if stat.S_ISDIR(info.st_mode) or not stat.S_ISREG(info.st_mode):
        problems.add(f"{shown}: {path} is a folder or special file, not a COCO file")
        return None
    too_large = f"{shown}: is over {MAX_FILE_BYTES // MB} MB; a COCO file may be at most {MAX_FILE_BYTES:,} bytes"
    if info.st_size > MAX_FILE_BYTES:
        problems.add(too_large)
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grew since
    except OSError as exc:
        problems.add(f"{shown}: cannot be read ({exc.strerror or exc})")
        return None
    if len(raw) > MAX_FILE_BYTES:
        problems.add(too_large)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.add(f"{shown}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return None
    del raw
    if text.count("{") > MAX_OBJECTS:
        problems.add(f"{shown}: holds over {MAX_OBJECTS:,} JSON objects; a COCO file may have at most "
                     f"{MAX_ANNOTATIONS:,} annotations")
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add(f"{shown}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    except RecursionError:
        problems.add(f"{shown}: not a COCO file (JSON nested too deeply)")
    return None


def _image_path(image: CheckedImage, coco_dir: Path, root: Path | None, confined: bool, where: str,
                problems: Problems) -> str | None:
    """The local path of one image; a cloud COCO file's images (or all, when `confined`) stay inside the root."""
    try:
        return os.path.abspath(locate(image.url, coco_dir, root, confined=confined))
    except Refused as exc:
        problems.add(f"{where}: {exc}")
        return None


def _check_image_file(path: str, image: CheckedImage, where: str, problems: Problems) -> None:
    """The file is there, a readable image of the declared size, within the training limits (header only)."""
    from models.data.images import check_bytes, check_size, image_size

    where = f"{where}: {shown(image.url)}"
    try:
        size = os.stat(path).st_size
    except OSError:
        problems.add(f"{where}: file not found ({path})")
        return
    try:
        check_bytes(size, TRAINING_LIMITS)
        width, height = image_size(path)
    except ImageError as exc:
        problems.add(f"{where}: {exc}")
        return
    if (width, height) != image.size:
        problems.add(f"{where}: width x height is declared {image.size[0]}x{image.size[1]}, but the image is "
                     f"{width}x{height} pixels")
    try:
        check_size(width, height, TRAINING_LIMITS)
    except ImageError as exc:
        problems.add(f"{where}: {exc}")


def _read_one(uri: str, kind: str, root: Path | None, check_images: bool, problems: Problems,
              confined: bool = False) -> tuple[CheckedFile, list[str]] | None:
    """One COCO file checked, with the local path of each of its images; None when anything is wrong."""
    named = shown(uri)
    path = _locate_file(uri, root, problems, confined)
    data = _load(path, named, problems) if path is not None else None
    if data is None:
        return None
    before = len(problems)
    checked = check_coco(data, named, kind, problems)
    del data
    if checked is None:
        return None
    paths = []
    for image in checked.images:
        where = f"{named}: image {image.id}"
        local = _image_path(image, Path(path).parent, root, confined or is_cloud(uri), where, problems)
        if local is not None and check_images:
            _check_image_file(local, image, where, problems)
        paths.append(local or "")
    return (checked, paths) if len(problems) == before else None


def _request_problems(uris: Any, kind: Any) -> list[str]:
    problems = []
    if annotation_kind(kind) is None:
        problems.append(f"annotationKind {brief(kind)} is not one of {CLASSIFICATION}, {DETECTION} (or the older "
                        "MultiClassClassification, ObjectDetection)")
    if isinstance(uris, (str, bytes)) or not isinstance(uris, Sequence):
        return problems + ["annotationFileUris: expected a list of 1 to 10 COCO file URIs"]
    if not 1 <= len(uris) <= MAX_FILES:
        problems.append(f"annotationFileUris: {len(uris)} URIs; 1 to {MAX_FILES} COCO files are needed")
    problems += [f"annotationFileUris[{i}]: {brief(u)} is not a URI" for i, u in enumerate(uris)
                 if not isinstance(u, str) or not u.strip()]
    return problems


def _label(kind: str, image: CheckedImage) -> Label:
    if kind == CLASSIFICATION:
        return image.regions[0].category
    return tuple(Box(r.category, *r.corners, is_crowd=r.crowd) for r in image.regions if r.corners)


def _merge(kind: str, files: list[tuple[str, CheckedFile, list[str]]]) -> CocoDataset:
    """One dataset of several files: categories matched by name, image ids kept per file."""
    counts: dict[str, int] = {}
    records = []
    for source, checked, paths in files:
        for name in checked.categories.values():
            counts.setdefault(name, 0)
        for image, path in zip(checked.images, paths):
            label = _label(kind, image)
            for name in ([label] if isinstance(label, str) else [box.label for box in label]):
                counts[name] += 1
            records.append(Record(path, label, source, image.id))
    return CocoDataset(kind, records, list(counts), counts)


def read_coco_files(uris: Sequence[str], kind: str, *, image_root: str | Path | None = None,
                    check_images: bool = True, confined: bool = False) -> CocoDataset:
    """Read and verify a dataset's 1-10 COCO files for `kind`; CocoProblems lists every problem of all of them.

    Records hold each image's absolute local path, its label (a category name, or boxes with relative corners),
    the file's URI (as messages show it) as `source` and the image id as `line`. `check_images` also opens each
    image's header: it must exist, be of its declared width and height, and within the training limits.
    `confined` (a server reading files its API users name): local paths too must lie inside the image root.
    """
    request = _request_problems(uris, kind)
    if request:
        raise CocoProblems(request)
    canonical = annotation_kind(kind) or CLASSIFICATION
    root = Path(image_root) if image_root is not None else None
    problems = Problems(MAX_PROBLEMS)
    files = []
    for uri in uris:
        read = _read_one(uri, canonical, root, check_images, problems, confined)
        if read is not None:
            files.append((shown(uri), *read))
    total = sum(len(checked.images) for _, checked, _ in files)
    if total > MAX_IMAGES[canonical]:
        problems.add(f"the COCO files list {total:,} images together; at most {MAX_IMAGES[canonical]:,} are allowed")
    if problems:
        raise CocoProblems(problems.listed(), total=len(problems))
    return _merge(canonical, files)


def few_images_problems(dataset: CocoDataset, minimum: int = 2) -> list[str]:
    """The spec's minimum to train: `minimum` images (classifier) or boxes (detector) per category, and enough
    categories; one message per shortfall, naming the category and its count."""
    one, many = ("image", "images") if dataset.kind == CLASSIFICATION else ("box", "boxes")
    needed = MIN_CATEGORIES[dataset.kind]
    problems = []
    if len(dataset.labels) < needed:
        who = "a classifier" if dataset.kind == CLASSIFICATION else "a detector"
        problems.append(f"{who} needs at least {needed} {'category' if needed == 1 else 'categories'}; the "
                        f"dataset has {len(dataset.labels)}")
    for name in dataset.labels:
        count = dataset.counts.get(name, 0)
        if count < minimum:
            problems.append(f"category {name!r} has {count} {one if count == 1 else many}; at least {minimum} "
                            f"{'is' if minimum == 1 else 'are'} needed")
    return problems


def to_jsonl_lines(dataset: CocoDataset) -> list[dict]:
    """The records as data.md JSONL lines (image_url the local path) that `read_jsonl` reads back the same."""
    lines = []
    for record in dataset.records:
        label: Any = record.label
        if not isinstance(label, str):
            label = [{"label": b.label, "topX": b.x0, "topY": b.y0, "bottomX": b.x1, "bottomY": b.y1,
                      "isCrowd": int(b.is_crowd)} for b in record.label if isinstance(b, Box)]
        lines.append(jsonl_line(record.image, record.image, None, label))
    return lines
