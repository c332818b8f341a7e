"""What runs a batch of preprocessed images through a model: one `Scorer` per backend, each taking the settings
in force as an argument (nothing shared is changed per request, so there is no lock).

- `TorchScorer`: the torch network (BatchNorm folded, or compiled: serving.compiled); a detector scores through a
  view configured for the request's settings (models.tasks.detection.configured).
- `OnnxClassifier`: a classifier's `artifacts/model.onnx` on ONNX Runtime, or its `artifacts/model.int8.onnx`
  (backend onnx-int8: the same inputs, outputs and metadata, so the same class on the other file).
- `OnnxDetector`: a detector's graph, which has min_size, max_size, nms_iou_thresh, box_score_thresh and
  box_detections_per_img built in. A request's higher box_score_thresh or lower box_detections_per_img is applied
  to the graph's detections, which gives exactly what torch gives (greedy NMS never lets a box below a threshold
  suppress one above it); a request that changes anything else built in, or is tiled (tiles get fewer region
  proposals than a whole image), is scored by the torch network. A Mask R-CNN's graph also gives each
  detection's 28x28 mask probabilities over its box, which the responses paste one at a time, as on torch.

A detector's scorer is also what D-RISE explains (explain.detectors.Detector): an explanation scores its masked
images through `scorer.on(a private copy of the network)`. D-RISE asks for scores down to 0.01, below the graph's
built-in box_score_thresh, so on `onnx` its masked images go through that copy of the torch network.

Measured on the 2-core development machine (bench/inference_throughput.py), resnet18 at 224 on 2 threads:
31.2 ms per image at batch 1 in eager torch, 17.1 in ONNX Runtime, with no start-up cost beyond loading the
file (torch.compile takes 15-25 s for a similar speed). A Faster R-CNN (resnet18 FPN, a 640x480 image at
min_size 600) took 2.24 s on ONNX Runtime against 1.78 s in torch: on a CPU torch stays the faster for detectors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from models.export import ModelSettings
from models.onnx_export import DETECTION_OUTPUTS, INPUT, MASKS, OUTPUT
from models.tasks.classification import probabilities
from serving.backends import ScoringPlan
from serving.compiled import compile_for_cpu

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """A batch of preprocessed images (the task's evaluation transform's output) → the task's raw outputs
    (probabilities, or detection dicts in each input's pixels), under `settings`."""
    def predict(self, inputs: Sequence[torch.Tensor], settings: Any) -> list[Any]: ...


@dataclass(frozen=True)
class TorchScorer:
    module: torch.nn.Module
    ops: Any  # the task's ops (models.tasks.ops)

    def predict(self, inputs: Sequence[torch.Tensor], settings: Any) -> list[Any]:
        return self.ops.predict(self.module, inputs, settings)

    def on(self, module: torch.nn.Module) -> TorchScorer:
        """The same scorer over another copy of the network (an explanation's private one)."""
        return replace(self, module=module)


def _session(path: Path, device: torch.device):
    """An ONNX Runtime session on the CPU with as many threads as torch has here, on CUDA when `device` is a GPU
    and ONNX Runtime has its CUDA provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    log.info("scoring %s on ONNX Runtime (%s)", path, ", ".join(session.get_providers()))
    return session


@dataclass(frozen=True)
class OnnxClassifier:
    session: Any
    multilabel: bool

    def predict(self, inputs: Sequence[torch.Tensor], settings: Any) -> list[torch.Tensor]:
        batch = torch.stack(list(inputs)).to("cpu", torch.float32).contiguous().numpy()
        logits = torch.from_numpy(self.session.run([OUTPUT], {INPUT: batch})[0])
        return list(probabilities(logits, self.multilabel))


@dataclass(frozen=True)
class OnnxDetector:
    """The graph for the settings it follows (`follows`), the torch scorer for the rest."""

    session: Any
    built_in: dict[str, Any]  # the settings the graph was exported with (a loader's overrides are not in it)
    fallback: TorchScorer

    def follows(self, settings: Any) -> bool:
        """Whether the graph gives exactly what torch gives under `settings`."""
        b = self.built_in
        return (getattr(settings, "tile_grid", None) is None and settings.min_size == b["min_size"]
                and settings.max_size == b["max_size"] and settings.nms_iou_thresh == b["nms_iou_thresh"]
                and settings.box_score_thresh >= b["box_score_thresh"]
                and settings.box_detections_per_img <= b["box_detections_per_img"])

    def predict(self, inputs: Sequence[torch.Tensor], settings: Any) -> list[dict[str, torch.Tensor]]:
        if not self.follows(settings):
            return self.fallback.predict(inputs, settings)
        names = [o.name for o in self.session.get_outputs()]
        keys = ["mask_probs" if n == MASKS else n for n in names]
        outputs = []
        for image in inputs:
            pixels = image.detach().to("cpu", torch.float32).contiguous().numpy()
            out = dict(zip(keys, (torch.from_numpy(a) for a in self.session.run(names, {INPUT: pixels}))))
            keep = torch.nonzero(out["scores"] >= settings.box_score_thresh).flatten()
            keep = keep[:settings.box_detections_per_img]  # scores are descending
            outputs.append({key: value[keep] for key, value in out.items()})
        return outputs

    def on(self, module: torch.nn.Module) -> OnnxDetector:
        """The same graph (ONNX Runtime runs one session from many threads), another copy of the network for what
        the graph cannot follow (an explanation's private one)."""
        return replace(self, fallback=self.fallback.on(module))


def networks(scorer: Scorer) -> list[torch.nn.Module]:
    """The torch networks a scorer holds: the one it scores with, or a detector graph's fallback."""
    if isinstance(scorer, TorchScorer):
        return [scorer.module]
    if isinstance(scorer, OnnxDetector):
        return [scorer.fallback.module]
    return []


def scorer_for(scoring: ScoringPlan, module: torch.nn.Module, model_settings: ModelSettings, onnx: Path,
               device: torch.device) -> tuple[Scorer, ScoringPlan]:
    """The scorer `scoring` names for a model: `module` (the torch network, eval mode, on `device`) compiled or
    not, or the ONNX graph at `onnx` (model.onnx, or model.int8.onnx for onnx-int8; with `module` for what a
    detector's graph cannot follow); and the plan as carried out (not compiled after all, when the compiler
    failed)."""
    ops = model_settings.task.ops
    if scoring.compiled:

        compiled = compile_for_cpu(module, ops.input_shape(model_settings.settings))
        if compiled is module:
            scoring = replace(scoring, compiled=False, why=f"{scoring.why}; torch.compile failed")
        module = compiled
    torch_scorer = TorchScorer(module, ops)
    if not scoring.on_onnx:
        return torch_scorer, scoring
    session = _session(onnx, device)
    if model_settings.task.family == "classification":
        return OnnxClassifier(session, model_settings.task.multilabel), scoring
    if not set(DETECTION_OUTPUTS) <= {o.name for o in session.get_outputs()}:
        raise ValueError(f"{onnx.name}: not a visionserve detector graph (outputs {DETECTION_OUTPUTS} missing)")
    built_in = json.loads(session.get_modelmeta().custom_metadata_map["built_in"])
    return OnnxDetector(session, built_in, torch_scorer), scoring
