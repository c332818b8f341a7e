"""The online endpoint: a Ray Serve deployment with a FastAPI ingress.

Routes: `POST /score` (the cloud's `input_data` body), `POST /invocations` (MLflow's formats),
`GET /health/live`, `GET /health/ready`, `GET /metadata`, OpenAPI at `/docs`, the studio page at `/studio`. Images of
concurrent requests share forward passes through `@serve.batch`; each answer goes back to its
own request in input order. Over capacity, Ray Serve itself answers 429 with Retry-After
(`max_ongoing_requests` per replica, `max_queued_requests` waiting).

Explanation entries (`model_explainability: true`) bypass the batcher: they run on the
predictor's private model copy, at most `max_concurrent_explanations` at a time per replica,
`max_waiting_explanations` more waiting (then 429), each request given `explanation_timeout_s`
(then 504), so plain scoring requests keep being answered meanwhile.
"""


import asyncio
import functools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from models.data.formats import PREDICTION_LIMITS, ImageLimits
from models.errors import ErrorCode, ImageError, SettingsError
from models.runtime import torch_thread
from serving.access import key_matches, read_key_file, request_id_of
from serving.admission import Admission, Busy, TimedOut
from serving.backends import BACKENDS
from serving.contract import (
    ParsedRequest, RequestError, Route, check_xai, openapi_components, parameter_error, parse_json,
    parse_request, probe_images,
)
from serving.studio import add_studio

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServiceConfig:
    """What a replica needs: the model, deploy-time settings, limits, batching, the API key's hash."""

    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    api_key_sha256: str | None = None
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_request_mb: float = 100.0
    max_images_per_request: int = 64
    max_image_mb: float = PREDICTION_LIMITS.max_bytes / 2**20
    max_concurrent_explanations: int = 1
    max_waiting_explanations: int = 4
    explanation_timeout_s: float = 90.0
    compile: bool = True  # a classifier on the CPU is compiled when the replica starts (serving.compiled)
    backend: str = "auto"  # serving.backends: "onnx" scores the model.onnx on ONNX Runtime, "auto" where faster

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:  # a Serve config file's typo fails the deploy, not every replica
            raise SettingsError([f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}"], "serving config")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=int(self.max_image_mb * 2**20))


app = FastAPI(
    title="visionserve",
    description="Scoring endpoint for a visionserve model: the cloud's `input_data` schema on `/score`, "
                "MLflow's scoring formats on `/invocations`.",
)


def _openapi() -> dict[str, Any]:
    """FastAPI's document plus the request bodies, which the routes read themselves (size-capped, parsed
    off the event loop) and so do not declare as parameters."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from explain.params import XaiParameters
        from models.tasks.settings import ClassificationInference, DetectionInference, SegmentationInference

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        params = {"ClassificationParams": ClassificationInference, "DetectionParams": DetectionInference,
                  "SegmentationParams": SegmentationInference}
        schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components(params, XaiParameters))
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi
add_studio(app)


def _route_doc(body: str) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{body}"}}}},
        "responses": {status: {"description": text, **error} for status, text in (
            ("400", "malformed JSON, a refused image or parameter"), ("401", "API key missing or wrong"),
            ("413", "body or image count over the limits"), ("422", "a field of the body is missing or wrong"),
            ("429", "over capacity; see Retry-After"), ("504", "an explanation took too long"))}}


def _error(status: int, code: str, message: str, request: Request, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request.state.request_id}},
                        status, headers={**request.state.id_headers, **(headers or {})})


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _unkey(key: str) -> dict[str, Any]:
    return json.loads(key)



def _mlmodel(model_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except OSError:
        return {}


@serve.deployment(name="VisionService", max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, graceful_shutdown_timeout_s=20)
@serve.ingress(app)
class VisionService:
    """One replica: the model loaded once, requests batched across callers."""

    def __init__(self, config: dict[str, Any]):
        from ray.serve import metrics

        from serving.predictor import Predictor
        from serving.loading import resolve_model

        self.config = ServiceConfig(**config)
        self.model_dir = resolve_model(self.config.model)
        # the model loads and scores on the process's torch thread (see models.runtime), explanations on theirs
        self._model_thread = torch_thread()
        self._explain_threads = ThreadPoolExecutor(self.config.max_concurrent_explanations,
                                                   thread_name_prefix="visionserve-explain")
        self.predictor = self._model_thread.submit(Predictor.load, self.model_dir, overrides=self.config.overrides,
                                                   compile_scorer=self.config.compile, backend=self.config.backend,
                                                   limits=self.config.limits,
                                                   explainers=self.config.max_concurrent_explanations).result()
        self._score_images.set_max_batch_size(self.config.max_batch_size)
        self._score_images.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.images_total = metrics.Counter("visionserve_images_total", "Images scored", tag_keys=("route",))
        self.errors_total = metrics.Counter("visionserve_image_errors_total", "Images refused", tag_keys=("code",))
        self.model_seconds = metrics.Histogram("visionserve_model_seconds", "Seconds per model call",
                                               boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
        self.explain_seconds = metrics.Histogram("visionserve_explain_seconds", "Seconds per explanation request",
                                                 boundaries=[0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
        self.batch_images = metrics.Histogram("visionserve_batch_images", "Images per model call",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self._explanations = Admission(self.config.max_concurrent_explanations, self.config.max_waiting_explanations,
                                       self.config.explanation_timeout_s, self._explain_threads)
        self._scoring = 0  # requests with images to score, between admission and answer
        log.info("visionserve replica ready: %s (%s), %s scoring", self.predictor.spec.model_name,
                 self.predictor.spec.task.name, {"torch": "eager", "compiled": "compiled", "onnx": "ONNX Runtime"}[
                     self.predictor.backend])

    def check_health(self) -> None:
        """Ray Serve's probe: a replica whose model is gone is replaced."""
        if self.predictor is None:
            raise RuntimeError("model not loaded")

    # ------------------------------------------------------------------ batching

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_images(self, jobs: list[tuple[bytes, str, int]]) -> list[tuple[dict, int]]:
        """Images from any number of requests (bytes, params key, the image's row in its request); those with
        the same parameters share forward passes. Each answer comes back with the size of its model call."""
        groups: dict[str, list[int]] = {}
        for i, (_, params_key, _) in enumerate(jobs):
            groups.setdefault(params_key, []).append(i)
        answers: list[tuple[dict, int] | None] = [None] * len(jobs)
        for params_key, indices in groups.items():
            started = time.perf_counter()
            results = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, functools.partial(self.predictor.predict_bytes, [jobs[i][0] for i in indices],
                                                      _unkey(params_key), rows=[jobs[i][2] for i in indices]))
            self.model_seconds.observe(time.perf_counter() - started)
            self.batch_images.observe(len(indices))
            for i, result in zip(indices, results):
                answers[i] = (result, len(indices))
        return answers

    def _read(self, body: bytes, route: Route) -> tuple[ParsedRequest, list[dict], dict[int, Any]]:
        """Everything about a request that needs no model: its JSON and shape, the image count, the
        parameters, base64 and image headers, explanation wishes. CPU work: it runs off the event loop."""
        parsed = parse_request(parse_json(body), route, self.config.max_images_per_request)
        try:
            self.predictor.settings_for(parsed.params)
        except SettingsError as exc:
            raise parameter_error(exc) from None
        details = probe_images(parsed, self.config.limits)
        task = self.predictor.spec.task
        return parsed, details, check_xai(parsed.entries, task.is_classification, task.name)

    async def _answer(self, request: ParsedRequest, details: list[dict], wishes: dict[int, Any],
                      partial: bool) -> tuple[list[dict], dict[str, str]]:
        """One answer per entry, in order, and the headers that say how its images were batched."""
        for d in details:
            self.errors_total.inc(tags={"code": d["code"]})
        if details and not partial:
            raise RequestError(400, ErrorCode.INVALID_IMAGE, f"{len(details)} of {len(request.entries)} images "
                               "cannot be scored (add ?partial=true to score the others)", details)
        key = _key(request.params)
        good = [(i, e.data) for i, e in enumerate(request.entries)
                if not isinstance(e.data, ImageError) and i not in wishes]
        explained = [i for i in wishes if not isinstance(request.entries[i].data, ImageError)]
        jobs = [self._score_images((data, key, i)) for i, data in good]
        if explained:
            jobs.append(self._explain([request.entries[i].data for i in explained], [wishes[i] for i in explained],
                                      request.params, explained))
        scoring = 1 if good else 0
        self._scoring += scoring
        # a batch waits for more images only while another request is being scored: alone, it goes now
        wait = self.config.batch_wait_timeout_s if self._scoring > 1 else 0.0
        try:
            self._score_images.set_batch_wait_timeout_s(wait)
            results = await asyncio.gather(*jobs)
        finally:
            self._scoring -= scoring
        explanations = results.pop() if explained else []
        answers = {i: answer for (i, _), (answer, _) in zip(good, results)}
        answers.update(zip(explained, explanations))
        for d in details:
            answers[d["index"]] = {"error": {"row": d["index"], "code": d["code"], "message": d["message"]}}
        out = [answers[i] for i in range(len(request.entries))]
        failed = [{"field": request.entries[i].field, "index": i, "code": a["error"]["code"],
                   "message": a["error"]["message"]} for i, a in enumerate(out) if "error" in a]
        refused = {d["index"] for d in details}
        for d in failed:
            if d["index"] not in refused:
                self.errors_total.inc(tags={"code": d["code"]})
        if failed and not partial:  # found only when decoded or scored: the request fails as a whole all the same
            ours = [d for d in failed if d["code"] == ErrorCode.INFERENCE_FAILED]
            raise RequestError(500 if ours else 400, ErrorCode.INTERNAL_ERROR if ours else ErrorCode.INVALID_IMAGE,
                               f"{len(failed)} of {len(out)} images could not be scored (add ?partial=true to get "
                               "the others' answers)", failed)
        headers = {"x-visionserve-batch-wait-ms": f"{wait * 1000:g}",
                   "x-visionserve-batch-images": str(max((n for _, n in results), default=0))}
        return out, headers

    # ------------------------------------------------------------------ explanations

    async def _explain(self, items: list[bytes], wishes: list[Any], params: dict, rows: list[int]) -> list[dict]:
        """Explanations off the batcher: a few at a time, a long timeout, 429 when too many wait."""
        started = time.perf_counter()
        try:
            return await self._explanations.run(functools.partial(self.predictor.explain_bytes, items, wishes, params,
                                                                  rows=rows))
        except Busy:
            raise RequestError(429, ErrorCode.TOO_MANY_EXPLANATIONS, f"{self._explanations.admitted} explanation "
                               "requests are in progress on this replica; retry later",
                               headers={"retry-after": "5"}) from None
        except TimedOut:
            raise RequestError(504, ErrorCode.EXPLANATION_TIMEOUT, f"the explanation took over "
                               f"{self.config.explanation_timeout_s:g} s (explanation_timeout_s); try fewer images, a "
                               "smaller n_steps or a faster xai_algorithm") from None
        finally:
            self.explain_seconds.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ routes

    def _denied(self, request: Request) -> JSONResponse | None:
        """The request id for logs and replies; a 401 when an API key is configured and not given."""
        # Ray Serve answers with the x-request-id it was sent (or one it made up); when that is not a plain
        # short token, this replica's logs and error bodies use its own, sent back as x-visionserve-request-id
        given = request.headers.get("x-request-id")
        request.state.request_id = request_id_of(given)
        request.state.id_headers = {} if request.state.request_id == given else {
            "x-visionserve-request-id": request.state.request_id}
        if not self.config.api_key_sha256:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if key_matches(token, self.config.api_key_sha256):
            return None
        return _error(401, ErrorCode.UNAUTHORIZED, "a valid API key is required: Authorization: Bearer <key>",
                      request, {"www-authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        """The body, read up to the size cap: a declared or chunked body over it is refused while reading."""
        limit = self.config.max_request_mb * 2**20
        too_large = RequestError(413, ErrorCode.REQUEST_TOO_LARGE,
                                 f"the request body is over {self.config.max_request_mb:g} MB (max_request_mb)")
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle(self, request: Request, route: Route, wrap) -> JSONResponse:
        """Parse, check, score; every refusal is a JSON error naming what is wrong, never a traceback."""
        started = time.perf_counter()
        denied = self._denied(request)
        if denied is not None:
            return denied
        request_id = request.state.request_id
        status, images = 200, 0
        try:
            parsed, details, wishes = await asyncio.to_thread(self._read, await self._body(request), route)
            images = len(parsed.entries)
            partial = request.query_params.get("partial", "").lower() in ("1", "true")
            answers, batching = await self._answer(parsed, details, wishes, partial)
            self.images_total.inc(len(answers), tags={"route": request.url.path})
            return JSONResponse(wrap(answers), headers={**request.state.id_headers, **batching})
        except RequestError as exc:
            status = exc.status
            return JSONResponse(exc.body(request_id), exc.status, headers={**request.state.id_headers, **exc.headers})
        except Exception:  # our own bug: logged with its traceback, answered without one
            status = 500
            log.exception("request_id=%s failed", request_id)
            return _error(500, ErrorCode.INTERNAL_ERROR, "internal error; the server log has the details", request)
        finally:
            log.info("request_id=%s path=%s status=%s images=%d ms=%.1f", request_id, request.url.path, status,
                     images, (time.perf_counter() - started) * 1000)

    @app.post("/score", summary="Score images (the cloud's input_data schema)", openapi_extra=_route_doc("ScoreRequest"),
              description="One answer per image, in input order: a JSON list (scoring.md's response per task). "
                          "`?partial=true`: refused images become error rows instead of a 400.")
    async def score(self, request: Request) -> JSONResponse:
        return await self._handle(request, "score", lambda answers: answers)

    @app.post("/invocations", summary="Score images (MLflow's dataframe_split / records / instances / inputs)",
              openapi_extra=_route_doc("InvocationsRequest"),
              description='`{"predictions": [...]}`, one answer per image as on /score.')
    async def invocations(self, request: Request) -> JSONResponse:
        return await self._handle(request, "invocations", lambda answers: {"predictions": answers})

    @app.get("/health/live")
    async def live(self) -> dict:
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready(self) -> dict:
        return {"status": "ready", "model": self.predictor.spec.model_name}

    @app.get("/metadata")
    async def metadata(self, request: Request) -> Any:
        denied = self._denied(request)
        if denied is not None:
            return denied
        mlmodel = _mlmodel(self.model_dir)
        return {**self.predictor.description(self.predictor.spec.task.is_classification), "model": self.config.model,
                "model_uuid": mlmodel.get("model_uuid"), "created": mlmodel.get("utc_time_created"),
                "replica": serve.get_replica_context().replica_id.unique_id,
                "in_progress": {"scoring": self._scoring, "explaining": self._explanations.admitted},
                "limits": {k: v for k, v in asdict(self.config).items()
                           if k in ("max_batch_size", "max_request_mb", "max_images_per_request", "max_image_mb")}}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Ray Serve config files (`import_path: serving.app:build_app`).

    `args`: `model` (folder or MLflow URI), optional `api_key_file`, `set` (settings overrides),
    `max_batch_size`, `batch_wait_timeout_s`, `max_request_mb`, `max_images_per_request`,
    `max_concurrent_explanations`, `max_waiting_explanations`, `explanation_timeout_s`, `compile`,
    `backend`.
    """
    args = dict(args)
    key_file = args.pop("api_key_file", None)
    overrides = args.pop("set", None) or args.pop("overrides", None) or {}
    digest = read_key_file(key_file, "api_key_file") if key_file else None
    config = ServiceConfig(overrides=overrides, api_key_sha256=digest, **args)
    return VisionService.bind(asdict(config))
