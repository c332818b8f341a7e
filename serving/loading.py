"""Where a model comes from and how it is made ready to score: an MLflow model folder or URI → a `ModelFolder`
(its settings.json read once), a `ScoringPlan` for it (serving.backends), and the network with its weights on a
device plus the scorer the plan names (serving.scorers)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental.optimization import fuse

from models.export import SETTINGS_FILE, WEIGHTS_FILE, ModelSettings, read_settings
from models.int8_record import INT8_FILE
from models.onnx_export import ONNX_FILE, not_exported_why
from models.tasks.architectures import Architecture, build_model, get_architecture
from models.tasks.detection import paste_masks_one_at_a_time
from serving.backends import ScoringPlan, plan
from serving.scorers import Scorer, networks, scorer_for

log = logging.getLogger(__name__)

_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "abfss://", "dbfs:/",
                "http://", "https://")


def resolve_model(model: str | Path) -> Path:
    """A local MLflow model folder for `model`: a folder as is, or an MLflow URI (`models:/name/1`,
    `runs:/<id>/mlflow-model`, …) downloaded through MLflow's artifact API into this process's downloads folder
    (removed when the process ends), once per URI: a model loaded again (the hub's replicas reload what their
    memory budget evicted) reuses its files instead of downloading another copy."""
    text = str(model)
    if text.startswith(_URI_SCHEMES):
        import hashlib
        import shutil
        import tempfile

        import mlflow

        from models.runtime import downloads_folder

        folder = downloads_folder() / hashlib.sha256(text.encode()).hexdigest()[:24]
        if not folder.is_dir():  # a download goes to a folder of its own first: a half-done one is never reused
            partial = Path(tempfile.mkdtemp(dir=downloads_folder()))
            mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(partial))
            try:
                partial.rename(folder)
            except OSError:  # another thread's download of the same URI got there first
                shutil.rmtree(partial, ignore_errors=True)
        found = sorted(folder.rglob("MLmodel"), key=lambda p: len(p.parts))  # `runs:/<id>/name` lands in name/
        return found[0].parent if found else folder
    path = Path(text.removeprefix("file://")).expanduser()
    if not (path / "MLmodel").is_file():
        raise FileNotFoundError(f"{model}: not an MLflow model folder (no MLmodel file) nor an MLflow URI")
    return path.resolve()


def find_artifacts(model_dir: str | Path) -> Path:
    """The folder of settings.json and model.pt in an MLflow model folder (or a bare artifacts folder)."""
    root = Path(model_dir)
    for folder in (root / "artifacts", root):
        if (folder / SETTINGS_FILE).exists():
            return folder
    raise FileNotFoundError(f"{model_dir}: no artifacts/{SETTINGS_FILE}; is this a visionserve model folder?")


@dataclass(frozen=True)
class ModelFolder:
    """An exported model on this machine, settings.json read (once, with deploy-time overrides): `path` (the
    MLflow folder), `artifacts` (its settings.json, model.pt, model.onnx, model.int8.onnx), `model_settings`."""

    path: Path
    artifacts: Path
    model_settings: ModelSettings

    @classmethod
    def open(cls, model: str | Path, overrides: dict[str, Any] | None = None) -> ModelFolder:
        """`model` (a folder or MLflow URI, see resolve_model) read; SettingsError for bad settings or overrides."""
        path = resolve_model(model)
        return cls.of_artifacts(find_artifacts(path), overrides, path)

    @classmethod
    def of_artifacts(cls, artifacts: str | Path, overrides: dict[str, Any] | None = None,
                     path: Path | None = None) -> ModelFolder:
        artifacts = Path(artifacts)
        return cls(path or artifacts.parent, artifacts, read_settings(artifacts / SETTINGS_FILE, overrides))

    @property
    def onnx(self) -> Path:
        return self.artifacts / ONNX_FILE

    @property
    def int8(self) -> Path:
        return self.artifacts / INT8_FILE

    def scoring_file(self, scoring: ScoringPlan) -> Path:
        """The file whose network scores under `scoring`: model.pt, model.onnx or model.int8.onnx."""
        return {"onnx": self.onnx, "onnx-int8": self.int8}.get(scoring.backend, self.artifacts / WEIGHTS_FILE)

    def plan(self, backend: str = "auto", device: str | None = None, compile: bool | None = False) -> ScoringPlan:
        """What scores this model (serving.backends.plan); NoPlan when `backend` cannot."""
        task = self.model_settings.task
        missing = not_exported_why(task) or (f"{self.onnx} not found (a model exported before visionserve wrote "
                                             "ONNX files for its task, or one whose ONNX check failed: its training "
                                             "log says); train it again")
        return plan(backend, task.family, device or default_device().type, self.onnx.is_file(), compile=compile,
                    onnx_missing_why=missing, has_int8=self.int8.is_file(), int8=self.model_settings.int8,
                    int8_missing_why=f"{self.int8} not found")


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

    try:
        return fuse(model)
    except Exception as exc:  # noqa: BLE001  (a model fx cannot trace is scored as it is)
        log.info("BatchNorm not folded for %s: %s", type(model).__name__, exc)
        return model


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: `model` (eval mode, on `device`; explanations use it) and `scorer` (what the plan
    says scores: the model with BatchNorm folded, compiled, or its ONNX graph, read from `scoring_file`: model.pt,
    model.onnx or model.int8.onnx)."""

    model_settings: ModelSettings
    arch: Architecture
    model: torch.nn.Module
    scorer: Scorer
    device: torch.device
    plan: ScoringPlan
    scoring_file: str = WEIGHTS_FILE
    footprint: int = 0  # bytes it holds, measured as it loads (see `footprint`)


