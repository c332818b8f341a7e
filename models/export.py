"""The MLflow model folder (training.md, last section) and its `artifacts/settings.json`.

    mlflow-model/
      MLmodel, conda.yaml, python_env.yaml, requirements.txt, mlflow_model.py
      code/models, code/serving, code/explain   visionserve's own packages (MLflow `code_paths`)
      artifacts/settings.json   task, model_name, labels and inference.md's parameters
      artifacts/model.pt        the weights, a plain state_dict
      artifacts/model.onnx      the same network for ONNX Runtime (models.onnx_export)
      artifacts/model.int8.onnx that network statically quantized for CPUs, when it quantizes (models.onnx_int8);
                                settings.json's `int8` records what it costs on the validation set

The pyfunc is MLflow "models from code": `mlflow_model.py` names `serving.pyfunc.VisionModel`, imported
from the folder's own `code/` when it is loaded; nothing is pickled. `requirements.txt` pins only packages
of the package registry, so `mlflow models serve --env-manager uv|virtualenv` rebuilds the environment
anywhere, visionserve installed or not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from models.errors import SettingsError
from models.int8_record import INT8_FILE, Int8Record
from models.onnx_int8 import QuantizationData, make_int8, write_int8
from models.onnx_export import ONNX_FILE, exportable, write_onnx
from models.tasks.fields import as_dict, is_per_request, kind_of
from models.tasks.registry import Task, get_task, inference_settings

SETTINGS_FILE = "settings.json"
# The file MLflow runs to find the pyfunc class (models from code). The folder names it; `models` never
# imports it (serving sits above models, see ARCHITECTURE.md).
PYFUNC_ENTRY = "serving.mlflow_model"
WEIGHTS_FILE = "model.pt"
# settings.json's fields that are not inference settings; `int8` (models.int8_record.Int8Record) is there only when
# the folder has a model.int8.onnx, so folders written before it are read as they were
_META_KEYS = ("task", "model_name", "labels", "visionserve_version", "int8")
# What the pyfunc imports, explanations included (pip resolves what these need in turn);
# tests/test_exported_environment.py checks the list against what loading, scoring and explaining import.
_RUNTIME_PACKAGES = ("torch", "torchvision", "mlflow", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "tqdm",
                     "opencv-python-headless", "pycocotools", "timm", "captum", "saliency", "scikit-image",
                     "matplotlib", "colorcet", "onnx", "onnxruntime")
# visionserve's packages copied into the folder; `loadtests` and the tests are not needed to load it
CODE_PACKAGES = ("models", "serving", "explain")


@dataclass(frozen=True)
class ModelSettings:
    """settings.json, parsed: which model, its labels, and the validated inference settings."""

    task: Task
    model_name: str
    labels: list[str]
    settings: Any
    int8: Int8Record | None = None  # what artifacts/model.int8.onnx costs, when the folder has one

    def document(self) -> dict[str, Any]:
        int8 = {"int8": self.int8.document()} if self.int8 is not None else {}
        return {"task": self.task.name, "model_name": self.model_name, "labels": list(self.labels),
                "visionserve_version": _version("visionserve"), **as_dict(self.settings, inference_only=True),
                **int8}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def model_settings_from_training(task: Task, model_name: str, labels: list[str], training_settings: Any) -> ModelSettings:
    values = as_dict(training_settings, inference_only=True)
    return ModelSettings(task, model_name, list(labels), inference_settings(task, values))


def read_settings(path: str | Path, overrides: dict[str, Any] | None = None) -> ModelSettings:
    """Parse and validate settings.json (and deploy-time overrides) with clear errors naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError([f"{path}: file not found"], str(path)) from None
    except json.JSONDecodeError as exc:
        raise SettingsError([f"not valid JSON ({exc.msg} at line {exc.lineno})"], str(path)) from None
    problems = []
    if not isinstance(doc, dict):
        raise SettingsError(["expected a JSON object"], str(path))
    try:
        task = get_task(str(doc.get("task")))
    except ValueError as exc:
        raise SettingsError([str(exc)], str(path)) from None
    labels = doc.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        problems.append("labels: expected a non-empty list of class names")
    if not isinstance(doc.get("model_name"), str):
        problems.append("model_name: missing")
    if problems:
        raise SettingsError(problems, str(path))
    values = {k: v for k, v in doc.items() if k not in _META_KEYS}
    values.update(overrides or {})
    settings = inference_settings(task, values, source=str(path))
    int8 = Int8Record.from_document(doc["int8"], str(path)) if doc.get("int8") is not None else None
    return ModelSettings(task, doc["model_name"], labels, settings, int8)


def write_settings(path: str | Path, model_settings: ModelSettings) -> None:
    """settings.json of `model_settings`."""
    Path(path).write_text(json.dumps(model_settings.document(), indent=2) + "\n")


