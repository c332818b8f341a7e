"""The hub's one owner of runs: a Ray Serve deployment of one replica holding the trainings and evaluations in
flight (serving.hub.jobs: the queue, the runs' actors, `:cancel`, restart recovery). The ingress (HubService, as
many replicas as `--ingress-replicas` asks, stateless) reads records itself and sends every change of a model or
an evaluation here, so two ingress replicas never start, cancel or write the same run twice."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import ray
from ray import serve

from serving.hub.api import ApiError
from serving.hub.config import HubConfig
from serving.hub.jobs import Answer, Jobs
from serving.hub.metrics import TrainingSeries
from serving.hub.scheduler import Quotas, default_slots
from serving.hub.state import Store

log = logging.getLogger("ray.serve")


# A refusal crosses from this replica to the ingress as a value, the ApiError itself: raised, it would arrive
# wrapped in Ray's task error (and be logged here as one).
Reply = tuple[int, dict[str, Any] | ApiError | None]


@serve.deployment(name="HubJobs", num_replicas=1, max_ongoing_requests=64, health_check_period_s=10,
                  graceful_shutdown_timeout_s=60)  # its trainings stop first (Jobs.stop_all)
class HubJobs:
    def __init__(self, config: dict[str, Any]):
        config = HubConfig(**config)
        store = Store(config.state_dir, config.state_db)
        slots = config.max_concurrent_trainings or default_slots(ray.cluster_resources().get("CPU", 1))
        self.jobs = Jobs(store, config, slots, Quotas(**config.quotas), observe=TrainingSeries().now)
        self.jobs.recover()  # what a restart interrupted ends failed (or cancelled), never stays training
        self.jobs.dispatch()  # trainings that were waiting for a slot wait again, and the first ones start
        log.info("visionserve hub: runs owned here, state in %s, registry %s", store.root, config.tracking_uri)

    def __del__(self) -> None:
        """Serve stops this replica (shutdown, redeploy): its trainings stop too, their CPUs given back."""
        jobs = getattr(self, "jobs", None)
        if jobs is not None:
            jobs.stop_all()

    async def create_model(self, name: str, doc: dict[str, Any]) -> Reply:
        return await _reply(self.jobs.create_model(name, doc))

    async def cancel(self, name: str) -> Reply:
        return await _reply(self.jobs.cancel(name))

    async def delete_model(self, name: str) -> Reply:
        return await _reply(self.jobs.delete_model(name))

    async def create_evaluation(self, model: str, name: str, doc: dict[str, Any]) -> Reply:
        return await _reply(self.jobs.create_evaluation(model, name, doc))

    async def delete_evaluation(self, model: str, name: str) -> Reply:
        return await _reply(self.jobs.delete_evaluation(model, name))


async def _reply(change: Awaitable[Answer]) -> Reply:
    try:
        return await change
    except ApiError as exc:
        return exc.status, exc


async def changed(call: Any) -> Answer:
    """The ingress's awaited `HubJobs.<change>.remote(...)`: its answer, or its refusal raised."""
    status, body = await call
    if isinstance(body, ApiError):
        raise body
    return status, body
