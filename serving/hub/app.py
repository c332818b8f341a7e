"""`visionserve hub`: the retired Image Analysis 4.0 model-customization API, and the AutoML scoring formats,
over many models served by name (Ray Serve: `HubService` ingress replicas, stateless, read the records from the
database; `HubJobs`, one replica, owns the runs and makes every change of a model or evaluation; `HubModels`
replicas multiplex the models).

Routes: `/computervision/datasets/{name}` (PUT, GET, PATCH, DELETE, list), `/computervision/models/{name}`
(PUT trains, GET, `:cancel`, DELETE, list), `/computervision/models/{model}/evaluations/{name}`,
`/computervision/imageanalysis:analyze?model-name=`, `POST /score` and `/invocations` with the model
chosen by the `azureml-model-deployment` header or `?model=`, `/health/live`, `/health/ready`, `GET /models`.
The studio's page at `/studio` and what only it reads (keyed as the rest): `GET /models/{name}/metadata`,
`/models/{name}/progress`, `/datasets/{name}/contents`, `/datasets/{name}/images/{index}`, `/image?url=` (the
bytes of the image analyze's `{"url": ...}` would read).
"""


import asyncio
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from models.runtime import resource_asks
from serving.access import KEYED, Access, read_key_file
from serving.backends import ONNX_REPLICA_ENV
from serving.edge import install
from serving.hub import datasets
from serving.hub.api import ApiError, check_api_version, json_body, no_content, public, resource_name
from serving.hub.browse import DatasetViews, dataset_contents, dataset_image
from serving.hub.catalog import Catalog, Registry, metadata
from serving.hub.config import HubConfig
from serving.hub.owner import HubJobs, changed
from serving.hub.predict import analyze, automl, image
from serving.hub.progress import training_progress
from serving.hub.replicas import hub_models
from serving.hub.scheduler import Quotas
from serving.hub.state import Store
from serving.hub.training import ready_experiment, tracking_server
from serving.scoring import ScoringLimits
from serving.studio import add_studio

log = logging.getLogger("ray.serve")
_SLASHES = re.compile(r"/{2,}")


app = FastAPI(title="visionserve hub", description="Image Analysis 4.0 model customization, self-hosted; "
              "AutoML scoring of many models by name.")


