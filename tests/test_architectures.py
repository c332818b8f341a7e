"""Tests for models/architectures.py: every spec architecture builds, runs and freezes by the spec's
layer groups; model names are checked; per-model defaults come through `training_settings`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from models.tasks.architectures import Architecture, build_model, freeze_layers, get_architecture, names
from models.errors import SettingsError
from models.tasks.registry import get_task, training_settings
from serving.loading import fold_batchnorm

NUM_CLASSES = 3
FAMILY_TASK = {"classification": "image_classification", "detection": "image_object_detection",
               "segmentation": "image_instance_segmentation"}

# training.md's architecture table, yolov5 aside (it is refused, see below).
SPEC_NAMES = {
    "classification": {"mobilenetv2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnest50",
                       "resnest101", "seresnext", "vits16r224", "vitb16r224", "vitl16r224"},
    "detection": {"fasterrcnn_resnet18_fpn", "fasterrcnn_resnet34_fpn", "fasterrcnn_resnet50_fpn",
                  "fasterrcnn_resnet101_fpn", "fasterrcnn_resnet152_fpn", "retinanet_resnet50_fpn"},
    "segmentation": {"maskrcnn_resnet18_fpn", "maskrcnn_resnet34_fpn", "maskrcnn_resnet50_fpn",
                     "maskrcnn_resnet101_fpn", "maskrcnn_resnet152_fpn"},
}
# The biggest models: their forward pass runs only without `-m 'not slow'`.
SLOW = {"resnet101", "resnet152", "vitl16r224", "fasterrcnn_resnet101_fpn", "fasterrcnn_resnet152_fpn",
        "maskrcnn_resnet101_fpn", "maskrcnn_resnet152_fpn"}

ALL = [(family, name) for family in FAMILY_TASK for name in names(family)]


def _id(case: tuple[str, str]) -> str:
    return case[1]


def slow_marked(cases: list[tuple[str, str]]) -> list[Any]:
    return [pytest.param(*c, id=_id(c), marks=pytest.mark.slow if c[1] in SLOW else ()) for c in cases]


def small_settings(family: str, name: str, task: str | None = None, **extra: Any) -> tuple[Any, Architecture]:
    """Training settings for a tiny input: crop 32 for ViTs (2x2 patches of 16), 64 for CNNs;
    detectors rescale to 64..96 and keep every box (score threshold 0) so labels can be checked."""
    task = task or FAMILY_TASK[family]
    if family == "classification":
        size = 32 if name.startswith("vit") else 64
        raw = {"model_name": name, "valid_resize_size": size, "valid_crop_size": size, "train_crop_size": size}
    else:
        raw = {"model_name": name, "min_size": 64, "max_size": 96, "box_score_thresh": 0.0}
    return training_settings(get_task(task), {**raw, **extra})


def meta_model(family: str, name: str, *, trainable_bn: bool = False) -> tuple[nn.Module, Architecture]:
    """The model built on the meta device: real parameter names and shapes, no memory, no init time."""
    settings, arch = training_settings(get_task(FAMILY_TASK[family]), {"model_name": name})
    with torch.device("meta"):
        return build_model(arch, NUM_CLASSES, settings, trainable_bn=trainable_bn), arch


def tame_random_backbone(model: nn.Module) -> None:
    """Zero the last BatchNorm scale of every residual block (like torchvision's zero_init_residual):
    a randomly initialised resnet101/152 otherwise grows activations so large that every RPN box
    degenerates and the detector returns nothing, which would leave the label check empty."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    with torch.no_grad():
        for block in model.backbone.body.modules():
            if isinstance(block, Bottleneck):
                block.bn3.weight.zero_()
            elif isinstance(block, BasicBlock):
                block.bn2.weight.zero_()


def parameter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


# ---------------------------------------------------------------- registry


def test_registry_holds_exactly_the_spec_architectures_per_family() -> None:
    for family, expected in SPEC_NAMES.items():
        assert set(names(family)) == expected, family
    assert set(names()) == set().union(*SPEC_NAMES.values())


def test_each_task_default_model_is_registered_for_its_family() -> None:
    for family, task in FAMILY_TASK.items():
        assert get_architecture(get_task(task).default_model, family).family == family
    assert get_task("image_classification").default_model == "vitb16r224"
    assert get_task("image_object_detection").default_model == "fasterrcnn_resnet50_fpn"
    assert get_task("image_instance_segmentation").default_model == "maskrcnn_resnet50_fpn"


# ---------------------------------------------------------------- build and forward


@pytest.mark.parametrize(("family", "name"), slow_marked([c for c in ALL if c[0] == "classification"]))
def test_classifier_builds_and_outputs_one_logit_per_class(family: str, name: str) -> None:
    torch.manual_seed(0)
    settings, arch = small_settings(family, name)
    model = build_model(arch, NUM_CLASSES, settings).eval()
    crop = settings.valid_crop_size
    pixels = torch.rand(2, 3, crop, crop)
    with torch.no_grad():
        logits = model(pixels)
        folded = fold_batchnorm(model)  # what scoring runs: the same logits
        assert torch.allclose(folded(pixels), logits, rtol=1e-3, atol=1e-4)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and name.startswith(("resnet", "mobilenet")):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.parametrize(("family", "name"), slow_marked([c for c in ALL if c[0] != "classification"]))
def test_detector_builds_and_predicts_labels_within_the_classes(family: str, name: str) -> None:
    torch.manual_seed(0)
    settings, arch = small_settings(family, name)
    model = build_model(arch, NUM_CLASSES, settings).eval()
    tame_random_backbone(model)
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 80)])
    n = len(out["labels"])
    assert n > 0, "score threshold 0 keeps some detections, else the label check below is empty"
    assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,)
    labels = out["labels"]
    assert ((labels >= 1) & (labels <= NUM_CLASSES)).all(), f"labels must be 1..{NUM_CLASSES}: {labels.unique()}"
    if family == "segmentation":
        assert out["masks"].shape == (n, 1, 64, 80)
    else:
        assert "masks" not in out


