"""Predictions on the hub: `imageanalysis:analyze?model-name=` (a raw image or `{"url": ...}`) and the AutoML
`/score` and `/invocations` bodies, each sent to the HubModels replica that holds (or loads) the model; and
`GET /image?url=`, the bytes of the image a URL names, read by the same code as analyze's `{"url": ...}`."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from models.data.formats import ImageLimits
from models.errors import ImageError
from serving.hub.api import ApiError, analyze_answer, field, read_json

MODEL_HEADER = "azureml-model-deployment"
MAX_REQUEST_MB = 100


async def _body(request: Request, limit: int, code: str) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, code, f"the body is over {limit / 2**20:g} MB")
        chunks.append(chunk)
    return b"".join(chunks)


def _limits(service: Any) -> ImageLimits:
    return ImageLimits(max_bytes=int(service.config.max_image_mb * 2**20))


def _checked(body: bytes, limits: ImageLimits) -> tuple[int, int]:
    """(width, height) of an image analyze takes: within `limits`, of a format it reads; a 400 in words otherwise."""
    from models.data.images import probe

    try:
        return probe(body, limits)
    except ImageError as exc:
        code = "InvalidImageSize" if exc.code in ("too_large", "too_small") else "InvalidImageFormat"
        raise ApiError(400, code, str(exc)) from None


def url_image(url: Any, image_root: str | None, limits: ImageLimits) -> tuple[bytes, int, int]:
    """`{"url": ...}` → (bytes, width, height): a file under --image-root (blob URLs mapped there as for datasets,
    links followed and still inside it), checked as analyze checks an image; nothing else is read. Both analyze
    and the studio's `GET /image?url=` read URLs through here."""
    from models.data.images import check_bytes
    from models.data.jsonl import resolve_image_url
    from serving.hub.browse import inside

    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, "InvalidRequest", "no image URL given", "url")
    if not image_root:
        raise ApiError(400, "InvalidImageUrl", "this hub has no --image-root, so it reads no image URLs; send the "
                       "image itself (application/octet-stream)", "url")
    root = Path(image_root)
    try:
        path = Path(resolve_image_url(url, root, root))
    except ValueError as exc:
        raise ApiError(400, "InvalidImageUrl", str(exc), "url") from None
    if not inside(root, path):
        raise ApiError(400, "InvalidImageUrl", f"{url[:200]} lies outside the hub's --image-root; only files under it "
                       "are read", "url")
    if not path.is_file():
        raise ApiError(400, "InvalidImageUrl", f"{url[:200]}: no such file under the hub's --image-root", "url")
    try:
        check_bytes(path.stat().st_size, limits)  # before reading it
    except ImageError as exc:
        raise ApiError(400, "InvalidImageSize", str(exc), "url") from None
    body = path.read_bytes()
    return (body, *_checked(body, limits))


async def analyze(service: Any, request: Request) -> JSONResponse:
    name = request.query_params.get("model-name") or request.query_params.get("model-version")
    if not name:
        if request.query_params.get("features"):
            raise ApiError(400, "InvalidRequest", "this hub answers custom models only: give ?model-name=")
        raise ApiError(400, "InvalidRequest", "Either 'features' or 'model-name' needs to be specified in the query "
                       "parameter.")
    mid = service.jobs.model_id(name)
    limits = _limits(service)
    body = await _body(request, limits.max_bytes + 4096, "InvalidImageSize")
    if "json" in request.headers.get("content-type", ""):
        url = field(read_json(body), "url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "InvalidRequest", 'a JSON body must be {"url": "..."}', "url")
        body, width, height = await asyncio.to_thread(url_image, url, service.config.image_root, limits)
    else:
        width, height = _checked(body, limits)
    result = await service.models.options(multiplexed_model_id=mid).analyze.remote(body)
    answer = result["answer"]
    if "error" in answer:
        raise ApiError(400, "InvalidImage", answer["error"]["message"])
    version = request.query_params.get("api-version") or "2023-02-01-preview"
    return JSONResponse(analyze_answer(result["task"], answer, width, height, version))


async def image(service: Any, request: Request) -> Response:
    """GET /image?url=URL: the bytes of the image `{"url": URL}` would make analyze read, as they are (the studio
    draws on them and scores them as a dropped file)."""
    from serving.hub.browse import IMAGE_HEADERS

    body, _, _ = await asyncio.to_thread(url_image, request.query_params.get("url"), service.config.image_root,
                                         _limits(service))
    return Response(body, media_type=_media_type(body), headers=IMAGE_HEADERS)


def _media_type(body: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(body)) as picture:
        return Image.MIME.get(picture.format or "", "application/octet-stream")


async def automl(service: Any, request: Request, route: str) -> JSONResponse:
    name = request.headers.get(MODEL_HEADER) or request.query_params.get("model")
    if not name:
        raise ApiError(400, "InvalidRequest", f"name the model: the {MODEL_HEADER} header or ?model=NAME "
                       "(GET /models lists them)", MODEL_HEADER)
    mid = service.jobs.model_id(name)
    body = await _body(request, MAX_REQUEST_MB * 2**20, "request_too_large")
    partial = request.query_params.get("partial", "").lower() in ("1", "true")
    status, answer = await service.models.options(multiplexed_model_id=mid).score.remote(body, route, partial)
    return JSONResponse(answer, status)
