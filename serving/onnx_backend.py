"""Scoring on ONNX Runtime: a model's `artifacts/model.onnx` (models.onnx_export) in place of the torch network.
Preprocessing, batching, tiling and the responses are the Predictor's, as for torch; explanations keep the
torch model (they need gradients).

A detector's graph has its min_size, max_size, nms_iou_thresh, box_score_thresh and box_detections_per_img
built in. A request's higher box_score_thresh or lower box_detections_per_img is applied to the graph's
detections, which gives exactly what torch gives (greedy NMS never lets a box below a threshold suppress one
above it); a request that changes anything else the graph has built in, or is tiled (its tiles get fewer
region proposals than a whole image), is scored by the torch network (`OnnxDetector.for_settings`). A Mask
R-CNN's graph also gives each detection's 28x28 mask probabilities over its box, which the responses paste one
at a time, as they do the torch network's.

Measured on the 2-core development machine (bench/inference_throughput.py), resnet18 at 224 on 2
threads: 31.2 ms per image at batch 1 in eager torch, 17.1 in ONNX Runtime, with no start-up cost
beyond loading the file (torch.compile takes 15-25 s for a similar speed). A Faster R-CNN (resnet18 FPN,
a 640x480 image at min_size 600) took 2.24 s on ONNX Runtime against 1.78 s in torch: on a CPU the torch
backend stays the faster one for detectors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from models.export import ModelSettings
from models.onnx_export import DETECTION_OUTPUTS, INPUT, MASKS, ONNX_FILE, OUTPUT, exportable, not_exported_why

log = logging.getLogger(__name__)


class OnnxScorer(torch.nn.Module):
    """An ONNX Runtime session behind the torch interface scoring calls: float batch → logits (on the CPU)."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: batch})[0])


class OnnxDetector(OnnxScorer):
    """A detector's ONNX Runtime session behind torchvision's detector interface (a list of [3, H, W] images →
    a list of {boxes, labels, scores}, and Mask R-CNN's unpasted `mask_probs` as the torch path has them), with
    the torch detector for the settings its graph cannot follow."""

    def __init__(self, session, fallback: torch.nn.Module, built_in: Any) -> None:
        super().__init__(session)
        self.names = list(DETECTION_OUTPUTS)
        self.keys = list(DETECTION_OUTPUTS)
        if MASKS in {output.name for output in session.get_outputs()}:
            self.names.append(MASKS)
            self.keys.append("mask_probs")
        self.fallback = fallback
        self.built_in = built_in
        # where models.tasks.detection.configure puts a request's settings, as on a torchvision detector
        self.transform = SimpleNamespace(min_size=(built_in.min_size,), max_size=built_in.max_size)
        self.roi_heads = SimpleNamespace(score_thresh=built_in.box_score_thresh, nms_thresh=built_in.nms_iou_thresh,
                                         detections_per_img=built_in.box_detections_per_img)

    def follows(self, settings: Any) -> bool:
        """Whether the graph gives exactly what torch gives under `settings`."""
        b = self.built_in
        return (getattr(settings, "tile_grid", None) is None and settings.min_size == b.min_size
                and settings.max_size == b.max_size and settings.nms_iou_thresh == b.nms_iou_thresh
                and settings.box_score_thresh >= b.box_score_thresh
                and settings.box_detections_per_img <= b.box_detections_per_img)

    def for_settings(self, settings: Any) -> torch.nn.Module:
        """What scores under `settings`: this graph when it follows them, else the torch detector."""
        return self if self.follows(settings) else self.fallback

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        threshold, limit = self.roi_heads.score_thresh, self.roi_heads.detections_per_img
        outputs = []
        for image in images:
            pixels = image.detach().to("cpu", torch.float32).contiguous().numpy()
            out = dict(zip(self.keys, (torch.from_numpy(a) for a in self.session.run(self.names, {INPUT: pixels}))))
            keep = torch.nonzero(out["scores"] >= threshold).flatten()[:limit]  # scores are descending
            outputs.append({key: value[keep] for key, value in out.items()})
        return outputs


def onnx_file(folder: Path, spec: ModelSettings) -> Path:
    """The model.onnx in the artifacts `folder` of the model `spec`; a ValueError says why there is none."""
    if not exportable(spec.task):
        raise ValueError(f"backend onnx: {spec.model_name} ({spec.task.name}) has no ONNX file: "
                         f"{not_exported_why(spec.task)}; use the torch backend")
    path = folder / ONNX_FILE
    if not path.is_file():
        raise ValueError(f"backend onnx: {path} not found (a model exported before visionserve wrote ONNX files "
                         "for its task, or one whose ONNX check failed: its training log says); use the torch "
                         "backend or train it again")
    return path


def onnx_scorer(folder: Path, spec: ModelSettings, device: torch.device,
                fallback: torch.nn.Module) -> OnnxScorer:
    """The ONNX Runtime scorer of the model whose artifacts are in `folder`: on the CPU with as many threads
    as torch has here, on CUDA when `device` is a GPU and ONNX Runtime has its CUDA provider. `fallback`
    (the torch scorer) scores what a detector's graph cannot."""
    import onnxruntime as ort

    path = onnx_file(folder, spec)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    log.info("scoring %s on ONNX Runtime (%s)", spec.model_name, ", ".join(session.get_providers()))
    if spec.task.family != "classification":  # what the graph was exported with (a loader's overrides are not in it)
        built_in = SimpleNamespace(**json.loads(session.get_modelmeta().custom_metadata_map["built_in"]))
        return OnnxDetector(session, fallback, built_in)
    return OnnxScorer(session)


def scorer_for(scorer: torch.nn.Module, settings: Any) -> torch.nn.Module:
    """The module that scores under `settings`: `scorer` itself, or what it hands those settings to."""
    return scorer.for_settings(settings) if isinstance(scorer, OnnxDetector) else scorer
