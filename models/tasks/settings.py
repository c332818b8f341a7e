"""Typed settings with the spec's names and defaults (training.md, inference.md).

Inference settings (the content of `artifacts/settings.json`) are the `inference=True` fields;
each task's training settings class extends its inference class with the training
hyperparameters, so a training run writes exactly the values it validated with.
Per-task and per-architecture defaults (batch size, learning rate) are supplied by the task
and architecture registries when parsing; the class defaults here are the generic ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.tasks.fields import param
from models.tasks.tiling import check_overlap, parse_tile_grid_size

# Spelling alternatives users bring from different documents of the cloud service.
ALIASES = {
    "split_ratio": "validation_data_size",
    "box_nms_thresh": "nms_iou_thresh",
    "box_iou_thresh": "nms_iou_thresh",
}

YOLO_ONLY = ("img_size", "model_size", "multi_scale")
UNSUPPORTED = {
    name: "applies only to yolov5, which visionserve does not provide "
    "(use fasterrcnn_resnet*_fpn or retinanet_resnet50_fpn)"
    for name in YOLO_ONLY
}


@dataclass(frozen=True)
class AdvancedSettings:
    """`training_parameters.advanced_settings` (a JSON string in the cloud's job YAML)."""

    apply_automl_train_augmentations: bool = param(True, doc="random crop/expand/flip/jitter in training")
    apply_mosaic_for_yolo: bool = param(True, doc="accepted for compatibility; yolov5 is not provided")
    stream_image_files: bool = param(False, doc="images are always read lazily from their source")

    def to_json(self) -> dict[str, Any]:
        return {
            "apply_automl_train_augmentations": self.apply_automl_train_augmentations,
            "apply_mosaic_for_yolo": self.apply_mosaic_for_yolo,
            "stream_image_files": self.stream_image_files,
        }


# ---------------------------------------------------------------- inference (settings.json)


@dataclass(frozen=True)
class ClassificationInference:
    valid_resize_size: int = param(256, ge=1, inference=True, doc="resize before the center crop")
    valid_crop_size: int = param(224, ge=1, inference=True, doc="center crop fed to the network")
    batch_size: int = param(16, ge=1, inference=True, doc="images per forward pass when scoring")
    half_precision: bool = param(False, inference=True, per_request=False, doc="float16 on a GPU (ignored on a CPU)")


@dataclass(frozen=True)
class DetectionInference:
    min_size: int = param(600, ge=1, inference=True, doc="shorter side rescaled to this")
    max_size: int = param(1333, ge=1, inference=True, doc="longer side capped at this")
    box_score_thresh: float = param(0.3, ge=0, le=1, inference=True)
    nms_iou_thresh: float = param(0.5, ge=0, le=1, inference=True, doc="alias box_nms_thresh")
    box_detections_per_img: int = param(100, ge=1, inference=True)
    tile_grid_size: str | None = param(None, str, inference=True, doc='e.g. "3x2": tiles across x down')
    tile_overlap_ratio: float = param(0.25, ge=0, lt=1, inference=True)
    tile_predictions_nms_thresh: float = param(0.25, ge=0, le=1, inference=True)
    tile_merge: str = param("nms", choices=("nms", "greedy_nmm"), inference=True,
                            doc="how tile and whole-image detections are merged")
    batch_size: int = param(4, ge=1, inference=True, doc="images per forward pass when scoring")
    half_precision: bool = param(False, inference=True, per_request=False, doc="float16 on a GPU (ignored on a CPU)")

    @property
    def tile_grid(self) -> tuple[int, int] | None:
        return parse_tile_grid_size(self.tile_grid_size) if self.tile_grid_size else None


@dataclass(frozen=True)
class SegmentationInference(DetectionInference):
    mask_pixel_score_threshold: float = param(0.5, ge=0, le=1, inference=True)
    max_number_of_polygon_points: int = param(100, ge=3, inference=True)
    export_as_image: bool = param(False, inference=True, doc="also return each mask as an image")
    image_type: str = param("JPG", choices=("JPG", "PNG", "BMP"), inference=True)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class CommonTraining:
    """Model-agnostic hyperparameters (training.md), plus visionserve's own few."""

    model_name: str | None = param(None, str, doc="architecture; the task's default when unset")
    number_of_epochs: int = param(15, ge=1)
    training_batch_size: int = param(78, ge=1)
    validation_batch_size: int = param(78, ge=1)
    grad_accumulation_step: int = param(1, ge=1)
    early_stopping: bool = param(True)
    early_stopping_patience: int = param(5, ge=1)
    early_stopping_delay: int = param(5, ge=0)
    learning_rate: float = param(0.01, ge=0, le=1)
    lr_scheduler: str = param("warmup_cosine", choices=("warmup_cosine", "step"))
    step_lr_gamma: float = param(0.5, ge=0, le=1)
    step_lr_step_size: int = param(5, ge=1)
    warmup_cosine_lr_cycles: float = param(0.45, ge=0, le=1)
    warmup_cosine_lr_warmup_epochs: int = param(2, ge=0)
    optimizer: str = param("sgd", choices=("sgd", "adam", "adamw"))
    momentum: float = param(0.9, ge=0, le=1)
    weight_decay: float = param(1e-4, ge=0, le=1)
    nesterov: bool = param(True)
    beta1: float = param(0.9, ge=0, le=1)
    beta2: float = param(0.999, ge=0, le=1)
    amsgrad: bool = param(False)
    evaluation_frequency: int = param(1, ge=1)
    validation_data_size: float = param(0.2, gt=0, lt=1, doc="alias split_ratio")
    checkpoint_frequency: int | None = param(None, int, ge=1, doc="unset: keep the best epoch only")
    layers_to_freeze: int | None = param(None, int, ge=0)
    advanced_settings: AdvancedSettings = param(AdvancedSettings(), AdvancedSettings)
    weights: str | None = param(None, str, doc="local state_dict file, or torchvision weights name")
    checkpoint_path: str | None = param(None, str, doc="continue training from this checkpoint")
    checkpoint_run_id: str | None = param(None, str, doc="continue from this MLflow run's checkpoint")
    seed: int = param(0, ge=0)
    num_workers: int | None = param(None, int, ge=0, doc="data loader processes; unset: automatic")


@dataclass(frozen=True)
class ClassificationSettings(CommonTraining, ClassificationInference):
    weighted_loss: int = param(0, choices=(0, 1, 2), doc="0 none, 1 sqrt(class weights), 2 class weights")
    train_crop_size: int = param(224, ge=1)


@dataclass(frozen=True)
class _DetectionTraining:
    validation_metric_type: str = param("voc", choices=("none", "coco", "voc", "coco_voc"))
    validation_iou_threshold: float = param(0.5, ge=0, le=1)
    # torchvision's sampler sizes; the defaults are torchvision's, lower them to train faster on CPU
    box_batch_size_per_image: int = param(512, ge=1, doc="RoIs sampled per image for the box head")
    rpn_batch_size_per_image: int = param(256, ge=1, doc="anchors sampled per image for the RPN loss")
    rpn_pre_nms_top_n_train: int = param(2000, ge=1)
    rpn_post_nms_top_n_train: int = param(2000, ge=1)


@dataclass(frozen=True)
class DetectionSettings(CommonTraining, _DetectionTraining, DetectionInference):
    pass


@dataclass(frozen=True)
class SegmentationSettings(CommonTraining, _DetectionTraining, SegmentationInference):
    pass


def cross_check_classification(s: ClassificationSettings) -> list[str]:
    problems = []
    if s.valid_crop_size > s.valid_resize_size:
        problems.append(
            f"valid_crop_size={s.valid_crop_size} is larger than valid_resize_size={s.valid_resize_size}"
        )
    return problems


def cross_check_detection(s: DetectionInference) -> list[str]:
    problems = []
    if s.min_size > s.max_size:
        problems.append(f"min_size={s.min_size} is larger than max_size={s.max_size}")
    if s.tile_grid_size is not None:
        try:
            parse_tile_grid_size(s.tile_grid_size)
        except ValueError as exc:
            problems.append(str(exc))
    try:
        check_overlap(s.tile_overlap_ratio)
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def cross_check_segmentation(s: SegmentationInference) -> list[str]:
    problems = cross_check_detection(s)
    if s.tile_grid_size is not None:
        problems.append(
            "tile_grid_size: tiling is not supported for image_instance_segmentation "
            "(unset it, or use an image_object_detection model)"
        )
    return problems
