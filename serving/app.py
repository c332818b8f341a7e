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


import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from models.errors import ErrorCode, SettingsError
from serving.access import KEYED, Access, read_key_file
from serving.backends import BACKENDS, ScoringPlan
from serving.contract import RequestError, Route, openapi_components
from serving.edge import install, read_body
from serving.replica import ScoringReplica
from serving.scoring import Scoring, ScoringLimits, request_too_large
from serving.studio import add_studio

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServiceConfig:
    """What a replica needs: the model, deploy-time settings, what scores it (decided once, by whoever deploys),
    the request limits and batching, the API key's hash."""

    model: str
    plan: dict[str, Any]  # ScoringPlan.as_dict()
    overrides: dict[str, Any] = field(default_factory=dict)
    api_key_sha256: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)  # ScoringLimits' fields

    @classmethod
    def of(cls, model: str, plan: ScoringPlan, limits: ScoringLimits = ScoringLimits(), **kwargs: Any) -> "ServiceConfig":
        return cls(model=model, plan=plan.as_dict(), limits=asdict(limits), **kwargs)


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

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi
add_studio(app)
install(app, internal=lambda: RequestError(500, ErrorCode.INTERNAL_ERROR, "internal error; the server log has the "
                                           "details"),
        no_route=lambda status, message: RequestError(status, ErrorCode.NOT_FOUND if status == 404 else
                                                      ErrorCode.INVALID_REQUEST, message))


def unauthorized() -> RequestError:
    return RequestError(401, ErrorCode.UNAUTHORIZED, "a valid API key is required: Authorization: Bearer <key>",
                        headers={"www-authenticate": "Bearer"})


def _route_doc(body: str) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{body}"}}}},
        "responses": {"200": {"description": "one answer per image, in input order (scoring.md's response per "
                              "task); a classifier's explanation entry adds `visualizations` (the 2x2 PNG) and "
                              "`attributions` when asked, a detector's the DetectionExplanation keys"},
                      **{status: {"description": text, **error} for status, text in (
            ("400", "malformed JSON, a refused image or parameter"), ("401", "API key missing or wrong"),
            ("413", "body or image count over the limits"), ("422", "a field of the body is missing or wrong"),
            ("429", "over capacity; see Retry-After"), ("504", "an explanation took too long"))}}}


