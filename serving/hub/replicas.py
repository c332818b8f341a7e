"""Many models on the same replicas: Ray Serve model multiplexing. A replica keeps the most recently used
models (`cache_size`) and loads any other on its first request (answered, not refused). A model id is
`<registered name>/<version>`, so a retrained model is a new id and never answers from a stale cache.

Each replica scores as a `visionserve serve` replica does (serving.replica): one batcher across requests (Ray
Serve splits its batches by model, and images under equal settings share forward passes), explanations through
one admission, the same limits, errors and metrics; every body is read by the scoring core (serving.scoring)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from ray import serve

from models.data.images import Probed
from serving.contract import Entry, RequestError, ScoringRequest
from serving.loading import ModelFolder
from serving.predictor import Predictor
from serving.replica import ScoringReplica
from serving.scoring import Scoring, ScoringLimits

log = logging.getLogger("ray.serve")
LOW_CONFIDENCE = 0.05  # the lowest box score `analyze` answers
LOADS_KEPT = 100  # the load history GET /models shows


def model_id(name: str, version: str | int) -> str:
    return f"{name}/{version}"


def _load(mid: str, limits: ScoringLimits) -> Scoring:
    """The model `mid` from the Model Registry, what scores it planned once here (on this replica's device)."""
    name, version = mid.rsplit("/", 1)
    folder = ModelFolder.open(f"models:/{name}/{version}")
    predictor = Predictor.load(folder, plan=folder.plan("auto"), limits=limits.image,
                               explainers=limits.max_concurrent_explanations)
    return Scoring(predictor, limits)


def hub_models(cache_size: int = 3) -> Any:
    """The multiplexed model deployment, keeping `cache_size` models per replica."""
    @serve.deployment(name="HubModels", max_ongoing_requests=16, max_queued_requests=64)
    class HubModels(ScoringReplica):
        def __init__(self, limits: dict[str, Any], threads: int):
            self.start_scoring(ScoringLimits(**limits), threads)
            self.loads: deque[str] = deque(maxlen=LOADS_KEPT)  # model loads, in order (evictions show as reloads)

        @serve.multiplexed(max_num_models_per_replica=cache_size)
        async def get_model(self, mid: str) -> Scoring:
            scoring = await asyncio.get_running_loop().run_in_executor(self._model_thread, _load, mid, self.limits)
            self.loads.append(mid)
            log.info("hub: loaded %s (%d loads on this replica)", mid, len(self.loads))
            return scoring

        async def _model(self) -> Scoring:
            return await self.get_model(serve.get_multiplexed_model_id())

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
            scoring = await self._model()
            predictor = scoring.predictor
            low = {"box_score_thresh": LOW_CONFIDENCE} if not predictor.task.is_classification else {}
            request = ScoringRequest((Entry("image", image),), predictor.settings_for(low))
            try:
                [answer], _ = await self.respond(scoring, request, "/computervision/imageanalysis:analyze")
            except RequestError as exc:
                return {"status": exc.status, "error": str(exc)}
            return {"task": predictor.task.name, "answer": answer, "labels": predictor.labels}

        async def metadata(self) -> dict[str, Any]:
            """What `/metadata` answers on `visionserve serve`, for this model."""
            return (await self._model()).predictor.description()

        def load_history(self) -> list[str]:
            return list(self.loads)

    return HubModels