def footprint(modules: list[torch.nn.Module], session_file: Path | None) -> int:
    """The bytes a loaded model holds: its networks' parameters and buffers (each storage once: a folded copy
    shares what folding left alone), plus the ONNX file a session scores (its weights are the session's
    initializers). Counted rather than read off the process's resident memory: the allocator keeps and reuses
    what an evicted model freed, so a reload would measure next to nothing, and other threads allocate meanwhile."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) + (session_file.stat().st_size if session_file else 0)


def _weights(model: torch.nn.Module, folder: ModelFolder) -> None:
    state = torch.load(folder.artifacts / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    ms = folder.model_settings
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except RuntimeError as exc:
        raise ValueError(f"{WEIGHTS_FILE} does not fit {ms.model_name} with {len(ms.labels)} labels and the "
                         f"settings in {SETTINGS_FILE} ({str(exc).splitlines()[0]}); was valid_crop_size changed "
                         "for a ViT model?") from None


def load_model(folder: ModelFolder, scoring: ScoringPlan) -> LoadedModel:
    """The model of `folder` on the plan's device, and the scorer the plan names."""
    ms = folder.model_settings
    device = torch.device(scoring.device)
    arch = get_architecture(ms.model_name, ms.task.family)
    model = build_model(arch, len(ms.labels), ms.settings)
    _weights(model, folder)
    model.eval().to(device)
    # a classifier on ONNX Runtime scores its graph: its network serves explanations only, unfolded (a copy saved)
    on_graph = scoring.on_onnx and ms.task.family == "classification"
    folded = model if on_graph else fold_batchnorm(model)
    for module in {model, folded}:
        if arch.channels_last:
            module.to(memory_format=torch.channels_last)
        if ms.settings.half_precision and device.type == "cuda":
            module.half()
    if ms.task.family == "segmentation":

        paste_masks_one_at_a_time(folded)
    file = folder.scoring_file(scoring)
    scorer, scoring = scorer_for(scoring, folded, ms, file, device)
    log.info("loaded %s (%s, %d labels) on %s, scoring on %s", ms.model_name, ms.task.name, len(ms.labels), device,
             scoring.engine)
    held = footprint([model, *networks(scorer)], file if scoring.on_onnx else None)
    return LoadedModel(ms, arch, model, scorer, device, scoring, file.name, held)
