"""The one scoring core behind every surface that scores: `visionserve serve`, the hub's `/score`, `/invocations`
and analyze, the MLflow pyfunc, batch scoring. HTTP-free (as MLflow's `invocations`): the apps read bodies at
the edge (serving.edge) and call it; the pyfunc and batch scoring call it directly.

    body → JSON → shape → image count → settings (validated once: the frozen settings object, also the batch
    key) → base64 → each image's header read once (`Probed`) → explanation wishes validated once → score (the
    surface's batcher, or here and now) → format → errors mapped one way

A refused image (bad base64, header, size) fails the request with a 400 naming it, unless the request is
`partial` (the pyfunc and batch scoring always are), where it becomes that row's error object. Found only when
scored: a 400 too, or a 500 when the model itself failed on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.data.formats import MAX_PREDICTION_BYTES, ImageLimits
from models.data.images import Probed
from models.errors import ErrorCode, ImageError, SettingsError
from models.values import to_flag
from serving.contract import (
    Entry,
    RawEntry,
    RequestError,
    Route,
    ScoringRequest,
    parse_entry,
    parse_json,
    probed,
    request_rows,
    row_error,
)
from serving.parameters import explanation_wishes, parameter_error, wishes_refused
from serving.predictor import Predictor

MB = 2**20

# How a surface scores one plain image (its batcher) and explains some (its admission): async, in input order.
ScoreOne = Callable[[Predictor, Probed, Any, int], Awaitable[dict]]
ExplainSome = Callable[[Predictor, list[Probed | ImageError], list[Any], Any, list[int]], Awaitable[list[dict]]]


@dataclass(frozen=True)
class ScoringLimits:
    """What one request may be and how a replica batches and explains: the same flags on `visionserve serve` and
    `visionserve hub` (serving.cli.flags.add_scoring_flags)."""

    max_request_mb: float = 100.0
    max_images_per_request: int = 64
    max_image_mb: float = MAX_PREDICTION_BYTES / MB
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_concurrent_explanations: int = 1
    max_waiting_explanations: int = 4
    explanation_timeout_s: float = 90.0

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(max_bytes=int(self.max_image_mb * MB))

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MB)


def partial_flag(value: str | bool | None) -> bool:
    """`?partial=` as the client gave it (absent: false), read as every yes/no value is (models.values.to_flag)."""
    if value is None:
        return False
    try:
        return to_flag(value)
    except ValueError:
        raise RequestError(400, ErrorCode.INVALID_PARAMETER, f"partial={str(value)[:40]!r}: expected true or false",
                           [{"field": "partial"}]) from None


def request_too_large(limits: ScoringLimits) -> Callable[[], RequestError]:
    """The refusal of a body over `max_request_mb` (serving.edge.read_body raises it while reading)."""
    return lambda: RequestError(413, ErrorCode.REQUEST_TOO_LARGE,
                                f"the request body is over {limits.max_request_mb:g} MB (max_request_mb)")


class Scoring:
    """One model's requests: read and validated once, answered in input order."""

    def __init__(self, predictor: Predictor, limits: ScoringLimits = ScoringLimits()):
        self.predictor, self.limits = predictor, limits
        self._image_limits = predictor.limits  # what one image may be: what the predictor decodes

    # ------------------------------------------------------------------ reading

    def read(self, body: bytes, route: Route, *, partial: str | bool | None = None) -> ScoringRequest:
        """A `/score` or `/invocations` body (already capped by the edge) and its `?partial=` as given. CPU work:
        apps run it off their loop."""
        flag = partial_flag(partial)
        entries, params = request_rows(parse_json(body), route, self.limits.max_images_per_request)
        return self._request(entries, params, flag)

    def read_rows(self, rows: Sequence[Any], params: Mapping[str, Any] | None = None) -> ScoringRequest:
        """The pyfunc's image column: base64 strings or explanation entries (JSON strings), each row answered."""
        return self._request([parse_entry(row, f"row {i}") for i, row in enumerate(rows)], params, True)

    def read_images(self, items: Sequence[bytes | ImageError], params: Mapping[str, Any] | None = None,
                    fields: Sequence[str] | None = None) -> ScoringRequest:
        """Encoded images (or the error each already has: batch scoring's unreadable files), each answered."""
        names = fields or [f"row {i}" for i in range(len(items))]
        return self._request([RawEntry(f, item) for f, item in zip(names, items)], params, True)

    def _request(self, raw: Sequence[RawEntry], params: Mapping[str, Any] | None, partial: bool) -> ScoringRequest:
        try:
            settings = self.predictor.settings_for(params)
        except SettingsError as exc:
            raise parameter_error(exc) from None
        wishes = explanation_wishes(raw, self.predictor.explains, self.predictor.task.name)
        refusal = None if partial else wishes_refused(raw, wishes)
        if refusal is not None:
            raise refusal
        request = ScoringRequest(tuple(Entry(r.field, w, None) if isinstance(w, ImageError) else
                                       Entry(r.field, probed(r.data, self._image_limits), w)
                                       for r, w in zip(raw, wishes)), settings, partial)
        refused = request.refused()
        if refused and not partial:
            raise RequestError(400, ErrorCode.INVALID_IMAGE, f"{len(refused)} of {len(raw)} images cannot be scored "
                               "(add ?partial=true to score the others)", refused)
        return request

    # ------------------------------------------------------------------ answering

    async def answer(self, request: ScoringRequest, score: ScoreOne, explain: ExplainSome) -> list[dict]:
        """One answer per entry, in order: plain images through `score` (the surface's batcher), explanation
        entries through `explain` (its admission)."""
        entries, predictor, settings = request.entries, self.predictor, request.settings
        plain, wished = request.plain(), request.explained()
        jobs: list[Awaitable] = [score(predictor, entries[i].image, settings, i) for i in plain]
        if wished:
            jobs.append(explain(predictor, [entries[i].image for i in wished], [entries[i].xai for i in wished],
                                settings, wished))
        results = await asyncio.gather(*jobs)
        explained = results.pop() if wished else []
        return self._ordered(request, {**dict(zip(plain, results)), **dict(zip(wished, explained))})

    def answer_now(self, request: ScoringRequest, *, rows: Sequence[int] | None = None, stop=None) -> list[dict]:
        """The same answers, computed here and now on this thread (the pyfunc, batch scoring, in-process use);
        `rows`: the row numbers error objects name (default: the entries' places)."""
        entries, predictor, settings = request.entries, self.predictor, request.settings
        rows = rows if rows is not None else range(len(entries))
        plain, wished = request.plain(), request.explained()
        answers = dict(zip(plain, predictor.score([entries[i].image for i in plain], settings,
                                                  [rows[i] for i in plain])))
        if wished:
            answers.update(zip(wished, predictor.explain([entries[i].image for i in wished],
                                                         [entries[i].xai for i in wished], settings,
                                                         [rows[i] for i in wished], stop)))
        return self._ordered(request, answers, rows)

    @staticmethod
    def _ordered(request: ScoringRequest, answers: dict[int, dict], rows: Sequence[int] | None = None) -> list[dict]:
        """Every entry's answer in input order (a refused image: its error row); a request that is not partial
        fails as a whole when any image failed once scored."""
        rows = rows if rows is not None else range(len(request.entries))
        out = [answers[i] if i in answers else row_error(rows[i], e.image) for i, e in enumerate(request.entries)]
        failed = [{"field": request.entries[i].field, "index": i, "code": a["error"]["code"],
                   "message": a["error"]["message"]} for i, a in enumerate(out) if "error" in a]
        if failed and not request.partial:
            ours = any(d["code"] == ErrorCode.INFERENCE_FAILED for d in failed)
            raise RequestError(500 if ours else 400, ErrorCode.INTERNAL_ERROR if ours else ErrorCode.INVALID_IMAGE,
                               f"{len(failed)} of {len(out)} images could not be scored (add ?partial=true to get "
                               "the others' answers)", failed)
        return out

    # ------------------------------------------------------------------ in-process conveniences

    def score_rows(self, rows: Sequence[Any], params: Mapping[str, Any] | None = None) -> list[dict]:
        return self.answer_now(self.read_rows(rows, params))

    def score_bytes(self, items: Sequence[bytes | ImageError], params: Mapping[str, Any] | None = None) -> list[dict]:
        return self.answer_now(self.read_images(items, params))

    def score_files(self, paths: Sequence[str | Path], params: Mapping[str, Any] | None = None,
                    chunk: int = 32) -> list[dict]:
        """Image files, `chunk` read and held at a time (a missing, special or too large file is its row's error)."""
        from serving.batch.inputs import read_image

        out: list[dict] = []
        for start in range(0, len(paths), chunk):
            read = [read_image(str(p), self._image_limits.max_bytes) for p in paths[start:start + chunk]]
            items = [ImageError(code, message) if code else data for code, message, data in read]
            request = self.read_images(items, params, [str(p) for p in paths[start:start + chunk]])
            out += self.answer_now(request, rows=range(start, start + len(items)))
        return out
