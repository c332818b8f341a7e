"""`GET /models`: every model the hub serves, with its task, labels and status; `GET /models/{name}/metadata`."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from fastapi.responses import JSONResponse

from serving.hub.state import Store


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
    mid = await asyncio.to_thread(service.jobs.model_id, name)
    answer = await service.models.options(multiplexed_model_id=mid).metadata.remote()
    return JSONResponse({**answer, "model": name, "version": mid.rsplit("/", 1)[1],
                         "explanations": bool(answer["xai_parameters"])})
