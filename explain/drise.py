"""D-RISE (Petsiuk et al., "Black-box Explanation of Object Detectors via Saliency Maps", CVPR 2021).

For N random masks M_i (RISE's: a coarse grid of cells kept with probability p, upsampled bilinearly to a little
more than the image and cropped at a random shift, so cell edges fall anywhere), the detector scores the masked
image I * M_i + fill * (1 - M_i), and each target detection t gets the weight w_it = max over the masked image's detections d of
IoU(box_t, box_d) x [label_d = label_t] x score_d. The paper's similarity is IoU x objectness x the cosine of the
class-probability vectors; torchvision's detectors report one label and its probability per box, so the cosine
against a one-hot target becomes "same label" and the probability stands for objectness x class probability.

The fill is the mean colour the detector normalises by (ImageNet's): RISE's reference code masks the normalised
tensor, so a hidden pixel is that mean, not black; black occluders draw dark shapes that a detector takes for
edges or objects (measured on the tests' tiny detector: with black, the maps' maxima fell beside the objects).

The saliency of pixel x for t is sum_i w_it M_i(x) / sum_i M_i(x) - mean_i w_it: how much higher t's similarity
is, on average, when x is visible than overall. Positive where seeing the pixel helps the detection, negative where
it hurts, in the similarity's own units (dividing by the per-pixel coverage instead of N p removes the sampling
unevenness of a finite N; subtracting the mean weight is what makes an unhelpful pixel 0).

Masks go through the detector `batch` at a time, all targets of an image share them, and the running sums are
all that is kept (memory: targets x H x W, whatever N is). Sampling stops at N masks, when the next batch would
end past the time budget (the map then uses the masks done), or raises `Stopped` when the caller says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from explain.detectors import Detector
from explain.errors import Stopped
from models.tasks.settings import IMAGENET_MEAN


@dataclass(frozen=True)
class Sampling:
    """How masks are drawn and how long drawing may take (DetectionXaiParameters' values)."""

    masks: int = 1000
    resolution: int = 16
    keep: float = 0.5
    batch: int = 8
    budget_s: float = 60.0
    seed: int = 0
    fill: tuple[float, float, float] = IMAGENET_MEAN


@dataclass
class Saliency:
    """One map per target [T, H, W] (CPU float32), the masks they rest on, the mean similarity over those masks
    per target [T], and whether the time budget ended sampling before `Sampling.masks`."""

    maps: torch.Tensor
    masks: int
    mean_similarity: torch.Tensor
    out_of_time: bool
    seconds: float


def random_masks(count: int, height: int, width: int, resolution: int, keep: float,
                 generator: torch.Generator) -> torch.Tensor:
    """[count, height, width] RISE masks in [0, 1]: `resolution` x `resolution` cells kept with probability
    `keep`, upsampled bilinearly to (resolution + 1) cells and cropped at a random shift of less than a cell."""
    cell_h, cell_w = math.ceil(height / resolution), math.ceil(width / resolution)
    grid = (torch.rand(count, 1, resolution, resolution, generator=generator) < keep).float()
    up = F.interpolate(grid, size=((resolution + 1) * cell_h, (resolution + 1) * cell_w), mode="bilinear",
                       align_corners=False)[:, 0]
    dy = torch.randint(0, cell_h, (count,), generator=generator).tolist()
    dx = torch.randint(0, cell_w, (count,), generator=generator).tolist()
    return torch.stack([up[i, y:y + height, x:x + width] for i, (y, x) in enumerate(zip(dy, dx))])


def similarity(boxes: torch.Tensor, labels: torch.Tensor, detections: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[B, T]: for each image's detections, each target's best IoU x same label x score (0: nothing matches).
    `boxes` [T, 4] in pixels, `labels` [T] class ids."""
    from torchvision.ops import box_iou

    out = torch.zeros(len(detections), len(boxes))
    for i, found in enumerate(detections):
        if len(found["boxes"]) == 0:
            continue
        found_boxes = found["boxes"].detach().float().cpu()
        iou = box_iou(boxes, found_boxes)  # [T, D]
        same = labels[:, None] == found["labels"].detach().cpu()[None, :]
        out[i] = (iou * same * found["scores"].detach().float().cpu()[None, :]).max(1).values
    return out


def _next_count(sampling: Sampling, done: int, elapsed: float, per_mask: float | None) -> int:
    """Masks in the next batch: the first is one mask (it times a pass before the budget is trusted to a batch),
    then `batch`, fewer where only fewer fit in the budget; 0 = stop."""
    left = sampling.masks - done
    if per_mask is None:
        return min(1, left)
    fit = int((sampling.budget_s - elapsed) / per_mask) if per_mask > 0 else left
    return max(0, min(sampling.batch, left, fit))


def saliency(detector: Detector, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, settings: Any,
             sampling: Sampling = Sampling(), should_stop: Callable[[], bool] = lambda: False) -> Saliency:
    """D-RISE maps of T targets (`boxes` [T, 4] pixels, `labels` [T] class ids) in `image` [3, H, W] (float in
    [0, 1]), the masked images scored under `settings` (explain.detectors.explaining_settings). `should_stop` is
    asked before every batch (Stopped)."""
    height, width = image.shape[-2:]
    boxes, labels = boxes.detach().float().cpu(), labels.detach().cpu().long()
    generator = torch.Generator().manual_seed(sampling.seed)
    fill = torch.tensor(sampling.fill, dtype=image.dtype, device=image.device).view(3, 1, 1)
    weighted = torch.zeros(len(boxes), height, width, device=image.device)
    coverage = torch.zeros(height, width, device=image.device)
    total = torch.zeros(len(boxes))
    done, per_mask, started = 0, None, time.perf_counter()
    while (count := _next_count(sampling, done, time.perf_counter() - started, per_mask)) > 0:
        if should_stop():
            raise Stopped
        batch_started = time.perf_counter()
        masks = random_masks(count, height, width, sampling.resolution, sampling.keep, generator).to(image.device)
        shown = masks.unsqueeze(1)
        with torch.inference_mode():
            found = detector.predict(list(image * shown + fill * (1 - shown)), settings)
        weights = similarity(boxes, labels, found)  # [count, T]
        weighted += torch.einsum("bt,bhw->thw", weights.to(image.device), masks)
        coverage += masks.sum(0)
        total += weights.sum(0)
        done += count
        per_mask = (time.perf_counter() - batch_started) / count
    mean = total / max(done, 1)
    maps = weighted.cpu() / coverage.cpu().clamp_min(1e-6) - mean[:, None, None]
    return Saliency(maps, done, mean, done < sampling.masks, time.perf_counter() - started)
