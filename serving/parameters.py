"""Per-request parameters, validated once: a request's `params` (the model's per-request settings) and each
explanation entry's `xai_parameters`; refusals name the parameter (`params.<name>`, `<entry>.xai_parameters.<name>`),
and `/metadata` describes both for a page to build its forms from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from explain.params import XaiParameters, parse_xai
from models.errors import ErrorCode, ImageError, SettingsError
from models.tasks.fields import form_of, is_per_request
from serving.contract import RawEntry, RequestError


def field_of(problem: str) -> str:
    """The parameter a settings problem names: "box_score_thresh=2: must be ..." → box_score_thresh."""
    return problem.split(":")[0].split("=")[0].split(" ")[0]


def parameter_error(exc: SettingsError, prefix: str = "params.", index: int | None = None) -> RequestError:
    """A 400 naming each refused parameter (`params.<name>`, or an entry's `...xai_parameters.<name>`)."""
    details = [{"field": f"{prefix}{field_of(p)}", "message": p, **({"index": index} if index is not None else {})}
               for p in exc.problems]
    return RequestError(400, ErrorCode.INVALID_PARAMETER, str(exc), details)


def per_request_problems(inference_cls: type[BaseModel], given: Mapping[str, Any]) -> list[str]:
    """Settings a request names that only the model's loading may set."""
    fields = inference_cls.model_fields
    return [f"{k}: set when the model loads (settings.json or --set), not per request"
            for k in given if k in fields and not is_per_request(fields[k])]


def explanation_wishes(entries: Sequence[RawEntry], explains: bool, task_name: str) -> list[Any]:
    """Per entry: None (plain scoring), its validated xai_parameters (explain.XaiParameters), or the ImageError
    that refuses its wish (the model does not explain; a parameter out of range, named)."""
    wishes: list[Any] = [None] * len(entries)
    for i, entry in enumerate(entries):
        if not entry.explain:
            continue
        if not explains:
            wishes[i] = ImageError(ErrorCode.EXPLANATIONS_UNSUPPORTED, "explanations are for classification models "
                                   f"only; this {task_name} model can only score (set model_explainability to false)")
            continue
        try:
            wishes[i] = parse_xai(entry.xai_parameters)
        except SettingsError as exc:
            wishes[i] = ImageError(ErrorCode.INVALID_XAI_PARAMETERS, "; ".join(exc.problems))
    return wishes


def wishes_refused(entries: Sequence[RawEntry], wishes: Sequence[Any]) -> RequestError | None:
    """The 400 of a request (not partial) whose explanation wishes are refused: every entry, when the model does
    not explain, else each parameter out of range, named by its field."""
    refused = [(i, w) for i, w in enumerate(wishes) if isinstance(w, ImageError)]
    if not refused:
        return None
    unsupported = [i for i, w in refused if w.code == ErrorCode.EXPLANATIONS_UNSUPPORTED]
    if unsupported:
        return RequestError(400, ErrorCode.EXPLANATIONS_UNSUPPORTED, str(refused[0][1]),
                            [{"field": entries[i].field, "index": i} for i in unsupported])
    details = [{"field": f"{entries[i].field}.{field_of(p)}", "index": i, "message": f"image {i}: {p}"}
               for i, w in refused for p in str(w).split("; ")]
    return RequestError(400, ErrorCode.INVALID_PARAMETER, "; ".join(d["message"] for d in details), details)


def parameter_forms(inference_cls: type[BaseModel], settings: BaseModel, explains: bool) -> dict[str, Any]:
    """What `/metadata` says of the parameters a request may send, for a page to build its forms from: the
    per-request settings (the model's values as defaults) and, for classifiers, the xai_parameters."""
    return {"parameters": form_of(inference_cls, settings, keep=is_per_request),
            "xai_parameters": form_of(XaiParameters) if explains else []}
