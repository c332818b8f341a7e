"""Typed settings with the spec's names and defaults (training.md, inference.md).

Inference settings (the content of `artifacts/settings.json`) are the `inference=True` fields;
each task's training settings class extends its inference class with the training
hyperparameters, so a training run writes exactly the values it validated with.
Per-task and per-architecture defaults (batch size, learning rate) are supplied by the task
and architecture registries when parsing; the class defaults here are the generic ones.
"""

from models.tasks.fields import Flag, Float, Int, SettingsModel, Text, Triple, maybe, nested, one_of, param
from models.tasks.tiling import MAX_TILES, check_overlap, parse_tile_grid_size

YOLO_ONLY = ("img_size", "model_size", "multi_scale")
UNSUPPORTED = {
    name: "applies only to yolov5, which visionserve does not provide "
    "(use fasterrcnn_resnet*_fpn or retinanet_resnet50_fpn)"
    for name in YOLO_ONLY
}


class AdvancedSettings(SettingsModel):
    """`training_parameters.advanced_settings` (a JSON string in the cloud's job YAML)."""

    apply_automl_train_augmentations: Flag = param(True, doc="random crop/expand/flip/jitter in training")
    apply_mosaic_for_yolo: Flag = param(True, doc="accepted for compatibility; yolov5 is not provided")
    stream_image_files: Flag = param(False, doc="images are always read lazily from their source")



# ---------------------------------------------------------------- inference (settings.json)
#
# Every inference setting has an upper bound, so that no request can ask one replica for unbounded
# memory or time: the spec's limits where it gives them (1,000 regions per image), otherwise caps
# well above any sensible value (4x the defaults' sizes). A forward pass also holds at most
# PASS_PIXELS[family] input pixels: larger images go through in smaller batches (`images_per_pass`).