class _LenientPaths:
    """Repeated slashes are one (some clients send `//models/...`). Plain ASGI: Starlette's `@app.middleware`
    costs every request a task and a re-streamed body (a tenth of the ingress's CPU under load, measured)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = {**scope, "path": _SLASHES.sub("/", scope["path"])}
        await self.app(scope, receive, send)


app.add_middleware(_LenientPaths)
install(app, internal=lambda: ApiError(500, "InternalServerError", "internal error; the hub's log has the details"),
        no_route=lambda status, message: ApiError(status, {404: "NotFound", 405: "MethodNotAllowed"}.get(
            status, "InvalidRequest"), message))
add_studio(app, server="hub")
# every keyed route: the key, then the api-version (the API's two checks before any work)
API = [*KEYED, Depends(check_api_version)]


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "a valid key is required: the Ocp-Apim-Subscription-Key header or "
                    "Authorization: Bearer <key>")


def model_name(name: str) -> str:
    return resource_name(name, "name", "model")


@serve.deployment(name="HubService", max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(app)
class HubService:
    """An ingress replica: reads bodies, names and records; datasets are changed here (transactions in the
    database), models and evaluations by HubJobs; predictions go to the HubModels replica holding the model."""

    def __init__(self, config: dict[str, Any], models: Any, owner: Any):
        self.config = HubConfig(**config)
        self.access = Access(self.config.api_key_sha256, unauthorized, ("ocp-apim-subscription-key",))
        self.limits = ScoringLimits(**self.config.limits)
        self.store = Store(self.config.state_dir, self.config.state_db)
        self.catalog = Catalog(self.store, Registry())
        self.catalog.registry.warm_up()
        self.views = DatasetViews(self.config.image_root)  # what the studio reads of datasets
        self.models = models  # the HubModels deployment handle
        self.owner = owner  # the HubJobs deployment handle
        self.quotas = Quotas(**self.config.quotas)
        log.info("visionserve hub ready: state in %s, registry %s", self.store.root, self.config.tracking_uri)

    @staticmethod
    async def _changed(call: Any):
        """A change HubJobs made (`self.owner.<change>.remote(...)`) as the API answers it."""
        status, body = await changed(call)
        return no_content() if body is None else JSONResponse(body, status)

    # ------------------------------------------------------------------ datasets

    @app.put("/computervision/datasets/{name}", dependencies=API)
    async def put_dataset(self, name: str, request: Request):
        return await datasets.register_dataset(self.store, name, request, self.config, self.quotas)

    @app.patch("/computervision/datasets/{name}", dependencies=API)
    async def patch_dataset(self, name: str, request: Request):
        return await datasets.update_dataset(self.store, name, request, self.config)

    @app.get("/computervision/datasets/{name}", dependencies=API)
    async def get_dataset(self, name: str):
        return await datasets.get("datasets", self.store, name)

    @app.delete("/computervision/datasets/{name}", dependencies=API)
    async def delete_dataset(self, name: str, request: Request):
        return await datasets.delete_dataset(self.store, name, request)

    @app.get("/computervision/datasets", dependencies=API)
    async def list_datasets(self, request: Request):
        return await datasets.listing(await asyncio.to_thread(self.store.all, "datasets"), request)

    # ------------------------------------------------------------------ models

    @app.put("/computervision/models/{name}", dependencies=API)
    async def put_model(self, name: str, request: Request):
        name = model_name(name)
        return await self._changed(self.owner.create_model.remote(name, await json_body(request)))

    @app.get("/computervision/models/{name}", dependencies=API)
    async def get_model(self, name: str):
        return public(await asyncio.to_thread(self.catalog.record, model_name(name)))

    @app.post("/computervision/models/{name}:cancel", dependencies=API)
    async def cancel_model(self, name: str):
        return await self._changed(self.owner.cancel.remote(model_name(name)))

    @app.delete("/computervision/models/{name}", dependencies=API)
    async def delete_model(self, name: str):
        name = model_name(name)
        answer = await self._changed(self.owner.delete_model.remote(name))
        self.catalog.forget(name)  # this replica's scoring stops at once (another's within NAMES_TTL_S)
        return answer

    @app.get("/computervision/models", dependencies=API)
    async def list_models(self, request: Request):
        return await datasets.listing(await asyncio.to_thread(self.catalog.listing), request)

    # ------------------------------------------------------------------ evaluations

    @app.put("/computervision/models/{model}/evaluations/{name}", dependencies=API)
    async def put_evaluation(self, model: str, name: str, request: Request):
        model, name = model_name(model), resource_name(name, "name", "evaluation")
        return await self._changed(self.owner.create_evaluation.remote(model, name, await json_body(request)))

    @app.get("/computervision/models/{model}/evaluations/{name}", dependencies=API)
    async def get_evaluation(self, model: str, name: str):
        name = resource_name(name, "name", "evaluation")
        return public(await asyncio.to_thread(self.catalog.evaluation, model_name(model), name))

    @app.delete("/computervision/models/{model}/evaluations/{name}", dependencies=API)
    async def delete_evaluation(self, model: str, name: str):
        return await self._changed(self.owner.delete_evaluation.remote(
            model_name(model), resource_name(name, "name", "evaluation")))

    @app.get("/computervision/models/{model}/evaluations", dependencies=API)
    async def list_evaluations(self, model: str, request: Request):
        return await datasets.listing(await asyncio.to_thread(self.catalog.evaluations, model_name(model)),
                                      request)

    # ------------------------------------------------------------------ predictions

    @app.post("/computervision/imageanalysis:analyze", dependencies=API)
    async def analyze(self, request: Request):
        return await analyze(self, request)

    @app.post("/score", dependencies=API)
    async def score(self, request: Request):
        return await automl(self, request, "score")

    @app.post("/invocations", dependencies=API)
    async def invocations(self, request: Request):
        return await automl(self, request, "invocations")

    @app.get("/health/live")
    async def live(self) -> dict:
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready(self) -> dict:
        """Unkeyed and probed often: it reads nothing (no record, no registry query)."""
        return {"status": "ready"}

    @app.get("/models", dependencies=API)
    async def models_list(self):
        models = await asyncio.to_thread(self.catalog.hub_wide)
        return {"models": models, "cache": {"size": self.config.cache_size,
                                            "memory_mb": self.config.model_memory_mb,
                                            "replicas": await self._residency()}}

    async def _residency(self) -> list[dict[str, Any]]:
        """Each model replica's models, footprints and loads, as many as answer: a handle reaches one replica a
        call, so twice as many calls as replicas, side by side (the router spreads them), deduplicated."""
        answers = await asyncio.gather(*(self.models.residency.remote() for _ in range(2 * self.config.model_replicas)))
        return sorted({a["replica"]: a for a in answers}.values(), key=lambda a: a["replica"])

    # ------------------------------------------------------------------ what the studio reads

    @app.get("/models/{name}/metadata", dependencies=API)
    async def model_metadata(self, name: str):
        return await metadata(self, model_name(name))

    @app.get("/models/{name}/progress", dependencies=API)
    async def model_progress(self, name: str):
        name = model_name(name)

        def work() -> dict[str, Any]:
            record = self.catalog.record(name)
            message = self.store.progress(name).get("message") if record.get("createdDateTime") else None
            return training_progress(record, message, self.config.tracking_uri)

        return await asyncio.to_thread(work)

    @app.get("/datasets/{name}/contents", dependencies=API)
    async def dataset_contents(self, name: str, request: Request):
        return await dataset_contents(self.store, self.views, resource_name(name, "name", "dataset"), request)

    @app.get("/image", dependencies=API)
    async def url_image(self, request: Request):
        return await image(self, request)

    @app.get("/datasets/{name}/images/{index}", dependencies=API)
    async def dataset_image(self, name: str, index: str):
        return await dataset_image(self.store, self.views, resource_name(name, "name", "dataset"), index)


def build_hub(args: dict[str, Any]) -> serve.Application:
    """Application builder: `state_dir`, optional `state_db` (the records' database URL), `tracking_uri`,
    `image_root`, `api_key_file`, `cache_size`, `model_memory_mb` (what each model replica's models may hold, in
    MB), `model_replicas` (HubModels replicas), `model_cpus` (CPUs each), `ingress_replicas` (HubService
    replicas), `env` (the replicas' environment variables), `max_concurrent_trainings`, `training_resources`
    (custom Ray resources each training and evaluation asks for), `quotas` (serving.hub.scheduler.Quotas' fields),
    and ScoringLimits' fields (the same limits, batching and explanation admission as `visionserve serve`)."""
    args = dict(args)
    args["training_resources"] = resource_asks(dict(args.get("training_resources") or {}), "training_resources")
    state = Path(args.pop("state_dir")).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    # the records' database made ready once (its table, a JSON state folder imported) before the replicas that
    # share it start; a malformed, unsupported or unreachable one is refused here, not in a replica
    Store(state, args.get("state_db")).engine.dispose()
    key_file = args.pop("api_key_file", None)
    replicas = int(args.pop("model_replicas", 1))
    cpus = float(args.pop("model_cpus", 0.5))
    env = dict(args.pop("env", None) or {})  # --env: a runtime_env of their own leaves the replicas no other way
    tracking = args.pop("tracking_uri", None) or f"sqlite:///{state / 'mlflow.db'}"
    if not tracking_server(tracking):
        # likewise a store this process opens itself, which every replica opens too: the first to open a new SQLite
        # store migrates it, and replicas starting together collided ("table _alembic_tmp_... already exists")
        ready_experiment(tracking, state / "mlartifacts")
    limits = asdict(ScoringLimits(**{k: args.pop(k) for k in list(args) if k in ScoringLimits.__dataclass_fields__}))
    config = HubConfig(state_dir=str(state), tracking_uri=tracking, limits=limits, model_replicas=replicas,
                       api_key_sha256=read_key_file(key_file, "api_key_file") if key_file else None, **args)
    threads = max(1, round(cpus))
    # a lane per CPU and one more: models in rotation score side by side, and the CPUs stay busy while a lane's
    # batch forms or its answers go out (3 classifiers on 2 CPUs at 8 clients: 22 images/s on one lane of 2
    # threads, 28-35 on 2 lanes, 34-40 on 3, 34 on 4; bench/hub.py); classifiers score on ONNX Runtime
    models = hub_models(config.cache_size, lanes=threads + 1).options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus, "runtime_env": {
            "env_vars": {"MLFLOW_TRACKING_URI": tracking, **ONNX_REPLICA_ENV, **env}}}).bind(
            limits, threads, config.model_memory_mb)
    options = {"num_cpus": 0.1, "runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": tracking, **env}}}
    # the owner computes nothing (its runs are actors with CPUs of their own): it takes no CPU from the replicas
    owner = HubJobs.options(ray_actor_options={**options, "num_cpus": 0}).bind(asdict(config))
    return HubService.options(num_replicas=config.ingress_replicas, ray_actor_options=options).bind(
        asdict(config), models, owner)
