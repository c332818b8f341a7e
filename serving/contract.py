"""The request contract of the online endpoint: body schemas (pydantic, shown at `/docs`), parsing and
validation, per-request settings, and the error bodies that name the offending field or image.

`POST /score` takes the cloud's `{"input_data": {"columns": ["image"], "data": [...]}}`;
`POST /invocations` takes MLflow's `dataframe_split`, `dataframe_records`, `instances` and
`inputs`. Both may carry `"params"` (per-request inference settings). A `data` entry is a base64
image or a JSON string `{"image_base64": ..., "model_explainability": ..., "xai_parameters": {...}}`.
Everything here is synchronous and CPU-bound: the app runs it off its event loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema

from explain.params import XaiParameters as xai
from models.data.formats import ImageLimits
from models.data.images import Probed
from models.errors import ErrorCode, ImageError
from models.tasks.fields import Flag
from models.tasks.registry import request_params
from serving.edge import EdgeError

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_IMAGE = "a base64 image (standard or URL-safe, newlines allowed), or a JSON string of an ExplanationEntry"


class RequestError(EdgeError):
    """A scoring request refused: HTTP `status`, and one detail per offending field or image. Worded the same on
    every app that scores (`visionserve serve`, the hub's `/score` and `/invocations`)."""

    def __init__(self, status: int, code: ErrorCode, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, ErrorCode(code), message, headers)
        self.details = details or []

    def body(self, request_id: str | None = None) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    @classmethod
    def from_body(cls, status: int, body: Mapping[str, Any], headers: dict[str, str] | None = None) -> RequestError:
        """The refusal another process worded (a hub model replica's), to be answered here."""
        error = body["error"]
        return cls(status, error["code"], error["message"], error.get("details"), headers)

# ---------------------------------------------------------------- the bodies, as documented at /docs


def _one_image_column(columns: list[str]) -> list[str]:
    if columns != ["image"]:
        raise ValueError(f'expected ["image"], got {json.dumps(columns)[:100]}')
    return columns


ImageColumns = Annotated[list[str], AfterValidator(_one_image_column), Field(description='exactly ["image"]')]


class _Body(BaseModel):
    """A top-level body: an unknown key is refused by name (a misspelt `params` would be lost otherwise)."""

    model_config = ConfigDict(extra="forbid")


class InputData(BaseModel):
    columns: ImageColumns
    data: list[Any] = Field(min_length=1, description=f"one entry per image: {_IMAGE}",
                            json_schema_extra={"items": {"type": "string"}})


def _params_field() -> Any:
    return Field(None, description="per-request inference settings (the model's settings.json otherwise); which "
                                   "ones depends on the model's task", json_schema_extra={"anyOf": [
                                       {"$ref": f"#/components/schemas/{name}"} for name in request_params()]})


_PARAMS = _params_field()


class ScoreRequest(_Body):
    """`POST /score`: the cloud's online-endpoint body (scoring.md)."""

    input_data: InputData = Field(examples=[{"columns": ["image"], "data": ["<base64>"]}])
    params: dict[str, Any] | None = _PARAMS


class DataframeSplit(BaseModel):
    columns: ImageColumns
    data: list[Any] = Field(min_length=1, description=f"one row per image, [image]: {_IMAGE}")


class ImageColumn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: Any = Field(description=f"{_IMAGE}; a list of them for instances / inputs")


class InvocationsRequest(_Body):
    """`POST /invocations`: MLflow's scoring-server formats, with exactly one of the four keys."""

    dataframe_split: DataframeSplit | None = None
    dataframe_records: list[Any] | None = Field(None, min_length=1, description='[{"image": ...}, ...]')
    instances: list[Any] | ImageColumn | None = Field(None, description='[image, ...] or {"image": [...]}')
    inputs: list[Any] | ImageColumn | None = Field(None, description='[image, ...] or {"image": [...]}')
    params: dict[str, Any] | None = _PARAMS

    @model_validator(mode="after")
    def _exactly_one_format(self) -> InvocationsRequest:
        given = [k for k in _FORMATS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of dataframe_split, dataframe_records, instances, inputs")
        if isinstance(self.instances or self.inputs, list) and not (self.instances or self.inputs):
            raise ValueError(f"{given[0]}: expected a non-empty list")
        return self


_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class ExplanationEntry(BaseModel):
    """A `data` entry asking for an explanation, sent as a JSON *string* (scoring.md, Explanations)."""

    image_base64: str = Field(description="the image, base64")
    model_explainability: Flag = Field(False, description="explain (true) or only score")
    xai_parameters: dict[str, Any] | None = Field(None, description="see XaiParameters")


_ENTRY_ERRORS = {"image_base64": "a JSON entry needs an image_base64 string",
                 "model_explainability": "model_explainability must be true or false",
                 "xai_parameters": "xai_parameters must be an object"}


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    request_id: str | None = None
    details: list[dict[str, Any]] | None = Field(None, description="one per offending field or image: field, "
                                                                   "index, code, message")


class ErrorResponse(BaseModel):
    error: ErrorBody


def openapi_components() -> dict[str, Any]:
    """Component schemas of the bodies, the per-task request params (per-request settings only, one schema per
    task family of the registry) and the xai parameters, for the app's OpenAPI document."""
    params = request_params()
    _, schemas = models_json_schema([(m, "validation") for m in (ScoreRequest, InvocationsRequest,
                                                                 ExplanationEntry, ErrorResponse, xai)],
                                    ref_template="#/components/schemas/{model}")
    components = schemas["$defs"]
    components["ExplanationEntry"]["properties"]["xai_parameters"] = {"$ref": f"#/components/schemas/{xai.__name__}"}
    for name, cls in params.items():
        full = cls.model_json_schema()
        keep = {k: {**v, "default": None} for k, v in full["properties"].items()
                if v.get("inference") and v.get("per_request", True)}
        for prop in keep.values():
            prop.pop("inference", None)
            prop.pop("title", None)
        components[name] = {"type": "object", "properties": keep, "additionalProperties": False,
                            "description": f"per-request settings of {name.removesuffix('Params').lower()} models "
                                           "(unset: the model's settings.json)"}
    return components

# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Entry:
    """One image of a request, as read once: where it was (field), its bytes with their header read (`Probed`)
    or why not (`ImageError`), and its explanation wishes (validated XaiParameters) when it asks for one."""

    field: str
    image: Probed | ImageError
    xai: Any = None


@dataclass(frozen=True)
class ScoringRequest:
    """A request validated once: its entries, the settings in force (the frozen settings object, which is also
    the batch key: images under equal settings share forward passes) and whether refused images become error
    rows (`partial`) rather than failing the request."""

    entries: tuple[Entry, ...]
    settings: Any
    partial: bool = False

    def plain(self) -> list[int]:
        """The entries to score (their image readable, no explanation asked for)."""
        return [i for i, e in enumerate(self.entries) if isinstance(e.image, Probed) and e.xai is None]

    def explained(self) -> list[int]:
        """The entries to explain (their image readable)."""
        return [i for i, e in enumerate(self.entries) if isinstance(e.image, Probed) and e.xai is not None]

    def refused(self) -> list[dict]:
        """One detail per entry that cannot be scored (its bytes or header were refused)."""
        return [{"field": e.field, "index": i, "code": e.image.code, "message": str(e.image)}
                for i, e in enumerate(self.entries) if isinstance(e.image, ImageError)]


@dataclass(frozen=True)
class RawEntry:
    """An entry as the body has it: bytes (base64 decoded) or why not, and its explanation wishes, unchecked."""

    field: str
    data: bytes | ImageError
    explain: bool = False
    xai_parameters: Mapping[str, Any] | None = None


Route = Literal["score", "invocations"]


def decode_base64(text: Any) -> bytes:
    """Standard or URL-safe base64, with or without the newlines `base64.encodebytes` inserts."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise ImageError(ErrorCode.INVALID_INPUT, f"expected a base64 string, got {type(text).__name__}")
    cleaned = _WHITESPACE.sub("", _DATA_URL.sub("", text.strip()))
    if not cleaned:
        raise ImageError(ErrorCode.INVALID_BASE64, "empty image string")
    cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(ErrorCode.INVALID_BASE64, "not valid base64") from None


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, ErrorCode.MALFORMED_JSON, f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError(400, ErrorCode.MALFORMED_JSON, "the request body is nested too deeply") from None


_WORDS = {"missing": "missing", "list_type": "expected a list", "dict_type": "expected an object",
          "model_type": "expected an object", "model_attributes_type": "expected an object",
          "too_short": "is empty", "extra_forbidden": "unknown field", "string_type": "expected a string"}


def _shape_error(exc: ValidationError, cls: type[BaseModel]) -> RequestError:
    """pydantic's errors as our 422: each detail names the field by its JSON path."""
    details = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith(("list[", "ImageColumn", "DataframeSplit"))]
        name = ".".join(loc) or "body"
        message = str(e["ctx"]["error"]) if e["type"] == "value_error" else _WORDS.get(e["type"], e["msg"])
        if e["type"] == "missing" and loc and loc[-1] == "input_data":
            message = 'missing (expected {"columns": ["image"], "data": [...]})'
        if e["type"] == "model_type" and not loc:
            message = f"expected a JSON object ({', '.join(cls.model_fields)})"
        details.append({"field": name, "message": message})
    unique = list({d["field"]: d for d in details}.values())
    return RequestError(422, ErrorCode.INVALID_REQUEST, "; ".join(f"{d['field']}: {d['message']}" for d in unique),
                        unique)


def _rows(doc: Any, route: Route) -> tuple[str, list[Any], dict[str, Any]]:
    """(field name of the rows, the rows, params) of a body of `route`, its shape checked."""
    cls = ScoreRequest if route == "score" else InvocationsRequest
    try:
        body = cls.model_validate(doc)
    except ValidationError as exc:
        raise _shape_error(exc, cls) from None
    params = body.params or {}
    if isinstance(body, ScoreRequest):
        return "input_data.data", body.input_data.data, params
    key = next(k for k in _FORMATS if getattr(body, k) is not None)
    value = getattr(body, key)
    if key == "dataframe_split":
        return f"{key}.data", value.data, params
    if isinstance(value, ImageColumn):
        return key, value.image if isinstance(value.image, list) else [value.image], params
    return key, value, params


def _field(prefix: str, i: int) -> str:
    return f"{prefix}[{i}]"


def parse_entry(value: Any, field_name: str) -> RawEntry:
    """A base64 string, or a JSON string with `image_base64` (+ explanation wishes)."""
    if isinstance(value, list) and len(value) == 1:  # a dataframe_split row: [image]
        value = value[0]
    if isinstance(value, dict) and "image" in value:  # a dataframe_records / instances record
        value = value["image"]
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            entry = ExplanationEntry.model_validate_json(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            message = _ENTRY_ERRORS.get(str(first["loc"][0]) if first["loc"] else "",
                                        f"not valid JSON ({first['msg']})")
            return RawEntry(field_name, ImageError(ErrorCode.INVALID_INPUT, message))
        return RawEntry(field_name, _bytes(entry.image_base64), entry.model_explainability, entry.xai_parameters)
    return RawEntry(field_name, _bytes(value))


def _bytes(value: Any) -> bytes | ImageError:
    try:
        return decode_base64(value)
    except ImageError as exc:
        return exc


def request_rows(doc: Any, route: Route, max_images: int | None = None) -> tuple[list[RawEntry], dict[str, Any]]:
    """A decoded JSON body → its entries (decoded from base64, or the error of each) and params; the shape is
    checked first, then the image count (before any image is decoded)."""
    prefix, rows, params = _rows(doc, route)
    check_count(len(rows), max_images)
    return [parse_entry(v, _field(prefix, i)) for i, v in enumerate(rows)], params


def check_count(count: int, max_images: int | None) -> None:
    if max_images is not None and count > max_images:
        raise RequestError(413, ErrorCode.TOO_MANY_IMAGES, f"{count} images in one request; at most {max_images}")


def probed(data: bytes | ImageError, limits: ImageLimits) -> Probed | ImageError:
    """The image's header read and checked once (`Probed`), or why it cannot be scored."""
    if isinstance(data, ImageError):
        return data
    try:
        return Probed.of(data, limits)
    except ImageError as exc:
        return exc


def row_error(row: int, exc: ImageError) -> dict:
    """The response entry of an image that could not be scored (its neighbours still are)."""
    return {"error": {"row": row, "code": exc.code, "message": f"image {row}: {exc}"}}
