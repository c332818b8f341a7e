"""Predictions on the hub: `imageanalysis:analyze?model-name=` (a raw image or `{"url": ...}`) and the AutoML
`/score` and `/invocations` bodies, each sent to the HubModels replica that holds (or loads) the model; and
`GET /image?url=`, the bytes of the image a URL names, read by the same code as analyze's `{"url": ...}`.

Bodies are read by the edge (serving.edge.read_body) within the same limits as `visionserve serve`'s, model names
checked by the one name rule, URLs confined by the one confinement rule (models.data.locations); an image's header
is read once, here, and carried to the model replica."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from models.data.formats import ImageLimits
from models.data.images import Probed, check_bytes
from models.data.locations import Refused, locate
from models.errors import ImageError
from serving.contract import RequestError
from serving.edge import read_body
from serving.hub.api import ApiError, analyze_answer, field, read_json, resource_name
from serving.hub.browse import IMAGE_HEADERS
from serving.scoring import request_too_large

MODEL_HEADER = "azureml-model-deployment"


def _probed(body: bytes, limits: ImageLimits) -> Probed:
    """An image analyze takes, its header read once: within `limits`, of a format it reads; a 400 otherwise."""
    try:
        return Probed.of(body, limits)
    except ImageError as exc:
        code = "InvalidImageSize" if exc.code in ("too_large", "too_small") else "InvalidImageFormat"
        raise ApiError(400, code, str(exc)) from None


def url_image(url: Any, image_root: str | None, limits: ImageLimits) -> Probed:
    """`{"url": ...}` → the image it names under --image-root (blob URLs mapped there as for datasets, links followed
    and still inside it: models.data.locations), checked as analyze checks an image; nothing else is read. Both
    analyze and the studio's `GET /image?url=` read URLs through here."""
    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, "InvalidRequest", "no image URL given", "url")
    if not image_root:
        raise ApiError(400, "InvalidImageUrl", "this hub has no --image-root, so it reads no image URLs; send the "
                       "image itself (application/octet-stream)", "url")
    root = Path(image_root)
    try:
        path = Path(locate(url, root, root, confined=True))
    except Refused as exc:
        raise ApiError(400, "InvalidImageUrl", str(exc), "url") from None
    if not path.is_file():
        raise ApiError(400, "InvalidImageUrl", f"{url[:200]}: no such file under the hub's --image-root", "url")
    try:
        check_bytes(path.stat().st_size, limits)  # before reading it
    except ImageError as exc:
        raise ApiError(400, "InvalidImageSize", str(exc), "url") from None
    return _probed(path.read_bytes(), limits)


def _model_name(request: Request) -> str:
    name = request.query_params.get("model-name") or request.query_params.get("model-version")
    if name:
        return resource_name(name, "model-name", "model")
    if request.query_params.get("features"):
        raise ApiError(400, "InvalidRequest", "this hub answers custom models only: give ?model-name=")
    raise ApiError(400, "InvalidRequest", "Either 'features' or 'model-name' needs to be specified in the query "
                   "parameter.")


async def analyze(service: Any, request: Request) -> JSONResponse:
    mid = await service.catalog.served(_model_name(request))
    limits = service.limits.image
    body = await read_body(request, limits.max_bytes + 4096,
                           lambda: ApiError(413, "InvalidImageSize", f"the body is over {limits.max_bytes / 2**20:g} MB"))
    if "json" in request.headers.get("content-type", ""):
        url = field(read_json(body), "url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "InvalidRequest", 'a JSON body must be {"url": "..."}', "url")
        image = await asyncio.to_thread(url_image, url, service.config.image_root, limits)
    else:
        image = await asyncio.to_thread(_probed, body, limits)
    result = await service.models.options(multiplexed_model_id=mid).analyze.remote(image)
    if "error" in result:
        raise ApiError(500, "InternalServerError", result["error"]) if result["status"] >= 500 else \
            ApiError(400, "InvalidImage", result["error"])
    version = request.query_params.get("api-version") or "2023-02-01-preview"
    return JSONResponse(analyze_answer(result["task"], result["answer"], image.width, image.height, version))


async def image(service: Any, request: Request) -> Response:
    """GET /image?url=URL: the bytes of the image `{"url": URL}` would make analyze read, as they are (the studio
    draws on them and scores them as a dropped file)."""
    found = await asyncio.to_thread(url_image, request.query_params.get("url"), service.config.image_root,
                                    service.limits.image)
    return Response(found.data, media_type=_media_type(found.data), headers=IMAGE_HEADERS)


def _media_type(body: bytes) -> str:
    with Image.open(io.BytesIO(body)) as picture:
        return Image.MIME.get(picture.format or "", "application/octet-stream")


async def automl(service: Any, request: Request, route: str) -> JSONResponse:
    """`/score` and `/invocations` with the model named by the `azureml-model-deployment` header or `?model=`:
    the body read within `visionserve serve`'s limits, then read and answered by the model's replica."""
    name = request.headers.get(MODEL_HEADER) or request.query_params.get("model")
    if not name:
        raise RequestError(400, "invalid_request", f"name the model: the {MODEL_HEADER} header or ?model=NAME "
                           "(GET /models lists them)", [{"field": MODEL_HEADER}])
    name = resource_name(name, MODEL_HEADER, "model")
    mid = await service.catalog.served(name)
    body = await read_body(request, service.limits.max_request_bytes, request_too_large(service.limits))
    status, answer, headers = await service.models.options(multiplexed_model_id=mid).score.remote(
        body, route, request.query_params.get("partial"))
    if status != 200:
        raise RequestError.from_body(status, answer, headers)
    return JSONResponse(answer if route == "score" else {"predictions": answer}, headers=headers)