def test_detector_settings_reach_the_model() -> None:
    settings, arch = small_settings("detection", "fasterrcnn_resnet18_fpn", nms_iou_thresh=0.4,
                                    box_detections_per_img=7, rpn_pre_nms_top_n_train=300)
    with torch.device("meta"):
        model = build_model(arch, NUM_CLASSES, settings)
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    assert model.roi_heads.score_thresh == 0.0 and model.roi_heads.nms_thresh == 0.4
    assert model.roi_heads.detections_per_img == 7
    assert model.rpn._pre_nms_top_n["training"] == 300
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1  # + background


def test_detector_backbone_batchnorm_is_frozen_unless_trainable_bn() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    frozen, _ = meta_model("detection", "fasterrcnn_resnet18_fpn")
    learning, _ = meta_model("detection", "fasterrcnn_resnet18_fpn", trainable_bn=True)
    assert isinstance(frozen.backbone.body.bn1, FrozenBatchNorm2d)
    assert isinstance(learning.backbone.body.bn1, nn.BatchNorm2d)
    # same tensor names either way, so weights move between the two
    plain = {k for k in learning.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(frozen.state_dict()) == plain


# ---------------------------------------------------------------- layers_to_freeze


@pytest.mark.parametrize(("family", "name"), [pytest.param(*c, id=_id(c)) for c in ALL])
def test_every_freeze_prefix_names_parameters_of_the_model(family: str, name: str) -> None:
    # trainable BatchNorm: with FrozenBatchNorm2d (the detectors' default) bn1 holds buffers only
    model, arch = meta_model(family, name, trainable_bn=True)
    params = parameter_names(model)
    missing = [p for group in arch.freeze_groups for p in group if not any(n.startswith(p) for n in params)]
    assert not missing, f"{name}: freeze prefixes matching no parameter: {missing}"
    # and with the default BatchNorm each group still freezes something
    model, _ = meta_model(family, name)
    params = parameter_names(model)
    for i, group in enumerate(arch.freeze_groups):
        assert any(n.startswith(group) for n in params), f"{name}: group {i} {group} freezes nothing"


@pytest.mark.parametrize(("family", "name"), [pytest.param(*c, id=_id(c)) for c in ALL])
def test_freeze_layers_freezes_exactly_the_first_n_groups(family: str, name: str) -> None:
    model, arch = meta_model(family, name)
    groups = arch.freeze_groups
    previous: set[str] = set()
    for n in range(len(groups) + 1):
        for p in model.parameters():
            p.requires_grad_(True)
        count = freeze_layers(model, arch, n)
        frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
        expected = {k for k in parameter_names(model) if any(k.startswith(pfx) for g in groups[:n] for pfx in g)}
        assert frozen == expected, f"{name}, layers_to_freeze={n}"
        assert count == len(frozen)
        assert previous < frozen or n == 0, f"{name}: group {n - 1} adds nothing"
        previous = frozen
    # the head always learns
    assert len(previous) < len(parameter_names(model))


def test_freeze_layers_resnet18_by_name() -> None:
    model, arch = meta_model("classification", "resnet18")
    freeze_layers(model, arch, 2)
    frozen = sorted(k for k, p in model.named_parameters() if not p.requires_grad)
    assert {k.split(".")[0] for k in frozen} == {"conv1", "bn1", "layer1"}
    assert {"conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.1.bn2.bias"} <= set(frozen)
    assert all(p.requires_grad for k, p in model.named_parameters() if k.startswith(("layer2.", "fc.")))


def test_freeze_layers_vit_first_group_is_the_patch_embedding() -> None:
    model, arch = meta_model("classification", "vitb16r224")
    assert len(arch.freeze_groups) == 13  # patch embedding + 12 encoder blocks
    freeze_layers(model, arch, 2)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert {"conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding"} <= frozen
    assert all(k.startswith("encoder.layers.encoder_layer_0.") for k in frozen - {
        "conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding"})
    assert not any(k.startswith("encoder.layers.encoder_layer_1.") for k in frozen)
    _, large = meta_model("classification", "vitl16r224")
    assert len(large.freeze_groups) == 25


def test_freeze_layers_all_detector_groups_leave_fpn_and_heads_trainable() -> None:
    model, arch = meta_model("detection", "fasterrcnn_resnet50_fpn", trainable_bn=True)
    freeze_layers(model, arch, len(arch.freeze_groups))
    for k, p in model.named_parameters():
        assert p.requires_grad == (not k.startswith("backbone.body.")), k


@pytest.mark.parametrize(("family", "name"), [("classification", "resnet18"), ("classification", "mobilenetv2"),
                                             ("classification", "vitl16r224"), ("segmentation", "maskrcnn_resnet18_fpn")])
def test_freeze_layers_beyond_the_group_count_names_architecture_and_count(family: str, name: str) -> None:
    model, arch = meta_model(family, name)
    count = len(arch.freeze_groups)
    with pytest.raises(ValueError, match=rf"layers_to_freeze={count + 1}.*{name}.*{count} layer groups"):
        freeze_layers(model, arch, count + 1)
    assert all(p.requires_grad for p in model.parameters())


def test_layers_to_freeze_beyond_the_group_count_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match=r"layers_to_freeze=6.*resnet18.*5 layer groups"):
        training_settings(get_task("image_classification"), {"model_name": "resnet18", "layers_to_freeze": 6})
    settings, _ = training_settings(get_task("image_classification"), {"model_name": "resnet18",
                                                                       "layers_to_freeze": 5})
    assert settings.layers_to_freeze == 5


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("family", ["detection", "classification"])
def test_yolov5_is_refused_naming_the_alternatives(family: str) -> None:
    with pytest.raises(ValueError, match="yolov5") as err:
        get_architecture("yolov5", family)
    assert "fasterrcnn_resnet50_fpn" in str(err.value) and "retinanet_resnet50_fpn" in str(err.value)
    with pytest.raises(SettingsError, match="fasterrcnn_resnet50_fpn"):
        training_settings(get_task("image_object_detection"), {"model_name": "yolov5"})


