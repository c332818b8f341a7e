"""What every Ray Serve deployment that scores shares (`VisionService`, the hub's `HubModels`): the process's torch
thread, one batcher across requests (images of one model under equal settings share forward passes; Ray Serve
splits a batch by multiplexed model as well), explanations through one admission (a few at a time, a long
timeout, 429 when too many wait), the scoring metrics, and the headers that say how a request's images were
batched. Each deployment subclasses `ScoringReplica`; the scoring itself is serving.scoring's."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve
from ray.serve import metrics

from models.data.images import Probed
from models.errors import ErrorCode
from models.runtime import torch_thread
from serving.admission import Admission, Busy, TimedOut
from serving.contract import RequestError, ScoringRequest
from serving.predictor import Predictor
from serving.scoring import Scoring, ScoringLimits


@dataclass(frozen=True)
class Job:
    """One plain image to score: the model, the image, the settings in force (the batch key) and its row."""

    predictor: Predictor
    image: Probed
    settings: Any
    row: int


class ScoringReplica:
    """Mixed into a Ray Serve deployment class; `start_scoring` in its `__init__`."""

    def start_scoring(self, limits: ScoringLimits, threads: int | None = None) -> None:
        """`threads`: the replica's torch and ONNX Runtime threads (default: what Ray gave it, its CPUs rounded down;
        a replica of 1.9 CPUs would otherwise score on one)."""
        self.limits = limits
        self._model_thread = torch_thread()  # models load and score here (see models.runtime), explanations not
        if threads:
            self._model_thread.submit(torch.set_num_threads, threads).result()
        self._explain_threads = ThreadPoolExecutor(limits.max_concurrent_explanations,
                                                   thread_name_prefix="visionserve-explain")
        self._explanations = Admission(limits.max_concurrent_explanations, limits.max_waiting_explanations,
                                       limits.explanation_timeout_s, self._explain_threads)
        self._busy = 0  # requests with images to score, between admission and answer
        self._score_images.set_max_batch_size(limits.max_batch_size)
        self._score_images.set_batch_wait_timeout_s(limits.batch_wait_timeout_s)
        self.images_total = metrics.Counter("visionserve_images_total", "Images scored", tag_keys=("route",))
        self.errors_total = metrics.Counter("visionserve_image_errors_total", "Images refused", tag_keys=("code",))
        self.model_seconds = metrics.Histogram("visionserve_model_seconds", "Seconds per model call",
                                               boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
        self.explain_seconds = metrics.Histogram("visionserve_explain_seconds", "Seconds per explanation request",
                                                 boundaries=[0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
        self.batch_images = metrics.Histogram("visionserve_batch_images", "Images per model call",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64, 128])

    def in_progress(self) -> dict[str, int]:
        return {"scoring": self._busy, "explaining": self._explanations.admitted}

    # ------------------------------------------------------------------ one request

    async def read(self, scoring: Scoring, body: bytes, route: str, partial: str | None) -> ScoringRequest:
        """The body read and validated once, off the event loop."""
        return await self._counted(asyncio.to_thread(scoring.read, body, route, partial=partial))

    async def respond(self, scoring: Scoring, request: ScoringRequest, route: str) -> tuple[list[dict], dict]:
        """The answers of a validated request, and the headers that say how its images were batched."""
        sizes: list[int] = []

        async def score(predictor: Predictor, image: Probed, settings: Any, row: int) -> dict:
            answer, size = await self._score_images(Job(predictor, image, settings, row))
            sizes.append(size)
            return answer

        busy = int(bool(request.plain()))
        self._busy += busy
        # a batch waits for more images only while another request is being scored: alone, it goes now
        wait = self.limits.batch_wait_timeout_s if self._busy > 1 else 0.0
        try:
            self._score_images.set_batch_wait_timeout_s(wait)
            answers = await self._counted(scoring.answer(request, score, self._explain))
        finally:
            self._busy -= busy
        for answer in answers:
            if "error" in answer:
                self.errors_total.inc(tags={"code": answer["error"]["code"]})
        self.images_total.inc(len(answers), tags={"route": route})
        return answers, {"x-visionserve-batch-wait-ms": f"{wait * 1000:g}",
                         "x-visionserve-batch-images": str(max(sizes, default=0))}

    async def _counted(self, work):
        """`work` awaited; the images a refusal names are counted by their codes."""
        try:
            return await work
        except RequestError as exc:
            for detail in exc.details:
                self.errors_total.inc(tags={"code": str(detail.get("code", exc.code))})
            raise

    # ------------------------------------------------------------------ the batcher and the admission

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_images(self, jobs: list[Job]) -> list[tuple[dict, int]]:
        """Images from any number of requests; those of one model under equal settings share forward passes.
        Each answer comes back with the size of its model call."""
        groups: dict[tuple[int, Any], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.predictor), job.settings), []).append(i)
        answers: list[tuple[dict, int] | None] = [None] * len(jobs)
        loop = asyncio.get_running_loop()
        for indices in groups.values():
            first = jobs[indices[0]]
            started = time.perf_counter()
            results = await loop.run_in_executor(self._model_thread, functools.partial(
                first.predictor.score, [jobs[i].image for i in indices], first.settings, [jobs[i].row for i in indices]))
            self.model_seconds.observe(time.perf_counter() - started)
            self.batch_images.observe(len(indices))
            for i, result in zip(indices, results):
                answers[i] = (result, len(indices))
        return answers

    async def _explain(self, predictor: Predictor, images: list, wishes: list, settings: Any,
                       rows: list[int]) -> list[dict]:
        """Explanations off the batcher: a few at a time, a long timeout, 429 when too many wait."""
        started = time.perf_counter()
        try:
            return await self._explanations.run(functools.partial(predictor.explain, images, wishes, settings, rows))
        except Busy:
            raise RequestError(429, ErrorCode.TOO_MANY_EXPLANATIONS, f"{self._explanations.admitted} explanation "
                               "requests are in progress on this replica; retry later",
                               headers={"retry-after": "5"}) from None
        except TimedOut:
            raise RequestError(504, ErrorCode.EXPLANATION_TIMEOUT, f"the explanation took over "
                               f"{self.limits.explanation_timeout_s:g} s (explanation_timeout_s); try fewer images, "
                               "a smaller n_steps or a faster xai_algorithm") from None
        finally:
            self.explain_seconds.observe(time.perf_counter() - started)