def _mlmodel(model_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except OSError:
        return {}


@serve.deployment(name="VisionService", max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, graceful_shutdown_timeout_s=20)
@serve.ingress(app)
class VisionService(ScoringReplica):
    """One replica: the model loaded once, requests batched across callers."""

    def __init__(self, config: dict[str, Any]):
        from serving.loading import ModelFolder
        from serving.predictor import Predictor

        self.config = ServiceConfig(**config)
        self.access = Access(self.config.api_key_sha256, unauthorized)
        limits = ScoringLimits(**self.config.limits)
        plan = ScoringPlan(**self.config.plan)
        threads = int(torch.get_num_threads())  # Ray sets it to the replica's CPUs
        self.start_scoring(limits, threads, lanes=threads if plan.side_by_side else 1)
        folder = ModelFolder.open(self.config.model, self.config.overrides)
        self.model_dir = folder.path
        predictor = self._model_thread.submit(  # the model loads and scores on the process's torch thread
            Predictor.load, folder, plan=plan, limits=limits.image,
            explainers=limits.max_concurrent_explanations).result()
        self.scoring = Scoring(predictor, limits)
        log.info("visionserve replica ready: %s (%s), scoring on %s", predictor.model_settings.model_name,
                 predictor.task.name, predictor.plan.engine)

    def check_health(self) -> None:
        """Ray Serve's probe: a replica whose model is gone is replaced."""
        if self.scoring is None:
            raise RuntimeError("model not loaded")

    async def _route(self, request: Request, route: Route) -> tuple[list[dict], dict[str, str]]:
        body = await read_body(request, self.limits.max_request_bytes, request_too_large(self.limits))
        scoring_request = await self.read(self.scoring, body, route, request.query_params.get("partial"))
        return await self.respond(self.scoring, scoring_request, request.url.path)

    @app.post("/score", summary="Score images (the cloud's input_data schema)", openapi_extra=_route_doc("ScoreRequest"),
              description="One answer per image, in input order: a JSON list (scoring.md's response per task). "
                          "`?partial=true`: refused images become error rows instead of a 400.", dependencies=KEYED)
    async def score(self, request: Request) -> JSONResponse:
        answers, headers = await self._route(request, "score")
        return JSONResponse(answers, headers=headers)

    @app.post("/invocations", summary="Score images (MLflow's dataframe_split / records / instances / inputs)",
              openapi_extra=_route_doc("InvocationsRequest"), dependencies=KEYED,
              description='`{"predictions": [...]}`, one answer per image as on /score.')
    async def invocations(self, request: Request) -> JSONResponse:
        answers, headers = await self._route(request, "invocations")
        return JSONResponse({"predictions": answers}, headers=headers)

    @app.get("/health/live")
    async def live(self) -> dict:
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready(self) -> dict:
        return {"status": "ready", "model": self.scoring.predictor.model_settings.model_name}

    @app.get("/metadata", dependencies=KEYED)
    async def metadata(self) -> Any:
        mlmodel = _mlmodel(self.model_dir)
        return {**self.scoring.predictor.description(), "model": self.config.model,
                "model_uuid": mlmodel.get("model_uuid"), "created": mlmodel.get("utc_time_created"),
                "replica": serve.get_replica_context().replica_id.unique_id, "in_progress": self.in_progress(),
                "lanes": self.lanes,
                "limits": {k: getattr(self.limits, k) for k in ("max_batch_size", "max_request_mb",
                                                                 "max_images_per_request", "max_image_mb")}}


def service_config(model: str | Path, *, backend: str = "auto", compile: bool | None = None, device: str = "cpu",
                   overrides: dict[str, Any] | None = None, api_key_sha256: str | None = None,
                   **limits: Any) -> ServiceConfig:
    """A replica's config, what scores planned here, once (serving.backends.plan; CPU replicas unless `device`
    says otherwise); `limits`: ScoringLimits' fields. SettingsError / NoPlan before anything is deployed."""
    from serving.loading import ModelFolder

    if backend not in BACKENDS:  # a Serve config file's typo fails the deploy, not every replica
        raise SettingsError([f"backend: {backend!r} is not one of {', '.join(BACKENDS)}"], "serving config")
    scoring = ModelFolder.open(model, overrides).plan(backend, device, compile)
    return ServiceConfig.of(str(model), scoring, ScoringLimits(**limits), overrides=dict(overrides or {}),
                            api_key_sha256=api_key_sha256)


def deployment(config: ServiceConfig, **options: Any) -> serve.Application:
    """The VisionService application for `config`, its replicas' environment set for what scores them."""
    env = ScoringPlan(**config.plan).replica_env()
    actor = {**options.pop("ray_actor_options", {})}
    if env:
        actor["runtime_env"] = {"env_vars": {**actor.get("runtime_env", {}).get("env_vars", {}), **env}}
    return VisionService.options(ray_actor_options=actor, **options).bind(asdict(config))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Ray Serve config files (`import_path: serving.app:build_app`).

    `args`: `model` (folder or MLflow URI), optional `api_key_file`, `set` (settings overrides), `backend`,
    `compile`, `device`, and ScoringLimits' fields (`max_batch_size`, `batch_wait_timeout_s`, `max_request_mb`,
    `max_images_per_request`, `max_image_mb`, `max_concurrent_explanations`, `max_waiting_explanations`,
    `explanation_timeout_s`).
    """
    args = dict(args)
    key_file = args.pop("api_key_file", None)
    overrides = args.pop("set", None) or args.pop("overrides", None) or {}
    digest = read_key_file(key_file, "api_key_file") if key_file else None
    return deployment(service_config(args.pop("model"), overrides=overrides, api_key_sha256=digest, **args))