def test_unknown_name_suggests_the_closest_architecture() -> None:
    with pytest.raises(ValueError, match="Did you mean resnet50") as err:
        get_architecture("resnet05", "classification")
    assert "vitb16r224" in str(err.value)  # lists the task's names
    with pytest.raises(SettingsError, match="Did you mean fasterrcnn_resnet50_fpn"):
        training_settings(get_task("image_object_detection"), {"model_name": "fasterrcnn_resnet50"})


def test_unknown_name_without_a_close_match_lists_the_task_names() -> None:
    with pytest.raises(ValueError, match="not a known architecture") as err:
        get_architecture("efficientnet", "segmentation")
    assert "Did you mean" not in str(err.value) and "maskrcnn_resnet50_fpn" in str(err.value)


def test_detection_name_for_a_classification_task_is_refused() -> None:
    with pytest.raises(ValueError, match="fasterrcnn_resnet50_fpn is a detection model.*resnet18"):
        get_architecture("fasterrcnn_resnet50_fpn", "classification")
    with pytest.raises(SettingsError, match="is a detection model"):
        training_settings(get_task("image_classification_multilabel"), {"model_name": "fasterrcnn_resnet50_fpn"})
    with pytest.raises(SettingsError, match="is a segmentation model"):
        training_settings(get_task("image_object_detection"), {"model_name": "maskrcnn_resnet50_fpn"})


