"""Where a model comes from and how it is made ready to score: an MLflow model folder or URI → its
settings, the network with its weights on a device, and the scorer (BatchNorm folded, compiled, or the
model's ONNX file on ONNX Runtime)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.export import SETTINGS_FILE, WEIGHTS_FILE, ModelSettings, read_settings
from models.onnx_export import ONNX_FILE
from models.tasks.architectures import Architecture, build_model, get_architecture
from serving.backends import BACKENDS, DEFAULT_BACKEND, choose

log = logging.getLogger(__name__)

_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "abfss://", "dbfs:/",
                "http://", "https://")


def resolve_model(model: str | Path) -> Path:
    """A local MLflow model folder for `model`: a folder as is, or an MLflow URI (`models:/name/1`,
    `runs:/<id>/mlflow-model`, …) downloaded through MLflow's artifact API."""
    text = str(model)
    if text.startswith(_URI_SCHEMES):
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    path = Path(text.removeprefix("file://")).expanduser()
    if not (path / "MLmodel").is_file():
        raise FileNotFoundError(f"{model}: not an MLflow model folder (no MLmodel file) nor an MLflow URI")
    return path.resolve()


def find_artifacts(model_dir: str | Path) -> tuple[Path, Path]:
    """settings.json and model.pt of an MLflow model folder (or of a bare artifacts folder)."""
    root = Path(model_dir)
    for folder in (root / "artifacts", root):
        if (folder / SETTINGS_FILE).exists():
            return folder / SETTINGS_FILE, folder / WEIGHTS_FILE
    raise FileNotFoundError(f"{model_dir}: no artifacts/{SETTINGS_FILE}; is this a visionserve model folder?")


def check_backend(model_dir: str | Path, backend: str) -> None:
    """Before anything loads: a ValueError when `backend` (BACKENDS) cannot score the model in `model_dir`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "onnx":
        from serving.onnx_backend import onnx_file

        settings_path, weights_path = find_artifacts(model_dir)
        onnx_file(weights_path.parent, read_settings(settings_path))


def chosen_backend(model_dir: str | Path, backend: str, device: torch.device | str) -> str:
    """What `backend` ("auto" included) scores the model in `model_dir` with on `device`: "torch" or "onnx"."""
    settings_path, weights_path = find_artifacts(model_dir)
    return choose(backend, read_settings(settings_path).task.family, torch.device(device).type == "cpu",
                  (weights_path.parent / ONNX_FILE).is_file())


def default_device() -> torch.device:
    """`VISIONSERVE_DEVICE` if set, else the first GPU when one is visible, else the CPU."""
    name = os.environ.get("VISIONSERVE_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of `model` with each BatchNorm folded into the convolution before it (torch.fx):
    the same outputs to ~1e-6, 3-16 % less time per image for resnet18 on a CPU. `model` itself when it
    has no BatchNorm2d (the detectors' is frozen into their backbones already) or torch.fx cannot trace it."""
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception as exc:  # noqa: BLE001  (a model fx cannot trace is scored as it is)
        log.info("BatchNorm not folded for %s: %s", type(model).__name__, exc)
        return model


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: `model` (eval mode, on `device`; explanations use it) and `scorer`
    (what scoring calls: `model` with BatchNorm folded, compiled when asked)."""

    spec: ModelSettings
    arch: Architecture
    model: torch.nn.Module
    scorer: torch.nn.Module
    device: torch.device


def _weights(model: torch.nn.Module, spec: ModelSettings, weights_path: Path, settings_path: Path) -> None:
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except RuntimeError as exc:
        raise ValueError(f"{weights_path} does not fit {spec.model_name} with {len(spec.labels)} labels "
                         f"and the settings in {settings_path} ({str(exc).splitlines()[0]}); "
                         "was valid_crop_size changed for a ViT model?") from None


def load_model(settings_path: str | Path, weights_path: str | Path, *, device: torch.device | None = None,
               overrides: dict[str, Any] | None = None, compile_scorer: bool = False,
               backend: str = DEFAULT_BACKEND) -> LoadedModel:
    """The model of an exported folder's files; `compile_scorer`: a classifier on the CPU is compiled now
    (serving.compiled: slower to load, faster per image; for long-lived processes) when torch scores it;
    `backend` (BACKENDS): "onnx" scores with the folder's model.onnx (a ValueError says why a model has
    none), "auto" with it where that is faster (serving.backends.choose)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")  # as check_backend says
    spec = read_settings(settings_path, overrides)
    device = device or default_device()
    arch = get_architecture(spec.model_name, spec.task.family)
    model = build_model(arch, len(spec.labels), spec.settings)
    _weights(model, spec, Path(weights_path), Path(settings_path))
    model.eval().to(device)
    scorer = fold_batchnorm(model)
    for module in {model, scorer}:
        if arch.channels_last:
            module.to(memory_format=torch.channels_last)
        if spec.settings.half_precision and device.type == "cuda":
            module.half()
    if spec.task.family == "segmentation":
        from models.tasks.detection import paste_masks_one_at_a_time

        paste_masks_one_at_a_time(scorer)
    shape = spec.task.ops.input_shape(spec.settings)
    backend = choose(backend, spec.task.family, device.type == "cpu", (Path(weights_path).parent / ONNX_FILE).is_file())
    if backend == "onnx":
        from serving.onnx_backend import onnx_scorer

        scorer = onnx_scorer(Path(weights_path).parent, spec, device, fallback=scorer)
    elif compile_scorer and device.type == "cpu" and shape:
        from serving.compiled import compile_for_cpu

        scorer = compile_for_cpu(scorer, shape)
    log.info("loaded %s (%s, %d labels) on %s", spec.model_name, spec.task.name, len(spec.labels), device)
    return LoadedModel(spec, arch, model, scorer, device)
