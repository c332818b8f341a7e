"""Many models on the same replicas: Ray Serve model multiplexing. A replica keeps the most recently used
models (`cache_size`) and loads any other on its first request (answered, not refused). A model id is
`<registered name>/<version>`, so a retrained model is a new id and never answers from a stale cache."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from models.data.formats import PREDICTION_LIMITS
from models.errors import ErrorCode, ImageError
from models.runtime import torch_thread
from serving.contract import RequestError, parse_json, parse_request, probe_images

log = logging.getLogger("ray.serve")
LOW_CONFIDENCE = 0.05  # the lowest box score `analyze` answers


def model_id(name: str, version: str | int) -> str:
    return f"{name}/{version}"


def _load(mid: str):
    from serving.loading import resolve_model
    from serving.predictor import Predictor

    name, version = mid.rsplit("/", 1)
    return Predictor.load(resolve_model(f"models:/{name}/{version}"), compile_scorer=False, limits=PREDICTION_LIMITS)


def hub_models(cache_size: int = 3) -> Any:
    """The multiplexed model deployment, keeping `cache_size` models per replica."""

    @serve.deployment(name="HubModels", max_ongoing_requests=16, max_queued_requests=64)
    class HubModels:
        def __init__(self):
            self._thread = torch_thread()
            self.loads: list[str] = []  # every model load this replica did, in order (evictions show as reloads)

        @serve.multiplexed(max_num_models_per_replica=cache_size)
        async def get_model(self, mid: str):
            predictor = await asyncio.get_running_loop().run_in_executor(self._thread, _load, mid)
            self.loads.append(mid)
            log.info("hub: loaded %s (%d loads on this replica)", mid, len(self.loads))
            return predictor

        async def _predict(self, images: list[bytes | ImageError], params: dict | None = None) -> tuple[Any, list]:
            predictor = await self.get_model(serve.get_multiplexed_model_id())
            answers = await asyncio.get_running_loop().run_in_executor(
                self._thread, predictor.predict_bytes, images, params or {})
            return predictor, answers

        async def analyze(self, image: bytes) -> dict[str, Any]:
            """One raw image → {"task", "answer" (scoring.md's response), "labels"}. Detectors keep their
            low-confidence boxes too, as the cloud's did (its clients filter)."""
            predictor = await self.get_model(serve.get_multiplexed_model_id())
            low = {"box_score_thresh": LOW_CONFIDENCE} if predictor.spec.task.family != "classification" else {}
            predictor, [answer] = await self._predict([image], low)
            return {"task": predictor.spec.task.name, "answer": answer, "labels": predictor.labels}

        async def score(self, body: bytes, route: str, partial: bool) -> tuple[int, Any]:
            """An AutoML `/score` or `/invocations` body → (status, the response body) as `visionserve serve`."""
            try:
                parsed = parse_request(parse_json(body), route, 64)
                details = probe_images(parsed, PREDICTION_LIMITS)
                if details and not partial:
                    raise RequestError(400, ErrorCode.INVALID_IMAGE, f"{len(details)} of {len(parsed.entries)} "
                                       "images cannot be scored (add ?partial=true to score the others)", details)
                predictor = await self.get_model(serve.get_multiplexed_model_id())
                predictor.settings_for(parsed.params)
                _, answers = await self._predict([e.data for e in parsed.entries], parsed.params)
            except RequestError as exc:
                return exc.status, exc.body()
            except ValueError as exc:  # a per-request setting out of range
                return 400, {"error": {"code": ErrorCode.INVALID_PARAMETER, "message": str(exc)}}
            failed = [a for a in answers if "error" in a]
            if failed and not partial:
                return 400, {"error": {"code": ErrorCode.INVALID_IMAGE, "message": f"{len(failed)} of {len(answers)} "
                                       "images could not be scored (add ?partial=true)",
                                       "details": [a["error"] for a in failed]}}
            return 200, answers if route == "score" else {"predictions": answers}

        async def metadata(self) -> dict[str, Any]:
            """What `/metadata` answers on `visionserve serve`, for this model (no `xai_parameters`: the hub scores,
            it does not explain)."""
            predictor = await self.get_model(serve.get_multiplexed_model_id())
            return predictor.description(explains=False)

        def load_history(self) -> list[str]:
            return list(self.loads)

    return HubModels
