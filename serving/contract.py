"""Request bodies of the online endpoint → image rows and parameters, with errors naming the field.

`POST /score` takes the cloud's `{"input_data": {"columns": ["image"], "data": [...]}}`;
`POST /invocations` takes MLflow's `dataframe_split`, `dataframe_records`, `instances` and
`inputs`. Both may carry `"params"` (per-request inference settings). A `data` entry may also be a
JSON string `{"image_base64": ..., "model_explainability": ..., "xai_parameters": {...}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from models.data.images import Limits, probe
from models.errors import ImageError
from models.tasks.fields import _to_bool
from serving.predictor import decode_base64


class RequestError(ValueError):
    """A request the endpoint refuses: HTTP `status`, and one detail per offending field or image."""

    def __init__(self, status: int, code: str, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.details, self.headers = status, code, details or [], headers or {}

    def body(self, request_id: str | None = None) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.details:
            error["details"] = self.details
        if request_id:
            error["request_id"] = request_id
        return {"error": error}


@dataclass
class Entry:
    """One image of a request: where it was (field), its bytes or why not, explanation wishes."""

    field: str
    data: bytes | ImageError
    explain: bool = False
    xai_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParsedRequest:
    entries: list[Entry]
    params: dict[str, Any]


def _require(condition: bool, field_name: str, message: str, status: int = 422) -> None:
    if not condition:
        raise RequestError(status, "invalid_request", f"{field_name}: {message}", [{"field": field_name, "message": message}])


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "malformed_json", f"the request body is not valid JSON ({exc})") from None


def _params(doc: dict) -> dict[str, Any]:
    params = doc.get("params") or {}
    _require(isinstance(params, dict), "params", "expected an object of inference settings")
    return params


def parse_entry(value: Any, field_name: str) -> Entry:
    """A base64 string, or a JSON string with `image_base64` (+ explanation wishes)."""
    if isinstance(value, list) and len(value) == 1:  # a dataframe_split row: [image]
        value = value[0]
    if isinstance(value, dict) and "image" in value:  # a dataframe_records / instances record
        value = value["image"]
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            doc = json.loads(value)
        except json.JSONDecodeError as exc:
            return Entry(field_name, ImageError("invalid_input", f"not valid JSON ({exc.msg})"))
        if not isinstance(doc, dict) or not isinstance(doc.get("image_base64"), str):
            return Entry(field_name, ImageError("invalid_input", "a JSON entry needs an image_base64 string"))
        xai = doc.get("xai_parameters") or {}
        if not isinstance(xai, dict):
            return Entry(field_name, ImageError("invalid_input", "xai_parameters must be an object"))
        try:
            explain = _to_bool(doc.get("model_explainability", False))
        except ValueError:
            return Entry(field_name, ImageError("invalid_input", "model_explainability must be true or false"))
        return Entry(field_name, _bytes(doc["image_base64"]), explain, xai)
    return Entry(field_name, _bytes(value))


def _bytes(value: Any) -> bytes | ImageError:
    try:
        return decode_base64(value)
    except ImageError as exc:
        return exc


def parse_score(doc: Any) -> ParsedRequest:
    """The cloud's body: {"input_data": {"columns": ["image"], "data": [...]}, "params"?: {...}}."""
    _require(isinstance(doc, dict), "body", "expected a JSON object with input_data")
    _require("input_data" in doc, "input_data", "missing (expected {\"columns\": [\"image\"], \"data\": [...]})")
    data = doc["input_data"]
    _require(isinstance(data, dict), "input_data", "expected an object with columns and data")
    columns = data.get("columns")
    _require(isinstance(columns, list), "input_data.columns", "missing or not a list (expected [\"image\"])")
    _require(columns == ["image"], "input_data.columns", f"expected [\"image\"], got {json.dumps(columns)[:100]}")
    rows = data.get("data")
    _require(isinstance(rows, list), "input_data.data", "missing or not a list of base64 images")
    _require(len(rows) > 0, "input_data.data", "is empty")
    return ParsedRequest([parse_entry(v, f"input_data.data[{i}]") for i, v in enumerate(rows)], _params(doc))


def parse_invocations(doc: Any) -> ParsedRequest:
    """MLflow's scoring-server formats with one `image` column."""
    _require(isinstance(doc, dict), "body", "expected a JSON object (dataframe_split, dataframe_records, "
                                            "instances or inputs)")
    keys = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in doc]
    _require(len(keys) == 1, "body", "expected exactly one of dataframe_split, dataframe_records, instances, inputs")
    key, value = keys[0], doc[keys[0]]
    if key == "dataframe_split":
        _require(isinstance(value, dict), key, "expected {\"columns\": [\"image\"], \"data\": [[...]]}")
        _require(value.get("columns") == ["image"], f"{key}.columns", "expected [\"image\"]")
        rows = value.get("data")
        _require(isinstance(rows, list) and rows, f"{key}.data", "missing, empty or not a list")
    elif key == "dataframe_records":
        _require(isinstance(value, list) and value, key, "expected a non-empty list of {\"image\": ...} records")
        rows = value
    elif isinstance(value, dict):
        _require(list(value) == ["image"], key, "expected {\"image\": [...]}")
        rows = value["image"] if isinstance(value["image"], list) else [value["image"]]
    else:
        _require(isinstance(value, list) and value, key, "expected a non-empty list")
        rows = value
    return ParsedRequest([parse_entry(v, f"{key}[{i}]") for i, v in enumerate(rows)], _params(doc))


def check_images(request: ParsedRequest, limits: Limits, max_images: int) -> list[dict]:
    """Header-check every image (no decoding); returns one detail per bad image."""
    count = len(request.entries)
    if count > max_images:
        raise RequestError(413, "too_many_images", f"{count} images in one request; at most {max_images}")
    details = []
    for index, entry in enumerate(request.entries):
        try:
            if isinstance(entry.data, ImageError):
                raise entry.data
            probe(entry.data, limits)
        except ImageError as exc:
            entry.data = exc
            details.append({"field": entry.field, "index": index, "code": exc.code, "message": str(exc)})
    return details