# ---------------------------------------------------------------- per-model defaults


@pytest.mark.parametrize(("name", "batch", "lr_multiclass", "lr_multilabel"), [
    ("vits16r224", 128, 0.0125, 0.025),
    ("vitb16r224", 48, 0.0125, 0.025),
    ("vitl16r224", 10, 0.001, 0.002),
    ("resnet18", 78, 0.01, 0.035),
    ("mobilenetv2", 78, 0.01, 0.035),
    ("seresnext", 78, 0.01, 0.035),
])
def test_classification_defaults_per_model(name: str, batch: int, lr_multiclass: float, lr_multilabel: float) -> None:
    for task, lr in (("image_classification", lr_multiclass), ("image_classification_multilabel", lr_multilabel)):
        settings, arch = training_settings(get_task(task), {"model_name": name})
        assert arch.name == settings.model_name == name
        assert (settings.training_batch_size, settings.validation_batch_size) == (batch, batch), task
        assert settings.learning_rate == pytest.approx(lr), task


def test_classification_default_model_is_vitb16r224_with_its_defaults() -> None:
    settings, arch = training_settings(get_task("image_classification"), {})
    assert arch.name == settings.model_name == "vitb16r224"
    assert settings.training_batch_size == 48 and settings.learning_rate == pytest.approx(0.0125)


def test_user_values_override_model_defaults() -> None:
    settings, _ = training_settings(get_task("image_classification"),
                                    {"model_name": "vitl16r224", "training_batch_size": 3, "learning_rate": 0.5})
    assert (settings.training_batch_size, settings.validation_batch_size, settings.learning_rate) == (3, 10, 0.5)


@pytest.mark.parametrize("family", ["detection", "segmentation"])
def test_detection_and_segmentation_defaults(family: str) -> None:
    for name in names(family):
        settings, _ = training_settings(get_task(FAMILY_TASK[family]), {"model_name": name})
        assert settings.training_batch_size == 2, name
        assert settings.validation_batch_size == 1, name
        assert settings.learning_rate == pytest.approx(0.005), name
    settings, arch = training_settings(get_task(FAMILY_TASK[family]), {})
    assert arch.name == {"detection": "fasterrcnn_resnet50_fpn", "segmentation": "maskrcnn_resnet50_fpn"}[family]


@pytest.mark.parametrize("name", ["vits16r224", "vitb16r224", "vitl16r224"])
def test_vit_train_crop_must_equal_valid_crop(name: str) -> None:
    raw = {"model_name": name, "valid_resize_size": 256, "valid_crop_size": 224, "train_crop_size": 192}
    with pytest.raises(SettingsError, match=rf"train_crop_size=192 must equal valid_crop_size=224 for {name}"):
        training_settings(get_task("image_classification"), raw)
    settings, _ = training_settings(get_task("image_classification"), {**raw, "train_crop_size": 224})
    assert settings.train_crop_size == 224


def test_cnn_train_crop_may_differ_from_valid_crop() -> None:
    settings, _ = training_settings(get_task("image_classification"),
                                    {"model_name": "resnet18", "valid_crop_size": 224, "train_crop_size": 192})
    assert (settings.train_crop_size, settings.valid_crop_size) == (192, 224)
