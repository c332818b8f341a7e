"""Architecture registry: the spec's model names → builders, layer groups, per-model defaults.

Adding an architecture is one `register(Architecture(...))` call here. Builders take the
number of classes (without background), the settings in force and `trainable_bn`
(BatchNorm that learns, used when training detectors from scratch; otherwise the backbone
uses FrozenBatchNorm2d, which loads the same weights).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

Family = Literal["classification", "detection", "segmentation"]
Builder = Callable[[int, Any, bool], nn.Module]

FEATURE_STRIDE = 32  # the last feature map of every convolutional network here is 1/32 of its input
VIT_PATCH = 16  # every ViT here cuts its input into 16x16 patches

@dataclass(frozen=True)
class Architecture:
    name: str
    family: Family
    build: Builder
    freeze_groups: tuple[tuple[str, ...], ...]
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # task → parameter defaults
    head: tuple[str, ...] = ()  # state_dict prefixes of the layers made for the dataset's labels
    weights: str | None = None  # torchvision weights of the whole model ("DEFAULT")
    backbone_weights: str | None = None  # torchvision weights of the backbone alone
    backbone_prefix: str = ""  # where backbone weights go in this model's state_dict
    timm_weights: str | None = None  # timm's pretrained name (architecture.tag) on the Hugging Face hub
    timm: bool = False
    fixed_input: bool = False  # ViT: train_crop_size must equal valid_crop_size
    channels_last: bool = True  # convolutional: inference runs in channels_last memory format (14-34 % faster on CPU)
    pooled_batchnorm: bool = False  # BatchNorm on globally pooled features (ResNeSt): cannot train on one image


def trains_batchnorm(settings: Any) -> bool:
    """Whether a detector's backbone BatchNorm learns (random initialisation: no weights, no checkpoint)."""
    return settings.weights is None and not (settings.checkpoint_path or settings.checkpoint_run_id)


_REGISTRY: dict[str, Architecture] = {}

UNAVAILABLE = {
    "yolov5": "yolov5 is not available in visionserve (it is not a torchvision model); "
    "use fasterrcnn_resnet50_fpn (the default), fasterrcnn_resnet18_fpn … fasterrcnn_resnet152_fpn "
    "or retinanet_resnet50_fpn",
}


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def names(family: Family | None = None) -> list[str]:
    return [a.name for a in _REGISTRY.values() if family is None or a.family == family]


def get_architecture(name: str, family: Family) -> Architecture:
    """The architecture `name` for a task family, or a clear error naming the alternatives."""
    if name in UNAVAILABLE:
        raise ValueError(f"model_name={name}: {UNAVAILABLE[name]}")
    arch = _REGISTRY.get(name)
    valid = names(family)
    if arch is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"model_name={name} is not a known architecture.{hint} For this task: {', '.join(valid)}")
    if arch.family != family:
        raise ValueError(f"model_name={name} is a {arch.family} model; for this task use one of: {', '.join(valid)}")
    return arch


# ---------------------------------------------------------------- classification

RESNET_GROUPS = (("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",))


def _torchvision_classifier(tv_name: str, **fixed: Any) -> Builder:
    def build(num_classes: int, settings: Any, trainable_bn: bool) -> nn.Module:
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **fixed)

    return build


def _vit(tv_name: str | None) -> Builder:
    def build(num_classes: int, settings: Any, trainable_bn: bool) -> nn.Module:
        size = settings.valid_crop_size
        if tv_name is None:  # ViT-S/16: torchvision has no builder, its VisionTransformer does
            return torchvision.models.VisionTransformer(
                image_size=size, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384,
                mlp_dim=1536, num_classes=num_classes,
            )
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, image_size=size)

    return build


def _vit_groups(layers: int) -> tuple[tuple[str, ...], ...]:
    head = (("conv_proj.", "class_token", "encoder.pos_embedding"),)
    return head + tuple((f"encoder.layers.encoder_layer_{i}.",) for i in range(layers))


def _timm(timm_name: str) -> Builder:
    def build(num_classes: int, settings: Any, trainable_bn: bool) -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)

    return build


def _classification_defaults(batch: int, lr_multiclass: float, lr_multilabel: float) -> dict:
    common = {"training_batch_size": batch, "validation_batch_size": batch}
    return {
        "image_classification": {**common, "learning_rate": lr_multiclass},
        "image_classification_multilabel": {**common, "learning_rate": lr_multilabel},
    }


for _depth, _weights in ((18, "ResNet18_Weights"), (34, "ResNet34_Weights"), (50, "ResNet50_Weights"),
                         (101, "ResNet101_Weights"), (152, "ResNet152_Weights")):
    register(Architecture(f"resnet{_depth}", "classification", _torchvision_classifier(f"resnet{_depth}"),
                          RESNET_GROUPS, head=("fc.",), weights=f"{_weights}.DEFAULT"))

register(Architecture("mobilenetv2", "classification", _torchvision_classifier("mobilenet_v2"),
                      tuple((f"features.{i}.",) for i in range(19)), head=("classifier.1.",),
                      weights="MobileNet_V2_Weights.DEFAULT"))
# ViT-S/16: torchvision has the network but no weights; timm's ImageNet-21k → 1k weights are mapped onto it
register(Architecture("vits16r224", "classification", _vit(None), _vit_groups(12), head=("heads.head.",),
                      defaults=_classification_defaults(128, 0.0125, 0.025), fixed_input=True, channels_last=False,
                      timm_weights="vit_small_patch16_224.augreg_in21k_ft_in1k"))
