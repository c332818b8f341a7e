"""Predictions on the hub: `imageanalysis:analyze?model-name=` (a raw image or `{"url": ...}`) and the AutoML
`/score` and `/invocations` bodies, each sent to the HubModels replica that holds (or loads) the model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

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


def _local_image(url: str, image_root: str | None) -> bytes:
    """`{"url": ...}`: a file under --image-root (blob URLs mapped there as for datasets); nothing else is read."""
    from models.data.jsonl import resolve_image_url

    if not image_root:
        raise ApiError(400, "InvalidImageUrl", "this hub has no --image-root, so it reads no image URLs; send the "
                       "image itself (application/octet-stream)", "url")
    root = Path(image_root).resolve()
    try:
        path = Path(resolve_image_url(url, root, root)).resolve()
    except ValueError as exc:
        raise ApiError(400, "InvalidImageUrl", str(exc), "url") from None
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(400, "InvalidImageUrl", f"{url[:200]} is not an image file under the hub's --image-root", "url")
    return path.read_bytes()


async def analyze(service: Any, request: Request) -> JSONResponse:
    from models.data.formats import ImageLimits
    from models.data.images import image_size, probe

    name = request.query_params.get("model-name") or request.query_params.get("model-version")
    if not name:
        if request.query_params.get("features"):
            raise ApiError(400, "InvalidRequest", "this hub answers custom models only: give ?model-name=")
        raise ApiError(400, "InvalidRequest", "Either 'features' or 'model-name' needs to be specified in the query "
                       "parameter.")
    mid = service.jobs.model_id(name)
    limits = ImageLimits(max_bytes=int(service.config.max_image_mb * 2**20))
    body = await _body(request, limits.max_bytes + 4096, "InvalidImageSize")
    if "json" in request.headers.get("content-type", ""):
        url = field(read_json(body), "url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "InvalidRequest", 'a JSON body must be {"url": "..."}', "url")
        body = await asyncio.to_thread(_local_image, url, service.config.image_root)
    try:
        probe(body, limits)
        width, height = image_size(body)
    except ImageError as exc:
        code = "InvalidImageSize" if exc.code in ("too_large", "too_small") else "InvalidImageFormat"
        raise ApiError(400, code, str(exc)) from None
    result = await service.models.options(multiplexed_model_id=mid).analyze.remote(body)
    answer = result["answer"]
    if "error" in answer:
        raise ApiError(400, "InvalidImage", answer["error"]["message"])
    version = request.query_params.get("api-version") or "2023-02-01-preview"
    return JSONResponse(analyze_answer(result["task"], answer, width, height, version))


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
