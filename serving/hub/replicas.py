"""Many models on the same replicas: Ray Serve model multiplexing. A replica keeps the most recently used
models (`cache_size`), within a memory budget when one is set (serving.hub.memory), and loads any other on its
first request (answered, not refused). A model id is `<registered name>/<version>`, so a retrained model is a new
id and never answers from a stale cache. What every model's load would pay once (imports, MLflow's registry
client, torch's threads) a replica pays as it starts, so its very first call pays only for its model.

Each replica scores as a `visionserve serve` replica does (serving.replica): one batcher across requests (Ray
Serve splits its batches by model, and images under equal settings share forward passes), explanations through
one admission, the same limits, errors and metrics; every body is read by the scoring core (serving.scoring)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import torch
from ray import serve

from models.data.images import Probed
from serving.contract import Entry, RequestError, ScoringRequest
from serving.hub.catalog import Registry
from serving.hub.memory import MB, ModelMemory, Resident
from serving.hub.metrics import ModelSeries
from serving.loading import ModelFolder
from serving.predictor import Predictor
from serving.replica import ScoringReplica
from serving.scoring import Scoring, ScoringLimits

log = logging.getLogger("ray.serve")
LOW_CONFIDENCE = 0.05  # the lowest box score `analyze` answers
LOADS_KEPT = 100  # the load history GET /models shows


def _load(mid: str, limits: ScoringLimits) -> Scoring:
    """The model `mid` from the Model Registry, what scores it planned once here (on this replica's device)."""
    name, version = mid.rsplit("/", 1)
    folder = ModelFolder.open(f"models:/{name}/{version}")
    predictor = Predictor.load(folder, plan=folder.plan("auto"), limits=limits.image,
                               explainers=limits.max_concurrent_explanations)
    return Scoring(predictor, limits)


def warm_up() -> None:
    """What the first model load in a process pays besides the model, paid before it (on the model thread):
    MLflow and ONNX Runtime imported, the registry's client and store opened, torch's thread pool started. A
    registry out of reach is not this replica's failure: the first load says so."""
    import onnxruntime  # noqa: F401  (classifiers score on it)

    torch.nn.functional.conv2d(torch.zeros(1, 3, 32, 32), torch.zeros(4, 3, 3, 3))
    Registry().warm_up()


class ModelReplica(ScoringReplica):
    """What a HubModels replica does (`hub_models` adds Ray Serve's multiplexer and batcher, sized when the hub is
    built): models loaded within the memory budget, scored and explained as `visionserve serve` does."""

    def start_models(self, limits: ScoringLimits, threads: int, lanes: int, memory_mb: float | None) -> None:
        self.start_scoring(limits, threads, lanes)
        self.loads: deque[str] = deque(maxlen=LOADS_KEPT)  # model loads, in order (evictions show as reloads)
        self.memory = ModelMemory(None if memory_mb is None else int(memory_mb * MB))
        self.series = ModelSeries()
        self._reloads = asyncio.Lock()  # one model evicted for memory is loaded again at a time
        self._model_thread.submit(warm_up).result()

    async def resident(self, mid: str) -> Resident:
        """The multiplexer's load of model `mid` (hub_models' `get_model`)."""
        resident = self.memory.resident(mid)
        await self._load(resident)
        return resident

    async def _load(self, resident: Resident) -> Scoring:
        """`resident`'s model loaded on the model thread, measured, admitted within the memory budget."""
        started = time.perf_counter()
        scoring = await asyncio.get_running_loop().run_in_executor(
            self._model_thread, _load, resident.model_id, self.limits)
        seconds = time.perf_counter() - started
        evicted = self.memory.admit(resident, scoring, scoring.predictor.loaded.footprint, seconds)
        self.loads.append(resident.model_id)
        self.series.loaded(resident.model_id, seconds, evicted)
        log.info("hub: loaded %s in %.2f s, %.1f MB (%d loads on this replica)%s", resident.model_id, seconds,
                 resident.footprint / MB, len(self.loads), f"; evicted for memory: {evicted}" if evicted else "")
        return scoring

    async def _model(self) -> Scoring:
        resident = await self.get_model(serve.get_multiplexed_model_id())  # the multiplexer's (hub_models)
        scoring = self.memory.use(resident)
        if scoring is None:  # the memory budget evicted it since: loaded again
            async with self._reloads:  # another request may have loaded it meanwhile
                scoring = self.memory.use(resident)
                if scoring is None:
                    scoring = await self._load(resident)
        return scoring

    async def score(self, body: bytes, route: str, partial: str | None) -> tuple[int, Any, dict[str, str]]:
        """An AutoML `/score` or `/invocations` body → (status, answers or the refusal's body, headers), read
        and answered exactly as `visionserve serve` reads and answers it."""
        scoring = await self._model()
        try:
            request = await self.read(scoring, body, route, partial)
            answers, headers = await self.respond(scoring, request, f"/{route}")
        except RequestError as exc:
            return exc.status, exc.body(), exc.headers
        return 200, answers, headers

    async def analyze(self, image: Probed) -> dict[str, Any]:
        """One image, its header read at the ingress → {"task", "answer" (scoring.md's response), "labels"}
        or {"status", "error"}. Detectors keep their low-confidence boxes too, as the cloud's did."""
        started = time.perf_counter()
        scoring = await self._model()
        predictor = scoring.predictor
        low = {"box_score_thresh": LOW_CONFIDENCE} if not predictor.task.is_classification else {}
        request = ScoringRequest((Entry("image", image),), predictor.settings_for(low))
        try:
            [answer], _ = await self.respond(scoring, request, "/computervision/imageanalysis:analyze")
        except RequestError as exc:
            return {"status": exc.status, "error": str(exc)}
        finally:
            self.series.analyzed(serve.get_multiplexed_model_id(), time.perf_counter() - started)
        return {"task": predictor.task.name, "answer": answer, "labels": predictor.labels}

    async def metadata(self) -> dict[str, Any]:
        """What `/metadata` answers on `visionserve serve`, for this model."""
        return (await self._model()).predictor.description()

    def residency(self) -> dict[str, Any]:
        """What GET /models shows of this replica: its id, its memory (serving.hub.memory) and its loads."""
        return {"replica": serve.get_replica_context().replica_tag, **self.memory.view(),
                "loads": list(self.loads)}


def hub_models(cache_size: int = 3, lanes: int = 1) -> Any:
    """The multiplexed model deployment, keeping `cache_size` models per replica (and within its memory budget),
    scoring `lanes` batches at a time, each on a thread of its own (serving.replica)."""
    @serve.deployment(name="HubModels", max_ongoing_requests=16, max_queued_requests=64)
    class HubModels(ModelReplica):
        def __init__(self, limits: dict[str, Any], threads: int, memory_mb: float | None = None):
            self.start_models(ScoringLimits(**limits), threads, lanes, memory_mb)

        @serve.multiplexed(max_num_models_per_replica=cache_size)
        async def get_model(self, mid: str) -> Resident:
            return await self.resident(mid)

    return HubModels
