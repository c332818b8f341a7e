"""The task registry: the four task names → settings, default architecture, ops, metric.

Everything that differs between tasks is looked up here (`Task.ops`, in `models.tasks.ops`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from models.errors import SettingsError
from models.data.records import TASK_NAMES
from models.tasks import metrics
from models.tasks.architectures import (
    FEATURE_STRIDE, VIT_PATCH, Architecture, Family, get_architecture, trains_batchnorm,
)
from models.tasks.fields import parse_settings
from models.tasks.ops import ClassificationOps, DetectionOps, TaskOps
from models.tasks.settings import (
    UNSUPPORTED, ClassificationInference, ClassificationSettings, DetectionInference, DetectionSettings,
    SegmentationInference, SegmentationSettings, cross_check_classification, cross_check_detection,
    cross_check_segmentation,
)


@dataclass(frozen=True)
class Task:
    name: str
    family: Family
    settings_cls: type
    inference_cls: type
    default_model: str
    ops: TaskOps
    cross_check: Callable[[Any], list[str]]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def primary_metric(self) -> str:
        return metrics.primary_metric_name(self.name)

    @property
    def is_classification(self) -> bool:
        return self.family == "classification"

    @property
    def multilabel(self) -> bool:
        """Labels are independent (a sigmoid each) rather than one of them (a softmax)."""
        return self.name == "image_classification_multilabel"


_CLASSIFICATION_DEFAULTS = {"training_batch_size": 78, "validation_batch_size": 78}
_DETECTION_DEFAULTS = {"training_batch_size": 2, "validation_batch_size": 1, "learning_rate": 0.005}

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("image_classification", "classification", ClassificationSettings, ClassificationInference,
         "vitb16r224", ClassificationOps(multilabel=False), cross_check_classification,
         {**_CLASSIFICATION_DEFAULTS, "learning_rate": 0.01}),
    Task("image_classification_multilabel", "classification", ClassificationSettings, ClassificationInference,
         "vitb16r224", ClassificationOps(multilabel=True), cross_check_classification,
         {**_CLASSIFICATION_DEFAULTS, "learning_rate": 0.035}),
    Task("image_object_detection", "detection", DetectionSettings, DetectionInference,
         "fasterrcnn_resnet50_fpn", DetectionOps(masks=False), cross_check_detection, _DETECTION_DEFAULTS),
    Task("image_instance_segmentation", "segmentation", SegmentationSettings, SegmentationInference,
         "maskrcnn_resnet50_fpn", DetectionOps(masks=True), cross_check_segmentation, _DETECTION_DEFAULTS),
)}
assert tuple(TASKS) == TASK_NAMES, "models.data.records.TASK_NAMES and the registry disagree"


def request_params() -> dict[str, type]:
    """The per-request parameter schema of each task family, by the name the OpenAPI document gives it
    (`ClassificationParams`, ...): a task added to TASKS is documented at `/docs` with nothing else to do."""
    return {f"{t.family.capitalize()}Params": t.inference_cls for t in TASKS.values()}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task={name!r} is not a task; use one of: {', '.join(TASKS)}") from None


_ONE_VALUE = "which BatchNorm cannot train on"


def _architecture_checks(task: Task, arch: Architecture, settings: Any) -> list[str]:
    """The task's own checks, then what training this architecture needs of the settings."""
    s = settings
    problems = task.cross_check(s)
    if s.layers_to_freeze is not None and s.layers_to_freeze > len(arch.freeze_groups):
        problems.append(f"layers_to_freeze={s.layers_to_freeze} is out of range for {arch.name}: "
                        f"it has {len(arch.freeze_groups)} layer groups")
    if s.layers_to_freeze and s.weights is None and not (s.checkpoint_path or s.checkpoint_run_id):
        problems.append(f"layers_to_freeze={s.layers_to_freeze} would freeze randomly initialised layers "
                        "(weights=none): leave weights at DEFAULT (pretrained) or give a weights file, "
                        "or unset layers_to_freeze")
    if task.is_classification:
        problems += _classifier_checks(arch, s)
    elif trains_batchnorm(s) and s.min_size <= FEATURE_STRIDE:
        problems.append(f"min_size={s.min_size} is too small to train {arch.name} from random initialisation: "
                        f"an image rescaled to {s.min_size} px leaves one value per channel in the backbone's "
                        f"last feature map (1/{FEATURE_STRIDE} of the image), {_ONE_VALUE}; "
                        f"must be an integer >= {FEATURE_STRIDE + 1} (or start from pretrained weights: weights=DEFAULT)")
    return problems


def _classifier_checks(arch: Architecture, s: Any) -> list[str]:
    problems = []
    if arch.fixed_input:
        if s.train_crop_size != s.valid_crop_size:
            problems.append(f"train_crop_size={s.train_crop_size} must equal valid_crop_size="
                            f"{s.valid_crop_size} for {arch.name} (ViT input size is fixed)")
        if s.valid_crop_size % VIT_PATCH:
            near = max(1, round(s.valid_crop_size / VIT_PATCH)) * VIT_PATCH
            problems.append(f"valid_crop_size={s.valid_crop_size} is out of range for {arch.name}: must be a "
                            f"multiple of {VIT_PATCH} (its patch size), e.g. {near}")
        return problems
    if s.training_batch_size == 1 and arch.pooled_batchnorm:
        problems.append(f"training_batch_size=1 is out of range for {arch.name}: its split-attention layers pool "
                        f"each image to one value per channel, {_ONE_VALUE}; must be an integer >= 2")
    elif s.training_batch_size == 1 and s.train_crop_size <= FEATURE_STRIDE:
        problems.append(f"train_crop_size={s.train_crop_size} with training_batch_size=1 is too small for "
                        f"{arch.name}: its last feature map (1/{FEATURE_STRIDE} of the crop) holds one value per "
                        f"channel, {_ONE_VALUE}; must be an integer >= {FEATURE_STRIDE + 1} "
                        "(or training_batch_size >= 2)")
    return problems


def training_settings(task: Task, raw: Mapping[str, Any], source: str = "training parameters") -> tuple[Any, Architecture]:
    """Validated training settings (task and model defaults applied) and the architecture."""
    name = raw.get("model_name") or task.default_model
    try:
        arch = get_architecture(str(name).strip(), task.family)
    except ValueError as exc:
        raise SettingsError([str(exc)], source) from None
    defaults = {**task.defaults, **arch.defaults.get(task.name, {}), "model_name": arch.name}
    raw = {k: v for k, v in raw.items() if k != "model_name"}
    settings = parse_settings(task.settings_cls, raw, source=source, defaults=defaults,
                              unsupported=UNSUPPORTED,
                              cross_check=lambda s: _architecture_checks(task, arch, s))
    return settings, arch


def inference_settings(task: Task, raw: Mapping[str, Any], source: str = "settings.json") -> Any:
    """Validated inference settings (settings.json, deploy-time or per-request overrides)."""
    return parse_settings(task.inference_cls, raw, source=source, cross_check=task.cross_check)
