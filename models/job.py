"""The cloud's job YAML (training.md, "Job settings") and command-line flags → a `TrainingJob`.

Paths in a job file are relative to the file. Flags given on the command line win over the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from models.errors import SettingsError
from models.data.streaming import is_remote
from models.sweep.settings import parse_sweep
from models.tasks.registry import get_task
from models.train.loop import TrainingJob

# Keys of the cloud's job YAML that describe its own infrastructure: accepted and not used here.
_IGNORED_KEYS = {"$schema", "type", "compute", "description", "tags", "log_verbosity", "display_name",
                 "properties", "outputs", "environment_variables", "queue_settings", "resources", "identity"}
_KNOWN_KEYS = {"task", "target_column_name", "training_data", "validation_data", "limits", "training_parameters",
               "search_space", "sweep", "experiment_name", "name", "primary_metric", "validation_data_size",
               "image_root"} | _IGNORED_KEYS


def _data_path(value: Any, base: Path, key: str) -> Path:
    if isinstance(value, Mapping):
        kind = str(value.get("type", "mltable")).lower()
        if kind not in ("mltable", "uri_file", "uri_folder", "jsonl"):
            raise SettingsError([f"{key}.type: {kind!r} is not supported; use mltable (a folder) or a JSONL file"],
                                "job file")
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise SettingsError([f"{key}: expected a path (or {{path: ..., type: mltable}})"], "job file")
    if value.startswith(("azureml:", "azureml://")):
        raise SettingsError([f"{key}: {value!r} is a cloud data asset; download it and give a local path"], "job file")
    path = Path(value.removeprefix("file://"))
    return path if path.is_absolute() else base / path


def _properties(doc: Mapping[str, Any]) -> tuple[int, int | None]:
    """`properties.node_count_per_trial` (and visionserve's `workers_per_node`) → Ray Train workers."""
    props = doc.get("properties") or {}
    out = []
    for key, default in (("node_count_per_trial", 1), ("workers_per_node", None)):
        value = props.get(key, default) if isinstance(props, Mapping) else default
        if value is None:
            out.append(None)
            continue
        try:
            number = int(str(value))
        except ValueError:
            number = 0
        if number < 1:
            raise SettingsError([f"properties.{key}={value!r}: must be an integer >= 1"], "job file")
        out.append(number)
    return out[0], out[1]


def read_job_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SettingsError([f"{path}: file not found"], "job file") from None
    except yaml.YAMLError as exc:
        raise SettingsError([f"{path}: not valid YAML ({exc})"], "job file") from None
    if not isinstance(doc, dict):
        raise SettingsError([f"{path}: expected a mapping of job settings"], "job file")
    unknown = [k for k in doc if k not in _KNOWN_KEYS]
    if unknown:
        raise SettingsError([f"{k}: unknown job key" + _suggest(k, _KNOWN_KEYS) for k in unknown], str(path))
    return doc


def _suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_job(
    job_file: str | Path | None = None,
    *,
    task: str | None = None,
    training_data: str | Path | None = None,
    validation_data: str | Path | None = None,
    model_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    output_dir: str | Path = "outputs",
    image_root: str | Path | None = None,
    experiment_name: str | None = None,
    run_name: str | None = None,
) -> TrainingJob:
    """Merge a job file (if any) with flags into a TrainingJob; settings are checked later, all at once."""
    doc: dict[str, Any] = {}
    base = Path.cwd()
    if job_file is not None:
        doc = read_job_file(job_file)
        base = Path(job_file).resolve().parent
    if doc.get("target_column_name", "label") != "label":
        raise SettingsError([f"target_column_name={doc['target_column_name']!r}: the label column must be 'label'"],
                            "job file")
    task_name = task or doc.get("task")
    if not task_name:
        raise SettingsError(["task: missing (give --task or a task: key in the job file)"], "job")
    task_obj = get_task(task_name)
    sweep = parse_sweep(doc, task_obj)
    nodes, per_node = _properties(doc)
    if doc.get("primary_metric") not in (None, task_obj.primary_metric):
        raise SettingsError([f"primary_metric={doc['primary_metric']!r}: {task_name} uses "
                             f"{task_obj.primary_metric}"], "job file")
    train = Path(training_data) if training_data else (
        _data_path(doc["training_data"], base, "training_data") if "training_data" in doc else None)
    if train is None:
        raise SettingsError(["training_data: missing (give --training-data or training_data: in the job file)"], "job")
    validation = Path(validation_data) if validation_data else (
        _data_path(doc["validation_data"], base, "validation_data") if doc.get("validation_data") else None)
    parameters = dict(doc.get("training_parameters") or {})
    if "validation_data_size" in doc:
        parameters.setdefault("validation_data_size", doc["validation_data_size"])
    parameters.update(params or {})
    if model_name:
        parameters["model_name"] = model_name
    root = image_root or doc.get("image_root") or None
    if root is not None and not is_remote(root):  # an fsspec URL stays a URL (stream_image_files)
        root = base / root if job_file is not None and image_root is None else Path(root)
    return TrainingJob(
        task=task_obj, training_data=train, validation_data=validation, parameters=parameters,
        output_dir=Path(output_dir), image_root=root,
        experiment_name=experiment_name or doc.get("experiment_name") or "visionserve",
        run_name=run_name or doc.get("name"),
        timeout_minutes=sweep.limits.timeout_minutes if sweep.limits.timeout_given else None,
        sweep=sweep if sweep.is_sweep else None, node_count=nodes, workers_per_node=per_node,
    )
