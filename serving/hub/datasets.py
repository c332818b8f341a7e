"""Datasets: register, read, update (with eTags), delete, list; and the listing of any kind of record."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from models.data.coco_files import CocoProblems, read_coco_files
from serving.hub.api import ApiError, field, json_body, no_content, not_found, page, public, resource_name
from serving.hub.scheduler import Quotas
from serving.hub.state import AlreadyExists, Store, now

KINDS = {"imageclassification": "imageClassification", "multiclassclassification": "imageClassification",
         "imageobjectdetection": "imageObjectDetection", "objectdetection": "imageObjectDetection"}
MAX_FILES = 10
MAX_PROPERTIES = 10


def _kind(value: Any) -> str:
    kind = KINDS.get(str(value or "").replace("_", "").replace("-", "").lower())
    if kind is None:
        raise ApiError(400, "InvalidArgument", f"annotationKind={value!r}: must be imageClassification or "
                       "imageObjectDetection", "annotationKind")
    return kind


def _uris(value: Any) -> list[str]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_FILES or not all(isinstance(u, str) and u.strip()
                                                                                  for u in value):
        raise ApiError(400, "InvalidArgument", f"annotationFileUris must be a list of 1 to {MAX_FILES} URIs",
                       "annotationFileUris")
    return [u.strip() for u in value]


def _properties(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PROPERTIES or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ApiError(400, "InvalidArgument", f"customProperties must be at most {MAX_PROPERTIES} string pairs",
                       "customProperties")
    return value


def _check_files(uris: list[str], kind: str, image_root: str | None) -> None:
    """The annotation files resolve and parse (images are checked when a model trains from them)."""
    try:
        read_coco_files(uris, kind, image_root=image_root, check_images=False,
                        confined=True)
    except CocoProblems as exc:
        raise ApiError(400, "DatasetInvalidAnnotationUri", str(exc), "annotationFileUris") from None


def _if_match(request: Request, record: dict[str, Any]) -> None:
    wanted = request.headers.get("if-match")
    if wanted and wanted.strip() != "*" and wanted.strip().removeprefix("W/") != record.get("eTag"):
        raise ApiError(412, "PreconditionFailed", f"If-Match {wanted} does not match the eTag {record.get('eTag')}")


async def register_dataset(store: Store, name: str, request: Request, config: Any, quotas: Quotas) -> JSONResponse:
    name = resource_name(name, "name", "dataset")
    doc = await json_body(request)
    kind = _kind(field(doc, "annotationKind"))
    uris = _uris(field(doc, "annotationFileUris"))
    properties = _properties(field(doc, "customProperties"))
    if await asyncio.to_thread(store.get, "datasets", name) is not None:  # before the files are read
        raise ApiError(409, "DatasetAlreadyExists", f"dataset {name!r} already exists", name)
    quotas.check("datasets", await asyncio.to_thread(store.count, "datasets"))
    await asyncio.to_thread(_check_files, uris, kind, config.image_root)
    record = {"name": name, "annotationKind": kind, "annotationFileUris": uris, "createdDateTime": now()}
    auth = field(doc, "authentication")
    if isinstance(auth, dict):
        record["authentication"] = {"kind": field(auth, "kind", "none")}  # a SAS token is never stored
    if properties:
        record["customProperties"] = properties
    try:
        created = await asyncio.to_thread(store.create, "datasets", record,
                                          check=lambda count: quotas.check("datasets", count))
    except AlreadyExists:
        raise ApiError(409, "DatasetAlreadyExists", f"dataset {name!r} already exists", name) from None
    return JSONResponse(public(created), 201)


async def update_dataset(store: Store, name: str, request: Request, config: Any) -> JSONResponse:
    """PATCH: customProperties and annotationFileUris, each checked as PUT checks it, before anything is written."""
    name = resource_name(name, "name", "dataset")
    doc = await json_body(request)
    record = await asyncio.to_thread(store.get, "datasets", name)
    if record is None:
        raise not_found("dataset", name)
    changes: dict[str, Any] = {}
    if field(doc, "customProperties") is not None:
        changes["customProperties"] = _properties(field(doc, "customProperties"))
    if field(doc, "annotationFileUris") is not None:
        changes["annotationFileUris"] = _uris(field(doc, "annotationFileUris"))
        await asyncio.to_thread(_check_files, changes["annotationFileUris"], record["annotationKind"],
                                config.image_root)
    updated = await asyncio.to_thread(store.update, "datasets", name, check=lambda r: _if_match(request, r),
                                      **changes)
    if updated is None:
        raise not_found("dataset", name)
    return JSONResponse(public(updated))


async def delete_dataset(store: Store, name: str, request: Request):
    name = resource_name(name, "name", "dataset")
    if not await asyncio.to_thread(store.delete, "datasets", name, check=lambda r: _if_match(request, r)):
        raise not_found("dataset", name)
    return no_content()


async def get(kind: str, store: Store, name: str) -> JSONResponse:
    record = await asyncio.to_thread(store.get, kind, resource_name(name, "name", kind.rstrip("s")))
    if record is None:
        raise not_found(kind.rstrip("s"), name)
    return JSONResponse(public(record))


async def listing(records: Sequence[dict[str, Any]], request: Request) -> JSONResponse:
    return JSONResponse(page([public(r) for r in records], request))
