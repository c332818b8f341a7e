"""What D-RISE needs of a detector, and the private copy of a torchvision detector it explains.

D-RISE treats the detector as a black box: a batch of images and the settings in force in, detections out. That
is exactly what serving's scorers do (`serving.scorers`: the torch network, or its ONNX Runtime graph where the
graph follows the settings), so a scorer is a `Detector` as it is; nothing here imitates one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

# Detections below the model's box_score_thresh still carry evidence: a masked image that leaves the object at
# score 0.2 is better than one that loses it, so D-RISE asks the detector for scores down to this (torchvision's
# own evaluation floor is 0.05; lower changes nothing on the benchmarks' detectors and costs NMS time).
SCORE_FLOOR = 0.01


class Detector(Protocol):
    """Images (float [3, H, W] in [0, 1], the detection task's evaluation transform's output) and the settings in
    force → one dict per image: "boxes" [D, 4] (x0, y0, x1, y1 in that image's pixels), "labels" [D] (the
    model's class ids, 1-based as torchvision's), "scores" [D] (descending), and possibly more keys."""

    def predict(self, inputs: Sequence[torch.Tensor], settings: Any) -> list[dict[str, torch.Tensor]]: ...


def explaining_settings(settings: Any) -> Any:
    """The settings D-RISE scores its masked images under: the request's (sizes, NMS, detections per image: the
    map explains the detector the user asked for), with scores down to SCORE_FLOOR."""
    return settings.model_copy(update={"box_score_thresh": min(settings.box_score_thresh, SCORE_FLOOR)})


def detector_copy(model: nn.Module) -> nn.Module:
    """A private float32 eval-mode copy of a torchvision detector (Faster R-CNN, Mask R-CNN, RetinaNet) for
    explanations, with Mask R-CNN's mask head off (D-RISE compares boxes; masks would cost a paste per detection)
    and no gradients. The model that scores requests is never touched."""
    private = copy.deepcopy(model).float().eval()
    heads = private.roi_heads if hasattr(private, "roi_heads") else private  # RetinaNet keeps them on itself
    if hasattr(heads, "mask_roi_pool"):
        heads.mask_roi_pool = heads.mask_head = heads.mask_predictor = None  # has_mask() is now False
    if hasattr(private, "transform"):
        private.transform.__dict__.pop("postprocess", None)  # scoring's one-at-a-time mask pasting: no masks here
    for p in private.parameters():
        p.requires_grad_(False)
    return private