register(Architecture("vitb16r224", "classification", _vit("vit_b_16"), _vit_groups(12), head=("heads.head.",),
                      defaults=_classification_defaults(48, 0.0125, 0.025), weights="ViT_B_16_Weights.DEFAULT",
                      fixed_input=True, channels_last=False))
register(Architecture("vitl16r224", "classification", _vit("vit_l_16"), _vit_groups(24), head=("heads.head.",),
                      defaults=_classification_defaults(10, 0.001, 0.002), weights="ViT_L_16_Weights.DEFAULT",
                      fixed_input=True, channels_last=False))
register(Architecture("seresnext", "classification", _timm("seresnext50_32x4d"), RESNET_GROUPS, head=("fc.",),
                      timm=True, timm_weights="seresnext50_32x4d.racm_in1k"))
register(Architecture("resnest50", "classification", _timm("resnest50d"), RESNET_GROUPS, head=("fc.",), timm=True,
                      pooled_batchnorm=True, timm_weights="resnest50d.in1k"))
register(Architecture("resnest101", "classification", _timm("resnest101e"), RESNET_GROUPS, head=("fc.",), timm=True,
                      pooled_batchnorm=True, timm_weights="resnest101e.in1k"))

# ---------------------------------------------------------------- detection and segmentation

DETECTION_GROUPS = tuple(tuple(f"backbone.body.{p}" for p in g) for g in RESNET_GROUPS)


def _rcnn_kwargs(settings: Any) -> dict[str, Any]:
    kwargs = {
        "min_size": settings.min_size,
        "max_size": settings.max_size,
        "box_score_thresh": settings.box_score_thresh,
        "box_nms_thresh": settings.nms_iou_thresh,
        "box_detections_per_img": settings.box_detections_per_img,
    }
    for name in ("box_batch_size_per_image", "rpn_batch_size_per_image",
                 "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train"):
        if hasattr(settings, name):  # training settings only; inference keeps torchvision's
            kwargs[name] = getattr(settings, name)
    return kwargs


def _backbone(depth: int, trainable_bn: bool, **kwargs: Any) -> nn.Module:
    norm = nn.BatchNorm2d if trainable_bn else FrozenBatchNorm2d
    return resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=norm,
                               trainable_layers=5, **kwargs)


def _rcnn(detector: type[nn.Module], depth: int) -> Builder:
    def build(num_classes: int, settings: Any, trainable_bn: bool) -> nn.Module:
        return detector(_backbone(depth, trainable_bn), num_classes=num_classes + 1, **_rcnn_kwargs(settings))

    return build


class _RetinaNet(RetinaNet):
    """RetinaNet numbered like the R-CNNs: labels 1..K, class 0 never predicted (RetinaNet has no
    background class of its own, so an untrained or low-threshold model would otherwise output 0)."""

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        logits = [level.index_fill(-1, torch.zeros(1, dtype=torch.long, device=level.device), float("-inf"))
                  for level in head_outputs["cls_logits"]]
        return super().postprocess_detections({**head_outputs, "cls_logits": logits}, anchors, image_shapes)


def _retinanet(num_classes: int, settings: Any, trainable_bn: bool) -> nn.Module:
    backbone = _backbone(50, trainable_bn, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return _RetinaNet(
        backbone, num_classes=num_classes + 1, min_size=settings.min_size, max_size=settings.max_size,
        score_thresh=settings.box_score_thresh, nms_thresh=settings.nms_iou_thresh,
        detections_per_img=settings.box_detections_per_img,
    )


_RESNET_WEIGHTS = {18: "ResNet18_Weights", 34: "ResNet34_Weights", 50: "ResNet50_Weights",
                   101: "ResNet101_Weights", 152: "ResNet152_Weights"}

for _depth, _bw in _RESNET_WEIGHTS.items():
    register(Architecture(
        f"fasterrcnn_resnet{_depth}_fpn", "detection", _rcnn(FasterRCNN, _depth), DETECTION_GROUPS,
        head=("roi_heads.box_predictor.",), weights="FasterRCNN_ResNet50_FPN_Weights.DEFAULT" if _depth == 50 else None,
        backbone_weights=f"{_bw}.DEFAULT", backbone_prefix="backbone.body.",
    ))
    register(Architecture(
        f"maskrcnn_resnet{_depth}_fpn", "segmentation", _rcnn(MaskRCNN, _depth), DETECTION_GROUPS,
        head=("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits."), weights="MaskRCNN_ResNet50_FPN_Weights.DEFAULT" if _depth == 50 else None,
        backbone_weights=f"{_bw}.DEFAULT", backbone_prefix="backbone.body.",
    ))
register(Architecture("retinanet_resnet50_fpn", "detection", _retinanet, DETECTION_GROUPS,
                      head=("head.classification_head.cls_logits.",), weights="RetinaNet_ResNet50_FPN_Weights.DEFAULT",
                      backbone_weights="ResNet50_Weights.DEFAULT", backbone_prefix="backbone.body."))


def build_model(arch: Architecture, num_classes: int, settings: Any, *, trainable_bn: bool = False) -> nn.Module:
    """A freshly initialised model for `num_classes` classes (background not counted)."""
    return arch.build(num_classes, settings, trainable_bn)


def freeze_layers(model: nn.Module, arch: Architecture, count: int) -> int:
    """Freeze the first `count` layer groups; returns the number of frozen tensors."""
    if count > len(arch.freeze_groups):
        raise ValueError(f"layers_to_freeze={count} is out of range for {arch.name}: "
                         f"it has {len(arch.freeze_groups)} layer groups")
    prefixes = tuple(p for group in arch.freeze_groups[:count] for p in group)
    frozen = 0
    for name, parameter in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
