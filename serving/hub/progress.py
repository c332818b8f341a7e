"""`GET /models/{name}/progress`: a hub training's validation metric per epoch, read from MLflow while it runs and
after. A training is one sweep run in the "visionserve-hub" experiment, named after the model (`training.py`),
its trials nested runs named `<model>-trial-<i>` that log the task's primary metric at each evaluated epoch
(`models/train/loop.py`). The newest sweep run of that name not older than the model's record is the one."""

from __future__ import annotations

import calendar
import time
from typing import Any

from mlflow import MlflowClient

from models.tasks.metrics import primary_metric_name
from serving.hub.model_request import KIND_TASK
from serving.hub.training import EXPERIMENT

MAX_TRIALS = 100


def _created_ms(record: dict[str, Any]) -> int:
    """The model record's createdDateTime in ms since the epoch (0 when it has none: a registry model)."""
    try:
        return calendar.timegm(time.strptime(record.get("createdDateTime") or "", "%Y-%m-%dT%H:%M:%SZ")) * 1000
    except ValueError:
        return 0


def _epochs(params: dict[str, str]) -> int | None:
    value = params.get("number_of_epochs", "")
    return int(value) if value.isdigit() else None


def _trial(client: Any, run: Any, metric: str) -> dict[str, Any]:
    """One trial: its architecture, state, planned epochs and the metric at each epoch (the last value of a step)."""
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, metric),
                                               key=lambda m: (m.step, m.timestamp))}
    return {"runId": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "architecture": run.data.tags.get("model_name") or run.data.params.get("model_name"),
            "frozenLayers": run.data.params.get("layers_to_freeze"), "epochs": _epochs(run.data.params),
            "points": [{"epoch": step, "value": value} for step, value in sorted(by_step.items())]}


def training_progress(record: dict[str, Any], message: str | None, tracking_uri: str) -> dict[str, Any]:
    """The model's status, its training's message and each trial's metric per epoch (no trials: none logged yet,
    or a model registered outside the hub)."""
    name = record["name"]
    kind = (record.get("trainingParameters") or {}).get("modelKind") or "Generic-Classifier"
    task = record.get("_task") or KIND_TASK.get(kind, "image_classification")
    metric = primary_metric_name(task)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    sweep, trials = None, []
    if experiment is not None:  # `name` passed name_problem: letters, digits, '.', '_', '-' only
        found = client.search_runs([experiment.experiment_id], max_results=1,
                                   filter_string=f"attributes.run_name = '{name}' and tags.sweep = '1' and "
                                                 f"attributes.start_time >= {_created_ms(record)}",
                                   order_by=["attributes.start_time DESC"])
        if found:
            sweep = found[0]
            children = client.search_runs([experiment.experiment_id], max_results=MAX_TRIALS,
                                          filter_string=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'",
                                          order_by=["attributes.start_time ASC"])
            trials = [_trial(client, run, metric) for run in children]
    return {"name": name, "status": record["status"], "task": task, "metric": metric, "message": message,
            "sweepRunId": sweep.info.run_id if sweep else None, "trials": trials}
