"""What D-RISE needs of a detector, and the torch adapter that provides it.

D-RISE treats the detector as a black box: a batch of images in, detections out. Serving hands it either the
torchvision network (`TorchDetector`) or its ONNX Runtime graph, whichever scores; anything that satisfies
`Detector` will do.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

# Detections below the model's box_score_thresh still carry evidence: a masked image that leaves the object at
# score 0.2 is better than one that loses it, so the private copy answers down to this score (torchvision's
# own evaluation floor is 0.05; lower changes nothing on the benchmarks' detectors and costs NMS time).
SCORE_FLOOR = 0.01


class Detector(Protocol):
    """float images [B, 3, H, W] in [0, 1] (one size) → one dict per image: "boxes" [D, 4] (x0, y0, x1, y1 in
    that image's pixels), "labels" [D] (the model's class ids, 1-based as torchvision's), "scores" [D]."""

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]: ...


class TorchDetector:
    """A torchvision detector (Faster R-CNN, Mask R-CNN, RetinaNet) as a `Detector`, on a private copy: eval
    mode, float32, answering down to SCORE_FLOOR, Mask R-CNN's mask head off (D-RISE compares boxes, and masks
    would cost a paste per detection). The model that scores requests is never modified."""

    def __init__(self, model: nn.Module, device: torch.device, settings=None, score_floor: float = SCORE_FLOOR):
        private = copy.deepcopy(model).float().eval().to(device)
        heads = private.roi_heads if hasattr(private, "roi_heads") else private  # RetinaNet keeps them on itself
        if hasattr(heads, "mask_roi_pool"):
            heads.mask_roi_pool = heads.mask_head = heads.mask_predictor = None  # has_mask() is now False
        for p in private.parameters():
            p.requires_grad_(False)
        self.model, self.device, self.score_floor = private, device, score_floor
        self.configure(settings)

    def configure(self, settings=None) -> None:
        """A request's inference settings (sizes, NMS, detections per image: the map explains the detector the
        user asked), scores still down to the floor; None keeps the model's own."""
        from models.tasks.detection import configure

        if settings is not None:
            configure(self.model, settings)
        heads = self.model.roi_heads if hasattr(self.model, "roi_heads") else self.model
        heads.score_thresh = min(heads.score_thresh, self.score_floor)

    def __call__(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode():
            out = self.model(list(images.to(self.device, torch.float32)))
        return [{k: o[k] for k in ("boxes", "labels", "scores")} for o in out]
