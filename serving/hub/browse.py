"""The studio's look at a registered dataset (`GET /datasets/{name}/contents`, `/datasets/{name}/images/{index}`):
its images with their annotations, counts per category, the problems its files have (each naming its file and
the annotation or image id), and one image at a time as a JPEG thumbnail. A dataset is indexed once per version of
its record and COCO files (`ContentsIndex`, a few kept); a page then opens only its own rows' image headers.

An image is named by its place in the dataset, never by a path: only an image the dataset's COCO files name is
read, under the rules that registration applies (`read_coco_files(..., confined=True)`: the files and their
images inside --image-root), and only when its real path (links followed) lies under --image-root too.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from models.data.coco_files import CocoProblems, read_coco_files
from models.data.formats import MAX_SIDE, MAX_TRAINING_BYTES, ImageLimits
from models.data.images import decode, image_size
from models.data.locations import Refused, inside, locate
from models.errors import ImageError
from serving.hub.api import ApiError, not_found
from serving.hub.state import Store

THUMB_SIDE = 480  # the longer side of a served image, in pixels
MAX_TOP = 60  # images per page of contents
_ID = re.compile(r"\b(annotation|image|category) (\d+)\b")
_INDEX = re.compile(r"^[0-9]{1,9}$")
IMAGE_HEADERS = {"x-content-type-options": "nosniff", "cache-control": "private, max-age=60",
                 "content-security-policy": "default-src 'none'"}


def problem_entries(problems: list[str]) -> list[dict[str, Any]]:
    """Each problem message with the ids it names: `annotationId`, `imageId`, `categoryId` (the first of each)."""
    out = []
    for message in problems:
        entry: dict[str, Any] = {"message": message}
        for what, ident in _ID.findall(message):
            entry.setdefault(f"{what}Id", int(ident))
        out.append(entry)
    return out


def _annotations(label: Any) -> list[dict[str, Any]]:
    """A record's label as the page draws it: a category, or boxes with relative corners."""
    if isinstance(label, str):
        return [{"category": label}]
    return [{"category": b.label, "box": [b.x0, b.y0, b.x1, b.y1], "crowd": b.is_crowd} for b in label]


def _size(path: str, root: str | None) -> tuple[int, int] | None:
    """(width, height) from the image's header; None when it cannot be read, or it lies outside the root."""
    if not root or not inside(root, path):
        return None
    try:
        return image_size(path)
    except ImageError:
        return None


@dataclass(frozen=True)
class ContentsIndex:
    """A dataset's contents read once (every COCO file parsed, every image header checked): its records, labels,
    counts and problems as of `signature`; a page then reads only its own rows' image headers."""

    signature: tuple
    readable: bool  # the annotations could be read (the grid shows them even when images have problems)
    records: list
    labels: list[str]
    counts: dict[str, int]
    annotations: int
    problems: list[str]


