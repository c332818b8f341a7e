"""Explanations (scoring.md, Explanations). Classifiers: XRAI, integrated gradients, guided GradCAM and guided
backprop on the evaluation center crop, drawn as the spec's 2x2 PNG (`make_explainer`, `explain_crop`).
Detectors and instance segmentation: D-RISE over any `Detector` (serving's scorers are: the torch network on a
private copy, `detector_copy`, or its ONNX Runtime graph), one map per explained detection (`explain_detections`).
`parse_xai(raw, task_name)` validates either's `xai_parameters`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from explain.guided import prepare
from explain.methods import METHODS, Explainer, attribute
from explain.detections import explain_detections
from explain.detectors import SCORE_FLOOR, Detector, detector_copy, explaining_settings
from explain.errors import Stopped, TooManyLabels, UnknownLabel
from explain.params import (ALGORITHMS, DEFAULT, DETECTOR_ALGORITHMS, MAX_EXPLAINED_LABELS, DetectionXaiParameters,
                            XaiParameters, label_problems, parse_xai, xai_parameter_schemas, xai_parameters_class)
from explain.visualize import render
from models.tasks.settings import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ALGORITHMS", "DEFAULT", "DETECTOR_ALGORITHMS", "MAX_EXPLAINED_LABELS", "METHODS", "SCORE_FLOOR",
           "DetectionXaiParameters", "Detector", "Explainer", "Stopped", "TooManyLabels", "UnknownLabel",
           "XaiParameters", "attribute", "detector_copy", "explain_crop", "explain_detections", "explaining_settings",
           "label_problems", "make_explainer", "parse_xai", "targets", "xai_parameter_schemas",
           "xai_parameters_class"]


def make_explainer(model: torch.nn.Module, arch_name: str, multilabel: bool, device: torch.device,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Explainer:
    """A private, guided float32 copy of `model` on `device` (the scoring model is not touched); `mean` and
    `std`: the model's input normalisation (settings.json's image_mean / image_std)."""
    return Explainer(prepare(model, multilabel, mean, std).to(device), arch_name, device)


def targets(probs: torch.Tensor, multilabel: bool, threshold: float) -> list[int]:
    """The classes explained: the top class, or every label with prob >= threshold."""
    if multilabel:
        return [i for i, p in enumerate(probs.tolist()) if p >= threshold]
    return [int(probs.argmax())]


def explain_crop(explainer: Explainer, crop: torch.Tensor, labels: Sequence[str], xai: XaiParameters,
                 should_stop: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor, dict]:
    """uint8 center crop [3, S, S] → (probabilities, the explanation keys of the response). At most
    MAX_EXPLAINED_LABELS labels are explained (TooManyLabels otherwise, before any attribution work);
    `should_stop` is asked before each label (Stopped)."""
    pixels = (crop.to(explainer.device).float() / 255).unsqueeze(0)
    with torch.no_grad():
        probs = explainer.model(pixels)[0].float().cpu()
    multilabel = explainer.model.multilabel
    out: dict = {}
    if not (xai.visualizations or xai.attributions):
        return probs, out
    chosen = targets(probs, multilabel, xai.confidence_score_threshold_multilabel)
    if len(chosen) > MAX_EXPLAINED_LABELS:
        raise TooManyLabels(f"{len(chosen)} labels have prob >= confidence_score_threshold_multilabel="
                            f"{xai.confidence_score_threshold_multilabel:g}; at most {MAX_EXPLAINED_LABELS} are "
                            "explained per image: raise the threshold")
    maps = []
    for target in chosen:
        if should_stop():
            raise Stopped
        maps.append(attribute(explainer, pixels, target, xai))
    if xai.visualizations:
        pictures = [render(pixels[0].cpu(), a, f"{labels[t]}: {probs[t]:.3f} ({xai.xai_algorithm})")
                    for t, a in zip(chosen, maps)]
        out["visualizations"] = pictures if multilabel else pictures[0]
    if xai.attributions:
        arrays = [a.tolist() for a in maps]
        out["attributions"] = arrays if multilabel else arrays[0]
    return probs, out
