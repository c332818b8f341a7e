"""The Image Analysis 4.0 API's conventions (`/work/shared/spec/image-analysis.md`, "Common rules"): bodies
read leniently (keys in any case, a trailing comma), errors as `{"error": {code, message, target}}` with
`x-ms-error-code`, paging with `skip` / `top`, and the answers of `imageanalysis:analyze`."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from serving.edge import EdgeError, read_body

API_VERSIONS = ("2023-02-01-preview", "2023-04-01-preview", "2023-10-01")
NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]*")
MAX_NAME = 255
MAX_BODY = 1 << 20  # a dataset, model or evaluation body; images go to analyze (6 MB)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


class ApiError(EdgeError):
    """An answer other than 2xx, in the API's error format: `{"error": {code, message, target}}` and the code in
    `x-ms-error-code`."""

    def __init__(self, status: int, code: str, message: str, target: str | None = None):
        super().__init__(status, code, message, {"x-ms-error-code": code})
        self.target = target

    def __reduce__(self):
        """Pickled whole (its headers too): HubJobs hands a refusal to the ingress as a value (serving.hub.owner)."""
        return ApiError, (self.status, self.code, self.message, self.target), {"headers": self.headers}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message}
        if self.target:
            error["target"] = self.target
        return {"error": error}


def not_found(what: str, name: str, code: str = "NotFound") -> ApiError:
    return ApiError(404, code, f"{what} {name!r} does not exist", name)


def resource_name(value: Any, field_name: str, what: str) -> str:
    """The one name rule (image-analysis.md): a dataset, model or evaluation name from a path, query, header or
    body field is 1-255 letters, digits, '.', '_' or '-', starting with a letter or digit; a 400 naming the field
    otherwise, before the store or the registry is touched."""
    if isinstance(value, str) and 0 < len(value) <= MAX_NAME and NAME.fullmatch(value):
        return value
    shown = repr(value[:80]) if isinstance(value, str) else f"a {type(value).__name__}"
    raise ApiError(400, "InvalidArgument", f"{field_name}: {what} name {shown} is not valid: 1-{MAX_NAME} "
                   "characters, letters, digits, '.', '_' or '-', starting with a letter or digit", field_name)


def too_large() -> ApiError:
    return ApiError(413, "InvalidRequest", f"the body is over {MAX_BODY // 1024} KB")


async def json_body(request: Request) -> dict[str, Any]:
    """A dataset, model or evaluation body: read up to MAX_BODY (serving.edge.read_body), then `read_json`."""
    return read_json(await read_body(request, MAX_BODY, too_large))


def read_json(raw: bytes) -> dict[str, Any]:
    """A JSON object body (a trailing comma tolerated, as the docs' own examples have); keys keep their case.
    Anything JSON cannot read (bad syntax, nesting too deep, an integer of thousands of digits) is a 400."""
    if len(raw) > MAX_BODY:
        raise too_large()
    text = raw.decode("utf-8", errors="replace").strip() or "{}"
    try:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = json.loads(_TRAILING_COMMA.sub(r"\1", text))
    except RecursionError:
        raise ApiError(400, "InvalidRequest", "the body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int()'s digit limit
        raise ApiError(400, "InvalidRequest", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "InvalidRequest", "the body must be a JSON object")
    return doc


def field(doc: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """`doc[name]` with the key matched without regard to case (`TrainingParameters`, `trainingParameters`)."""
    wanted = name.lower()
    for key, value in doc.items():
        if isinstance(key, str) and key.lower() == wanted:
            return value
    return default


def section(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = field(doc, name, {}) or {}
    if not isinstance(value, dict):
        raise ApiError(400, "InvalidRequest", f"{name} must be a JSON object", name)
    return value


async def check_api_version(request: Request) -> None:  # a coroutine: no thread pool hop (serving.access)
    version = request.query_params.get("api-version")
    if version is not None and version not in API_VERSIONS:
        raise ApiError(400, "UnsupportedApiVersion", f"api-version {version!r} is not supported; use one of "
                       f"{', '.join(API_VERSIONS)}", "api-version")


def page(items: Sequence[dict[str, Any]], request: Request) -> dict[str, Any]:
    """`{"value": [...], "nextLink"?}` for `skip` (default 0) and `top` (default 10, at most 30)."""
    try:
        skip = int(request.query_params.get("skip", 0))
        top = int(request.query_params.get("top", 10))
    except ValueError:
        raise ApiError(400, "InvalidRequest", "skip and top must be integers") from None
    if skip < 0 or not 1 <= top <= 30:
        raise ApiError(400, "InvalidRequest", "skip must be >= 0 and top in 1..30", "top" if skip >= 0 else "skip")
    out: dict[str, Any] = {"value": list(items[skip:skip + top])}
    if skip + top < len(items):
        query = dict(request.query_params) | {"skip": str(skip + top), "top": str(top)}
        out["nextLink"] = str(request.url.replace_query_params(**query))
    return out


def public(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored record as the API answers it: private keys (leading `_`) dropped, `authentication.kind: none`
    not echoed (the sample client crashes on it)."""
    out = {k: v for k, v in record.items() if not k.startswith("_")}
    auth = out.get("authentication")
    if isinstance(auth, dict) and str(auth.get("kind", "")).lower() == "none":
        out.pop("authentication")
    return out


def no_content() -> Response:
    return Response(status_code=204)


def analyze_answer(task: str, answer: Mapping[str, Any], width: int, height: int, version: str) -> dict[str, Any]:
    """A visionserve response → `customModelResult`: tags by confidence, or objects with integer pixel boxes."""
    if task.startswith("image_classification"):
        values = sorted(({"name": n, "confidence": float(p)} for n, p in zip(answer["labels"], answer["probs"])),
                        key=lambda v: -v["confidence"])
        result: dict[str, Any] = {"tagsResult": {"values": values}}
    else:
        boxes = sorted(answer.get("boxes", []), key=lambda b: -b["score"])
        objects = []
        for i, b in enumerate(boxes, start=1):
            x0, y0 = round(b["box"]["topX"] * width), round(b["box"]["topY"] * height)
            x1, y1 = round(b["box"]["bottomX"] * width), round(b["box"]["bottomY"] * height)
            objects.append({"id": str(i), "boundingBox": {"x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0},
                            "tags": [{"name": b["label"], "confidence": float(b["score"])}]})
        result = {"objectsResult": {"values": objects}}
    return {"customModelResult": result, "modelVersion": version, "metadata": {"width": width, "height": height}}
