"""The models the hub serves, as any ingress replica reads them: the hub's own records (a running training's
progress folded in) and the MLflow Model Registry's (`Registry`), through `Catalog` (which keeps what it found of a
name for NAMES_TTL_S seconds, as scoring asks on every request); `GET /models`: every
model with its task, labels and status; `GET /models/{name}/metadata`. What changes them is serving.hub.jobs'."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from typing import Any

import mlflow
from cachetools import TTLCache
from fastapi.responses import JSONResponse

from serving.hub.api import ApiError, not_found
from serving.hub.state import Store
from serving.hub.training import RUN_TAG

log = logging.getLogger("ray.serve")
NAMES_KEPT = 1024  # registry look-ups kept (a client may name any number of unknown models)
NAMES_TTL_S = 5  # how long one is trusted: a model registered elsewhere is served within this


def model_id(name: str, version: str | int) -> str:
    """The multiplexed model id HubModels serves a registered version by: a retrained model is a new id, so no
    replica answers from a stale model."""
    return f"{name}/{version}"


class Registry:
    """The registry's blocking queries, for the routes' worker threads: a name's latest version (kept NAMES_TTL_S
    seconds, at most `names_kept` names, unknown ones a client sends included), the versions one training run
    registered, and a name's removal."""

    def __init__(self, names_kept: int = NAMES_KEPT):
        self._names: TTLCache = TTLCache(names_kept, NAMES_TTL_S)  # name → (latest version, its tags)
        self._lock = threading.Lock()

    @staticmethod
    def _client() -> mlflow.MlflowClient:
        return mlflow.MlflowClient()

    def warm_up(self) -> None:
        """The client and its store opened (MLflow imported, the tracking store's engine made) as a replica starts,
        not on its first request (measured: 0.7-1.2 s of a hub's very first call). A registry out of reach is
        said by the first look-up, not here."""
        try:
            self._client().search_registered_models(max_results=1)
        except Exception as exc:  # noqa: BLE001  (any failure of a remote store)
            log.warning("hub: the model registry did not answer as this replica started: %s", exc)

    def latest(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """(latest version, its tags) of a registered model, or (None, {})."""
        with self._lock:
            cached = self._names.get(name)
        if cached is not None:
            return cached
        try:
            versions = self._client().search_model_versions(f"name='{name}'")
        except Exception:  # noqa: BLE001  (not registered, or a name the registry refuses)
            versions = []
        latest = max(versions, key=lambda v: int(v.version), default=None)
        found = (latest.version, dict(latest.tags or {})) if latest is not None else (None, {})
        with self._lock:
            self._names[name] = found
        return found

    def forget(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)

    def __len__(self) -> int:
        return len(self._names)

    def record(self, name: str) -> dict[str, Any] | None:
        """A model registered the usual MLflow way (`visionserve train`, `mlflow.register_model`), as a record."""
        version, tags = self.latest(name)
        if version is None:
            return None
        return {"name": name, "status": "succeeded", "createdDateTime": "", "_version": version,
                "trainingParameters": {"modelKind": tags.get("modelKind", "Generic-Classifier")},
                "modelVersion": version}

    def names(self) -> list[str]:
        try:
            return [m.name for m in self._client().search_registered_models()]
        except Exception:  # noqa: BLE001
            return []

    def run_versions(self, name: str, run: str | None) -> list[Any]:
        """The registered versions of `name` that the training run `run` registered (tagged with it)."""
        if not run:
            return []
        try:
            versions = self._client().search_model_versions(f"name='{name}'")
        except Exception:  # noqa: BLE001  (never registered)
            return []
        return [v for v in versions if (v.tags or {}).get(RUN_TAG) == run]

    def unregister(self, name: str) -> None:
        self.forget(name)
        try:
            self._client().delete_registered_model(name)
        except Exception:  # noqa: BLE001  (never registered, or already gone)
            log.info("hub: model %s was not in the registry", name)


@functools.lru_cache(maxsize=256)
def _registered_settings(name: str, version: str) -> tuple[str | None, tuple[str, ...]]:
    """(task, labels) of a registered model version, read from its settings.json."""
    import mlflow

    try:
        source = mlflow.MlflowClient().get_model_version(name, version).source
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/artifacts/settings.json")
        settings = json.loads(open(path, encoding="utf-8").read())
        return settings.get("task"), tuple(settings.get("labels") or ())
    except Exception:  # noqa: BLE001  (not a visionserve model, or its artifacts are elsewhere)
        return None, ()


class Catalog:
    """The models the hub serves and their evaluations as they are now, read from the store and the registry (blocking: the routes call
    these off the event loop, but `served`, which answers a known id on it). 404 for what does not exist, 409 for a
    model not trained yet."""

    def __init__(self, store: Store, registry: Registry):
        self.store, self.registry = store, registry
        # name → model id of a model found servable, trusted NAMES_TTL_S seconds as the registry's look-ups are:
        # scoring asks on every request (measured: the look-up and its thread hop were about 2 of the 8 ms of CPU
        # an ingress spent per /score); a model deleted through another ingress replica may answer that long
        self._ids: TTLCache = TTLCache(NAMES_KEPT, NAMES_TTL_S)
        self._lock = threading.Lock()

    def merged(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record as it is now: a running training's own progress folded in."""
        if record["status"] == "notStarted" and self.store.progress(record["name"]).get("status") == "training":
            return {**record, "status": "training"}
        return record

    def record(self, name: str) -> dict[str, Any]:
        """The hub's record of a model as it is now (or a registry model's), private keys kept; 404 unknown."""
        record = self.store.get("models", name) or self.registry.record(name)
        if record is None:
            raise not_found("model", name)
        return self.merged(record)

    def model_id(self, name: str) -> str:
        """The multiplexed model id (serving.hub.replicas) to serve `name` (404 unknown, 409 not trained yet)."""
        mid = self._kept(name)
        if mid is None:
            mid = self._look_up(name)
            with self._lock:
                self._ids[name] = mid
        return mid

    async def served(self, name: str) -> str:
        """model_id for a route: one found within NAMES_TTL_S seconds is answered on the event loop, any other
        looked up off it."""
        return self._kept(name) or await asyncio.to_thread(self.model_id, name)

    def _kept(self, name: str) -> str | None:
        with self._lock:
            return self._ids.get(name)

    def forget(self, name: str) -> None:
        """`name` changed here (deleted, adopted): looked up again on its next request."""
        with self._lock:
            self._ids.pop(name, None)
        self.registry.forget(name)

    def _look_up(self, name: str) -> str:
        record = self.store.get("models", name)
        if record is not None:
            if record["status"] != "succeeded":
                raise ApiError(409, "ModelNotReady", f"model {name!r} is {self.merged(record)['status']}, "
                               "not succeeded", name)
            return model_id(name, record["_version"])
        version, _ = self.registry.latest(name)
        if version is None:
            raise not_found("model", name)
        return model_id(name, version)

    def listing(self) -> list[dict[str, Any]]:
        own = [self.merged(r) for r in self.store.all("models")]
        known = {r["name"] for r in own}
        others = [n for n in self.registry.names() if n not in known]
        return own + [r for r in (self.registry.record(n) for n in others) if r is not None]

    def hub_wide(self) -> list[dict[str, Any]]:
        """GET /models: every model with its task, labels and status."""
        return [describe(r, self.store) for r in self.listing()]

    def evaluation(self, model: str, name: str) -> dict[str, Any]:
        record = self.store.get("evaluations", name, model)
        if record is None:
            raise not_found("evaluation", name)
        return record

    def evaluations(self, model: str) -> list[dict[str, Any]]:
        if self.store.get("models", model) is None and self.registry.latest(model)[0] is None:
            raise not_found("model", model, "modelNotFound")
        return self.store.all("evaluations", model)


def describe(record: dict[str, Any], store: Store) -> dict[str, Any]:
    version = record.get("_version")
    task, labels = record.get("_task"), record.get("_labels")
    if version and task is None:
        task, found = _registered_settings(record["name"], str(version))
        labels = list(found)
    return {"name": record["name"], "status": record["status"], "version": version, "task": task,
            "labels": labels or [], "modelKind": (record.get("trainingParameters") or {}).get("modelKind"),
            "source": "hub" if store.get("models", record["name"]) is not None else "registry"}


async def metadata(service: Any, name: str) -> JSONResponse:
    """`GET /models/{name}/metadata`: what `/metadata` answers on `visionserve serve`, from a replica that holds the
    model (404 unknown, 409 not trained yet)."""
    mid = await service.catalog.served(name)
    answer = await service.models.options(multiplexed_model_id=mid).metadata.remote()
    return JSONResponse({**answer, "model": name, "version": mid.rsplit("/", 1)[1],
                         "explanations": bool(answer["xai_parameters"])})
