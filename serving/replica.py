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

    def start_scoring(self, limits: ScoringLimits, threads: int | None = None, lanes: int = 1) -> None:
        """`threads`: the replica's torch and ONNX Runtime threads (default: what Ray gave it, its CPUs rounded down;
        a replica of 1.9 CPUs would otherwise score on one). `lanes`: model calls that may run side by side, each
        on a thread of its own; a call starts on the replica's threads shared among the lanes then busy (alone, all
        of them), so one request is as fast as on one lane and two batches score at once under load."""
        self.limits = limits
        self._lanes = [torch_thread()] + [  # models score here: the process's torch thread first (models.runtime)
            ThreadPoolExecutor(1, thread_name_prefix="visionserve-lane") for _ in range(lanes - 1)]
        self._lane_calls = [0] * len(self._lanes)  # calls in each lane, running or queued
        self._model_thread = self._lanes[0]  # models load here; explanations run on threads of their own
        self._threads = threads or self._model_thread.submit(torch.get_num_threads).result()
        # each lane's own count between calls: what a model loaded on it gives its ONNX Runtime session
        self._lane_threads = max(1, self._threads // len(self._lanes))
        for lane in self._lanes:
            lane.submit(torch.set_num_threads, self._lane_threads).result()
        self._explain_threads = ThreadPoolExecutor(limits.max_concurrent_explanations,
                                                   thread_name_prefix="visionserve-explain")
        self._explanations = Admission(limits.max_concurrent_explanations, limits.max_waiting_explanations,
                                       limits.explanation_timeout_s, self._explain_threads)
        self._busy = 0  # requests with images to score, between admission and answer
        # Ray Serve's batcher, one per replica: a batch forms as soon as its wait ends and waits for a free lane
        self._score_images = serve.batch(max_batch_size=limits.max_batch_size,
                                         batch_wait_timeout_s=limits.batch_wait_timeout_s,
                                         max_concurrent_batches=len(self._lanes))(self.score_jobs)
        self.images_total = metrics.Counter("visionserve_images_total", "Images scored", tag_keys=("route",))
        self.errors_total = metrics.Counter("visionserve_image_errors_total", "Images refused", tag_keys=("code",))
        self.model_seconds = metrics.Histogram("visionserve_model_seconds", "Seconds per model call",
                                               boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
        self.explain_seconds = metrics.Histogram("visionserve_explain_seconds", "Seconds per explanation request",
                                                 boundaries=[0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])
        self.batch_images = metrics.Histogram("visionserve_batch_images", "Images per model call",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64, 128])

    @property
    def lanes(self) -> int:
        """Model calls that may run side by side (serving.backends.ScoringPlan.side_by_side)."""
        return len(self._lanes)

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

    async def score_jobs(self, jobs: list[Job]) -> list[tuple[dict, int]]:
        """A batch of the batcher (`_score_images`, as many at once as there are lanes): images from any number of
        requests; those of one model under equal settings share forward passes. Each answer comes back with the
        size of its model call."""
        groups: dict[tuple[int, Any], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.predictor), job.settings), []).append(i)
        answers: list[tuple[dict, int] | None] = [None] * len(jobs)
        for indices in groups.values():
            first = jobs[indices[0]]
            results, seconds = await self._in_lane(functools.partial(
                first.predictor.score, [jobs[i].image for i in indices], first.settings, [jobs[i].row for i in indices]))
            self.model_seconds.observe(seconds)
            self.batch_images.observe(len(indices))
            for i, result in zip(indices, results):
                answers[i] = (result, len(indices))
        return answers

    async def _in_lane(self, call: Any) -> tuple[Any, float]:
        """`call()` in the lane with the fewest calls (a batcher that runs several batches at a time, or the parts
        of one batch that belong to different multiplexed models, which Ray Serve runs side by side), on the
        replica's threads shared among the lanes busy as it starts; its result and its seconds in the lane."""
        lane = min(range(len(self._lanes)), key=self._lane_calls.__getitem__)
        self._lane_calls[lane] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._lanes[lane], self._timed, call)
        finally:
            self._lane_calls[lane] -= 1

    def _timed(self, call: Any) -> tuple[Any, float]:
        """In a lane: `call()` on the threads the lanes now busy leave it (set back to the lane's own count after,
        so that a model loaded on the lane always gets the same)."""
        started = time.perf_counter()
        threads = max(1, self._threads // max(1, sum(1 for calls in self._lane_calls if calls)))
        if threads != self._lane_threads:
            torch.set_num_threads(threads)
        try:
            return call(), time.perf_counter() - started
        finally:
            if threads != self._lane_threads:
                torch.set_num_threads(self._lane_threads)

    async def _explain(self, predictor: Predictor, images: list, wishes: list, settings: Any,
                       rows: list[int]) -> list[dict]:
        """Explanations off the batcher: a few at a time, a long timeout, 429 when too many wait. The timeout is
        also their deadline: D-RISE's time budget is capped by what is left of it."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.limits.explanation_timeout_s  # the admission's, counted from now too
        try:
            return await self._explanations.run(functools.partial(predictor.explain, images, wishes, settings, rows,
                                                                  deadline=deadline))
        except Busy:
            raise RequestError(429, ErrorCode.TOO_MANY_EXPLANATIONS, f"{self._explanations.admitted} explanation "
                               "requests are in progress on this replica; retry later",
                               headers={"retry-after": "5"}) from None
        except TimedOut:
            raise RequestError(504, ErrorCode.EXPLANATION_TIMEOUT, f"the explanation took over "
                               f"{self.limits.explanation_timeout_s:g} s (explanation_timeout_s); try fewer images, "
                               "a smaller n_steps, a faster xai_algorithm or (d_rise) fewer number_of_masks") from None
        finally:
            self.explain_seconds.observe(time.perf_counter() - started)