MAX_CROP = 1024  # valid_resize_size / valid_crop_size
MAX_DETECTION_SIDE = 2667  # min_size / max_size: twice the default max_size
MAX_REGIONS = 1000  # box_detections_per_img: the spec's regions per image
PASS_PIXELS = {"classification": 64 * 224 * 224, "detection": 4 * 1333 * 1333}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassificationInference(SettingsModel):
    valid_resize_size: Int = param(256, ge=1, le=MAX_CROP, inference=True, doc="resize before the center crop")
    valid_crop_size: Int = param(224, ge=1, le=MAX_CROP, inference=True, doc="center crop fed to the network")
    batch_size: Int = param(16, ge=1, le=64, inference=True,
                            doc="images per forward pass when scoring (fewer when the crop is large)")
    half_precision: Flag = param(False, inference=True, per_request=False, doc="float16 on a GPU (ignored on a CPU)")
    image_mean: Triple = param(IMAGENET_MEAN, inference=True, per_request=False,
                               doc="input normalisation (R, G, B); training takes it from the pretrained weights")
    image_std: Triple = param(IMAGENET_STD, inference=True, per_request=False,
                              doc="input normalisation (R, G, B); training takes it from the pretrained weights")

    def images_per_pass(self) -> int:
        """batch_size, or fewer so that a forward pass holds at most PASS_PIXELS input pixels."""
        return max(1, min(self.batch_size, PASS_PIXELS["classification"] // self.valid_crop_size ** 2))


class DetectionInference(SettingsModel):
    min_size: Int = param(600, ge=1, le=MAX_DETECTION_SIDE, inference=True, doc="shorter side rescaled to this")
    max_size: Int = param(1333, ge=1, le=MAX_DETECTION_SIDE, inference=True, doc="longer side capped at this")
    box_score_thresh: Float = param(0.3, ge=0, le=1, inference=True)
    nms_iou_thresh: Float = param(0.5, ge=0, le=1, inference=True, aliases=("box_nms_thresh", "box_iou_thresh"))
    box_detections_per_img: Int = param(100, ge=1, le=MAX_REGIONS, inference=True)
    tile_grid_size: maybe(Text) = param(None, inference=True,
                                        doc=f'e.g. "3x2": tiles across x down, at most {MAX_TILES} tiles')
    tile_overlap_ratio: Float = param(0.25, ge=0, lt=1, inference=True)
    tile_predictions_nms_thresh: Float = param(0.25, ge=0, le=1, inference=True)
    tile_merge: one_of("nms", "greedy_nmm") = param("nms", inference=True,
                                                    doc="how tile and whole-image detections are merged")
    batch_size: Int = param(4, ge=1, le=16, inference=True,
                            doc="images (or tiles) per forward pass when scoring (fewer when max_size is large)")
    half_precision: Flag = param(False, inference=True, per_request=False, doc="float16 on a GPU (ignored on a CPU)")

    @property
    def tile_grid(self) -> tuple[int, int] | None:
        return parse_tile_grid_size(self.tile_grid_size) if self.tile_grid_size else None

    def images_per_pass(self) -> int:
        """batch_size, or fewer so that a forward pass holds at most PASS_PIXELS input pixels."""
        return max(1, min(self.batch_size, PASS_PIXELS["detection"] // self.max_size ** 2))


class SegmentationInference(DetectionInference):
    mask_pixel_score_threshold: Float = param(0.5, ge=0, le=1, inference=True)
    max_number_of_polygon_points: Int = param(100, ge=3, le=1000, inference=True)
    export_as_image: Flag = param(False, inference=True, doc="also return each mask as an image")
    image_type: one_of("JPG", "PNG", "BMP") = param("JPG", inference=True)


# ---------------------------------------------------------------- training


class CommonTraining(SettingsModel):
    """Model-agnostic hyperparameters (training.md), plus visionserve's own few."""

    model_name: maybe(Text) = param(None, doc="architecture; the task's default when unset")
    number_of_epochs: Int = param(15, ge=1)
    training_batch_size: Int = param(78, ge=1)
    validation_batch_size: Int = param(78, ge=1)
    grad_accumulation_step: Int = param(1, ge=1)
    early_stopping: Flag = param(True)
    early_stopping_patience: Int = param(5, ge=1)
    early_stopping_delay: Int = param(5, ge=0)
    learning_rate: Float = param(0.01, ge=0, le=1)
    lr_scheduler: one_of("warmup_cosine", "step") = param("warmup_cosine")
    step_lr_gamma: Float = param(0.5, ge=0, le=1)
    step_lr_step_size: Int = param(5, ge=1)
    warmup_cosine_lr_cycles: Float = param(0.45, ge=0, le=1)
    warmup_cosine_lr_warmup_epochs: Int = param(2, ge=0)
    optimizer: one_of("sgd", "adam", "adamw") = param("sgd")
    momentum: Float = param(0.9, ge=0, le=1)
    weight_decay: Float = param(1e-4, ge=0, le=1)
    nesterov: Flag = param(True)
    beta1: Float = param(0.9, ge=0, lt=1, doc="adam/adamw; torch refuses 1")
    beta2: Float = param(0.999, ge=0, lt=1, doc="adam/adamw; torch refuses 1")
    amsgrad: Flag = param(False)
    evaluation_frequency: Int = param(1, ge=1)
    validation_data_size: Float = param(0.2, gt=0, lt=1, aliases=("split_ratio",),
                                         doc="share of the training data kept for validation")
    checkpoint_frequency: maybe(Int) = param(None, ge=1, doc="unset: keep the best epoch only")
    layers_to_freeze: maybe(Int) = param(None, ge=0)
    advanced_settings: nested(AdvancedSettings) = param(AdvancedSettings(), doc="a JSON object or its JSON string")
    weights: maybe(Text) = param("DEFAULT", doc="DEFAULT: the architecture's pretrained weights (downloaded once "
                                 "into the torch or Hugging Face cache); none: random initialisation; a torchvision "
                                 "weights name; or a local state_dict file")
    checkpoint_path: maybe(Text) = param(None, doc="continue training from this checkpoint")
    checkpoint_run_id: maybe(Text) = param(None, doc="continue from this MLflow run's checkpoint")
    seed: Int = param(0, ge=0, le=2**32 - 1, doc="numpy seeds are 32-bit")
    num_workers: maybe(Int) = param(None, ge=0, doc="data loader processes; unset: automatic")


class ClassificationSettings(CommonTraining, ClassificationInference):
    weighted_loss: one_of(0, 1, 2) = param(0, doc="0 none, 1 sqrt(class weights), 2 class weights")
    train_crop_size: Int = param(224, ge=1)


class _DetectionTraining(SettingsModel):
    validation_metric_type: one_of("none", "coco", "voc", "coco_voc") = param("voc")
    validation_iou_threshold: Float = param(0.5, gt=0, le=1, doc="IoU at which a detection matches (voc)")
    # torchvision's sampler sizes; the defaults are torchvision's, lower them to train faster on CPU
    # a quarter of the box head's samples are positives, half of the RPN's: fewer than 4 (2) sample none, and an
    # image whose proposals are all positives then samples nothing at all (a NaN loss)
    box_batch_size_per_image: Int = param(512, ge=4, doc="RoIs sampled per image for the box head")
    rpn_batch_size_per_image: Int = param(256, ge=2, doc="anchors sampled per image for the RPN loss")
    rpn_pre_nms_top_n_train: Int = param(2000, ge=1)
    rpn_post_nms_top_n_train: Int = param(2000, ge=1)


class DetectionSettings(CommonTraining, _DetectionTraining, DetectionInference):
    pass


class SegmentationSettings(CommonTraining, _DetectionTraining, SegmentationInference):
    pass


def cross_check_classification(s: ClassificationInference) -> list[str]:
    problems = []
    if min(s.image_std) <= 0:
        problems.append(f"image_std={list(s.image_std)} is out of range: each value must be > 0")
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