class DatasetViews:
    """What the studio reads of datasets: the index of the last `keep` viewed, each used while the dataset's
    record and COCO files are unchanged (a change to an image file alone shows on its row, and in the problems
    once the dataset is changed again)."""

    def __init__(self, image_root: str | None, keep: int = 4):
        self.image_root = image_root
        self.keep = keep
        self._indexes: OrderedDict[str, ContentsIndex] = OrderedDict()
        self._lock = threading.Lock()

    def _read(self, record: dict[str, Any], check_images: bool):
        return read_coco_files(record["annotationFileUris"], record["annotationKind"], image_root=self.image_root,
                               check_images=check_images, confined=True)

    def _signature(self, record: dict[str, Any]) -> tuple:
        """The dataset's version and each COCO file's identity and mtime: a change to any indexes it again."""
        root = Path(self.image_root) if self.image_root else None
        out: list[Any] = [record.get("eTag")]
        for uri in record["annotationFileUris"]:
            try:
                found = os.stat(locate(uri, Path("."), root, confined=True))
            except (Refused, OSError):
                found = None
            out.append((uri, found.st_ino, found.st_mtime_ns, found.st_size) if found else (uri,))
        return tuple(out)

    def _build(self, record: dict[str, Any], signature: tuple) -> ContentsIndex:
        problems, coco = [], None
        try:
            coco = self._read(record, check_images=True)
        except CocoProblems as exc:
            problems = exc.problems
            try:  # the annotations may still be readable: the grid shows them, the problems say what is wrong
                coco = self._read(record, check_images=False)
            except CocoProblems:
                coco = None
        records = coco.records if coco is not None else []
        return ContentsIndex(signature, coco is not None, records, coco.labels if coco else [],
                             coco.counts if coco else {}, sum(len(_annotations(r.label)) for r in records), problems)

    def index(self, record: dict[str, Any]) -> ContentsIndex:
        """The dataset's index: kept, or built now (and kept, the least recently viewed forgotten)."""
        name, signature = record["name"], self._signature(record)
        with self._lock:
            kept = self._indexes.get(name)
            if kept is not None and kept.signature == signature:
                self._indexes.move_to_end(name)
                return kept
        built = self._build(record, signature)
        with self._lock:
            self._indexes[name] = built
            self._indexes.move_to_end(name)
            while len(self._indexes) > self.keep:
                self._indexes.popitem(last=False)
        return built

    def records(self, record: dict[str, Any]) -> list:
        """The dataset's records; ApiError 409 `datasetCorrupt` when its files cannot be read now."""
        index = self.index(record)
        if not index.readable:
            name = record["name"]
            raise ApiError(409, "datasetCorrupt", f"dataset {name!r} cannot be read now: "
                           f"{CocoProblems(index.problems)}", name)
        return index.records

    def contents(self, record: dict[str, Any], skip: int, top: int) -> dict[str, Any]:
        """A page of images with their annotations (only its rows' image headers read), the counts per category
        and every problem."""
        index = self.index(record)
        shown = []
        for number, r in enumerate(index.records[skip:skip + top], start=skip):
            size = _size(r.image, self.image_root)
            shown.append({"index": number, "id": r.line, "file": r.source, "name": Path(r.image).name,
                          "width": size[0] if size else None, "height": size[1] if size else None,
                          "annotations": _annotations(r.label)})
        return {"name": record["name"], "annotationKind": record["annotationKind"], "valid": not index.problems,
                "problems": problem_entries(index.problems), "labels": index.labels, "counts": index.counts,
                "annotations": index.annotations,
                "images": {"total": len(index.records), "skip": skip, "top": top, "value": shown}}

    def _confined(self, path: str, where: str) -> None:
        if not self.image_root:
            raise ApiError(403, "Forbidden", "this hub has no --image-root, so it shows no dataset images")
        if not inside(self.image_root, path):
            raise ApiError(403, "Forbidden", f"{where} lies outside the hub's image root (a link that leads out "
                           "of it); refused")
        if not os.path.isfile(os.path.realpath(path)):
            raise ApiError(404, "NotFound", f"{where}: the image file is missing or not a file")

    def thumbnail(self, record: dict[str, Any], index: int) -> bytes:
        """Image `index` of the dataset as a JPEG of at most THUMB_SIDE pixels a side."""
        records = self.records(record)
        name = record["name"]
        if index >= len(records):
            raise ApiError(404, "NotFound", f"dataset {name!r} has {len(records)} images; there is no image number "
                           f"{index} (they count from 0)", "index")
        chosen = records[index]
        where = f"image {chosen.line} of {chosen.source} (dataset {name!r})"
        self._confined(chosen.image, where)
        try:
            width, height = image_size(chosen.image)
            scale = min(1.0, THUMB_SIDE / max(width, height))
            picture = decode(chosen.image, ImageLimits(min_side=1, max_side=MAX_SIDE, max_bytes=MAX_TRAINING_BYTES),
                             size=(max(1, round(width * scale)), max(1, round(height * scale))))
        except ImageError as exc:
            raise ApiError(422, "InvalidImage", f"{where} cannot be shown: {exc}", "index") from None
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=85)
        return buffer.getvalue()


def _dataset(store: Store, name: str) -> dict[str, Any]:
    record = store.get("datasets", name)
    if record is None:
        raise not_found("dataset", name)
    return record


def _paging(request: Request) -> tuple[int, int]:
    try:
        skip = int(request.query_params.get("skip", 0))
        top = int(request.query_params.get("top", 24))
    except ValueError:
        raise ApiError(400, "InvalidRequest", "skip and top must be integers") from None
    if skip < 0 or not 1 <= top <= MAX_TOP:
        raise ApiError(400, "InvalidRequest", f"skip must be >= 0 and top in 1..{MAX_TOP}", "top")
    return skip, top


async def dataset_contents(store: Store, views: DatasetViews, name: str, request: Request) -> JSONResponse:
    """GET /datasets/{name}/contents?skip=&top=: a page of the grid, the counts, the problems."""
    record = _dataset(store, name)
    skip, top = _paging(request)
    return JSONResponse(await asyncio.to_thread(views.contents, record, skip, top))


async def dataset_image(store: Store, views: DatasetViews, name: str, index: str) -> Response:
    """GET /datasets/{name}/images/{index}: one image of the dataset, by its place in it."""
    record = _dataset(store, name)
    if not _INDEX.match(index):
        raise ApiError(400, "InvalidArgument", f"image {index[:40]!r}: an image is named by its place in the "
                       "dataset (0, 1, ...), never by a path", "index")
    data = await asyncio.to_thread(views.thumbnail, record, int(index))
    return Response(data, media_type="image/jpeg", headers=IMAGE_HEADERS)