def add_int8(artifacts: str | Path, data: QuantizationData) -> Int8Record:
    """An exported folder's `artifacts` given a model.int8.onnx (replacing one it has) quantized from its
    model.onnx (written first from model.pt when a folder from before ONNX files lacks it), and settings.json's
    `int8` record; every other field of settings.json is kept as it is. Raises, the folder unchanged, when the
    model does not quantize."""
    artifacts = Path(artifacts)
    settings_path = artifacts / SETTINGS_FILE
    spec = read_settings(settings_path)
    if not exportable(spec.task):
        raise ValueError(f"{spec.model_name} ({spec.task.name}) has no ONNX graph to quantize")
    onnx_path = artifacts / ONNX_FILE
    if not onnx_path.is_file():
        state = torch.load(artifacts / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        if write_onnx(onnx_path, spec, state) is None:
            raise ValueError(f"{onnx_path} is missing and could not be written (the log says why)")
    with tempfile.TemporaryDirectory(dir=artifacts, prefix=".int8-") as tmp:
        record = make_int8(onnx_path, Path(tmp) / INT8_FILE, spec, data)
        doc = json.loads(settings_path.read_text())
        doc["int8"] = record.document()
        (Path(tmp) / SETTINGS_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(Path(tmp) / INT8_FILE, artifacts / INT8_FILE)
        os.replace(Path(tmp) / SETTINGS_FILE, settings_path)  # whole: a reader never sees half a file
    return record


def pip_requirements() -> list[str]:
    """The packages the pyfunc needs at load time, pinned to this environment's versions."""
    return [f"{name}=={_version(name)}" for name in _RUNTIME_PACKAGES if _version(name)]


def _code_paths(into: Path) -> list[str]:
    """visionserve's packages, copied without bytecode caches, for MLflow's `code_paths`."""
    root = Path(__file__).resolve().parent.parent
    paths = []
    for package in CODE_PACKAGES:
        shutil.copytree(root / package, into / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        paths.append(str(into / package))
    return paths


_PARAM_TYPES = {int: "long", float: "double", str: "string", bool: "boolean"}


def signature(task: Task):
    """Input: one string column `image` (base64). Params: the task's inference settings, each
    overridable per request (default None: settings.json decides), so that `mlflow models serve`
    forwards them."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    specs = [ParamSpec(name, _PARAM_TYPES[kind_of(field)[0]], None)
             for name, field in task.inference_cls.model_fields.items() if is_per_request(field)]
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), params=ParamSchema(specs))


def _pyfunc_entry() -> str:
    spec = importlib.util.find_spec(PYFUNC_ENTRY)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{PYFUNC_ENTRY} is not importable: is visionserve installed?")
    return spec.origin


@contextlib.contextmanager
def _quiet_save() -> Iterator[None]:
    """MLflow save settings for one call: don't copy the *current directory's* uv.lock/pyproject.toml
    into the model (we pin requirements ourselves, the folder must not depend on where the command
    ran), no progress bar for copying two local files."""
    wanted = {"MLFLOW_UV_AUTO_DETECT": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    previous = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def export_model(path: str | Path, model_settings: ModelSettings, state_dict: dict[str, torch.Tensor], *,
                 quantization: QuantizationData | None = None) -> Path:
    """Write the MLflow model folder at `path` (replaced if it exists); with `quantization` (training and
    validation records) a model.int8.onnx too, where the model's ONNX graph quantizes."""
    import mlflow.pyfunc

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    with tempfile.TemporaryDirectory() as tmp, _quiet_save(), warnings.catch_warnings():
        # an input example would make MLflow load and run the model at save time; the signature says it all
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # "pip version" noise under uv
        weights_file = Path(tmp) / WEIGHTS_FILE
        torch.save({k: v.detach().cpu() for k, v in state_dict.items() if not k.endswith("num_batches_tracked")},
                   weights_file)
        settings_file = Path(tmp) / SETTINGS_FILE
        artifacts = {"settings": str(settings_file), "weights": str(weights_file)}
        if exportable(model_settings.task) and write_onnx(Path(tmp) / ONNX_FILE, model_settings, state_dict):
            artifacts["onnx"] = str(Path(tmp) / ONNX_FILE)
            if quantization is not None and (record := write_int8(tmp, model_settings, quantization)):
                artifacts["int8"] = str(Path(tmp) / INT8_FILE)
                model_settings = replace(model_settings, int8=record)
        write_settings(settings_file, model_settings)
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=_pyfunc_entry(),
            artifacts=artifacts,
            signature=signature(model_settings.task),
            pip_requirements=pip_requirements(),
            code_paths=_code_paths(Path(tmp) / "code"),
            metadata={"task": model_settings.task.name, "model_name": model_settings.model_name},
            # what a loader may set: load_model(..., model_config={"backend": "onnx"}) or, for `mlflow models
            # serve`, MLFLOW_PYFUNC_INFERENCE_CONFIG='{"compile": true}' (serving.pyfunc, serving.loading)
            model_config={"backend": "auto", "compile": False},
        )
    return path
