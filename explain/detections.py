"""Explanations of a detector's answer (D-RISE): which detections to explain, their maps, and the response keys.

The response keeps the shape of the classifiers' explanations (scoring.md): `visualizations` (base64 PNGs) and
`attributions` (maps), as lists with one item per explained detection, in the order of `explained_boxes`, which
says what each item explains: `detection` (its index in the response's `boxes`, or null for the request's
`target_box`), `box` and `label` (the response's fields), `score` (the detection's; null for a target box),
`similarity` (how well the unmasked image's best detection matches it: its score for a detection; near 0 for a
miss) and `mean_similarity` (the same over the masked images). `masks_used` is how many masks the maps rest on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from explain.detectors import Detector, explaining_settings
from explain.drise import Sampling, saliency, similarity
from explain.errors import UnknownLabel
from explain.params import DetectionXaiParameters, label_problems
from explain.visualize import render_detection

ATTRIBUTION_DECIMALS = 5  # the maps are means over masks: more digits would only be sampling noise, and bytes


@dataclass(frozen=True)
class Target:
    """What one map explains: a box in pixels, a class id (1-based), and the detection it is (None: supplied)."""

    box: tuple[float, float, float, float]
    label: int
    detection: int | None
    score: float | None


def choose_targets(prediction: dict[str, torch.Tensor], labels: Sequence[str], xai: DetectionXaiParameters,
                   width: int, height: int) -> list[Target]:
    """The request's `target_box` (if any) first, then the highest-scoring detections of `prediction` (raw
    detections in pixels, as the model answered the request) with score >= detection_score_threshold, at most
    max_explained_detections. A target box whose label the model lacks raises UnknownLabel."""
    chosen = []
    if xai.target_box is not None:
        box = xai.target_box
        if problems := label_problems(xai, labels):
            raise UnknownLabel(problems[0])
        chosen.append(Target((box.topX * width, box.topY * height, box.bottomX * width, box.bottomY * height),
                             labels.index(box.label) + 1, None, None))
    scores = prediction["scores"].detach().float().cpu()
    order = [int(i) for i in scores.argsort(descending=True) if scores[i] >= xai.detection_score_threshold]
    for i in order[:xai.max_explained_detections]:
        box = tuple(float(v) for v in prediction["boxes"][i].detach().float().cpu())
        chosen.append(Target(box, int(prediction["labels"][i]), i, float(scores[i])))
    return chosen


def _fractions(target: Target, xai: DetectionXaiParameters, width: int, height: int) -> dict[str, float]:
    """The response's box fields: the request's own values for its target box, else as scoring writes them."""
    if target.detection is None:
        return {k: getattr(xai.target_box, k) for k in ("topX", "topY", "bottomX", "bottomY")}
    x0, y0, x1, y1 = target.box
    values = (x0 / width, y0 / height, x1 / width, y1 / height)
    return dict(zip(("topX", "topY", "bottomX", "bottomY"), (min(max(v, 0.0), 1.0) for v in values)))


def sampling_of(xai: DetectionXaiParameters) -> Sampling:
    return Sampling(masks=xai.number_of_masks, resolution=xai.mask_resolution, keep=xai.mask_keep_probability,
                    batch=xai.internal_batch_size, budget_s=xai.time_budget_s)


def explain_detections(detector: Detector, image: torch.Tensor, prediction: dict[str, torch.Tensor],
                       labels: Sequence[str], xai: DetectionXaiParameters, settings: Any,
                       should_stop: Callable[[], bool] = lambda: False) -> dict:
    """The explanation keys of one image's response (see the module's words). `image` [3, H, W] float in [0, 1],
    as the model saw it; `prediction` the raw detections the response reports; `labels` the model's labels;
    `settings` the inference settings in force (the masked images are scored under them, scores down to
    explain.detectors.SCORE_FLOOR). Raises UnknownLabel (a target box's label the model lacks) and Stopped."""
    height, width = image.shape[-2:]
    targets = choose_targets(prediction, labels, xai, width, height)
    out: dict = {"explained_boxes": [], "masks_used": 0}
    if xai.visualizations:
        out["visualizations"] = []
    if xai.attributions:
        out["attributions"] = []
    if not targets:
        return out
    boxes = torch.tensor([t.box for t in targets], dtype=torch.float32)
    classes = torch.tensor([t.label for t in targets])
    settings = explaining_settings(settings)
    with torch.inference_mode():
        unmasked = similarity(boxes, classes, detector.predict([image], settings))[0]
    result = saliency(detector, image, boxes, classes, settings, sampling_of(xai), should_stop)
    out["masks_used"] = result.masks
    pixels = image.detach().float().cpu()
    for k, target in enumerate(targets):
        name = labels[target.label - 1]
        out["explained_boxes"].append({
            "detection": target.detection, "label": name, "score": target.score,
            "box": _fractions(target, xai, width, height),
            "similarity": round(float(unmasked[k]), 4), "mean_similarity": round(float(result.mean_similarity[k]), 4)})
        if xai.visualizations:
            what = f"{target.score:.3f}" if target.score is not None else "target box"
            out["visualizations"].append(render_detection(pixels, result.maps[k], target.box,
                                                          f"{name}: {what} (d_rise, {result.masks} masks)"))
        if xai.attributions:
            out["attributions"].append(np.round(result.maps[k].numpy(), ATTRIBUTION_DECIMALS).tolist())
    return out
