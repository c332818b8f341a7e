"""`artifacts/model.onnx`: a trained model as ONNX, to score with ONNX Runtime anywhere (the
cloud hands its users one with every AutoML image model).

Classifiers: the graph takes what the evaluation transform makes, float32 `[batch, 3, height, width]`
(resized to valid_resize_size, center-cropped to valid_crop_size, normalised by image_mean / image_std),
under the name `input1`, and gives the logits, `[batch, labels]`, as `output1`: softmax (multi-class) or
sigmoid (multi-label) turns them into the scores `/score` answers. The batch is dynamic, and so are height
and width but for ViTs (built for one valid_crop_size).

Detectors (Faster R-CNN, RetinaNet): the whole torchvision detector for one image, float32 `[3, height,
width]` RGB in [0, 1] of any size as `input1`; the graph normalises, resizes to min_size / max_size, and
gives `boxes` `[n, 4]` (x0, y0, x1, y1 in the input's pixels), `labels` `[n]` (1-based indices into the
labels) and `scores` `[n]` (descending), with the model's box_score_thresh, nms_iou_thresh and
box_detections_per_img built in. torchvision's detectors export for one image per run.

Instance segmentation (Mask R-CNN): the same graph and outputs, plus `masks` `[n, 1, 28, 28]`, each detection's
mask probabilities over its box. torchvision's own graph would paste every mask at the image's full size inside
it (100 masks of a 2667x2667 image are 2.8 GB of floats); as on the torch path, each is pasted outside, one at a
time (resized to its box, placed in the image, thresholded at mask_pixel_score_threshold).

The file's metadata repeats the task, the labels and the preprocessing. torch's TorchScript-based exporter
writes it: on the 2-core development machine it exported resnet18 in 2.4 s (the dynamo exporter, which also
needs onnxscript, in 16 s) and a Faster R-CNN with a resnet18 FPN backbone in 4.4 s.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from models.tasks.architectures import build_model, get_architecture
from models.tasks.classification import probabilities
from models.tasks.detection import configured, paste_masks_one_at_a_time

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUT, OUTPUT = "input1", "output1"  # the names of the cloud's ONNX classifiers
DETECTION_OUTPUTS = ("boxes", "labels", "scores")
MASKS = "masks"  # instance segmentation's fourth output: the torch path's `mask_probs`
OPSET = 17
# the most an ONNX Runtime probability (or detection score) may differ from torch's on the check at export time
TOLERANCE = 1e-4
BOX_TOLERANCE_PX = 0.05  # the most a detection's corner may differ, in the input's pixels
MASK_TOLERANCE = 1e-3  # the most a mask probability may differ
# the settings a detector's graph has built in (the rest of its inference settings are applied outside it)
BUILT_IN = ("min_size", "max_size", "box_score_thresh", "nms_iou_thresh", "box_detections_per_img")


def exportable(task: Any) -> bool:
    """Whether a model of this task (models.tasks.registry.Task) gets a model.onnx."""
    return task.family in ("classification", "detection", "segmentation")


def not_exported_why(task: Any) -> str:
    """In words, why a model of `task` has no ONNX file ("" when it has one)."""
    return "" if exportable(task) else f"visionserve exports no ONNX graph for {task.name}"


def metadata(model_settings: Any) -> dict[str, str]:
    """What a user scoring the file alone needs to know, as ONNX metadata (string values)."""
    s = model_settings.settings
    common = {"task": model_settings.task.name, "model_name": model_settings.model_name,
              "labels": json.dumps(list(model_settings.labels))}
    if model_settings.task.family != "classification":
        masks = ("; masks: [n, 1, 28, 28] each detection's mask probabilities over its box, to resize to the box"
                 if model_settings.task.family == "segmentation" else "")
        return {**common,
                "preprocessing": json.dumps({"input": "RGB, [0, 1] floats, [3, height, width], one image per run; "
                                             "the graph normalises and resizes it itself",
                                             "min_size": s.min_size, "max_size": s.max_size}),
                "built_in": json.dumps({name: getattr(s, name) for name in BUILT_IN}),
                "output": "boxes: [n, 4] x0, y0, x1, y1 in the input's pixels; labels: [n] 1-based indices into "
                          "labels; scores: [n], descending" + masks}
    return {**common,
            "preprocessing": json.dumps({"valid_resize_size": s.valid_resize_size, "valid_crop_size": s.valid_crop_size,
                                         "image_mean": list(s.image_mean), "image_std": list(s.image_std),
                                         "input": "RGB, [0, 1] floats, resized, center-cropped, normalised"}),
            "output": "logits: softmax (multi-class) or sigmoid (multi-label) gives the scores"}


def write_onnx(path: str | Path, model_settings: Any, state_dict: dict[str, torch.Tensor]) -> Path | None:
    """The model of `state_dict` as ONNX at `path`, checked against torch (a batch of two images for a
    classifier, two images of different sizes for a detector); None (with a warning, and no file) when the
    export or the check fails: the model is still served by torch."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    arch = get_architecture(model_settings.model_name, model_settings.task.family)
    try:
        model = build_model(arch, len(model_settings.labels), model_settings.settings)
        model.load_state_dict(state_dict, strict=False)
        model.eval().float().cpu()
        export = _export_classifier if model_settings.task.family == "classification" else _export_detector
        check = export(model, model_settings, arch, path)
        graph = onnx.load(str(path))
        for key, value in metadata(model_settings).items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        difference = check(session)
    except Exception as exc:  # noqa: BLE001  (an optional artifact: the model folder is complete without it)
        path.unlink(missing_ok=True)
        log.warning("no %s for %s: %s: %s", ONNX_FILE, model_settings.model_name, type(exc).__name__,
                    (str(exc).strip().splitlines() or [""])[0])
        return None
    log.info("wrote %s (%s, largest difference from torch %.1e)", path.name, model_settings.model_name, difference)
    return path


def _quiet_export(model: torch.nn.Module, args: tuple, path: Path, **options: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(model, args, str(path), opset_version=OPSET, dynamo=False, **options)


def _export_classifier(model: torch.nn.Module, model_settings: Any, arch: Any, path: Path) -> Callable:
    """Writes the classifier's graph; → the check of a session on it (the largest difference)."""
    crop = model_settings.settings.valid_crop_size
    multilabel = model_settings.task.ops.multilabel
    sample = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch"} if arch.fixed_input else {0: "batch", 2: "height", 3: "width"}
    # traced with autograd on: without it, torch's attention takes a fused fast path ONNX has no operator for
    _quiet_export(model, (sample,), path, input_names=[INPUT], output_names=[OUTPUT],
                  dynamic_axes={INPUT: axes, OUTPUT: {0: "batch"}})
    with torch.no_grad():
        expected = probabilities(model(sample), multilabel)

    def check(session) -> float:
        got = probabilities(torch.from_numpy(session.run([OUTPUT], {INPUT: sample.numpy()})[0]), multilabel)
        difference = float((got - expected).abs().max())
        if difference > TOLERANCE:
            raise ValueError(f"ONNX Runtime's probabilities differ from torch's by {difference:.2g} "
                             f"(more than {TOLERANCE:g})")
        return difference

    return check


def _export_detector(model: torch.nn.Module, model_settings: Any, arch: Any, path: Path) -> Callable:
    """Writes the detector's graph (Mask R-CNN's with its masks unpasted), its settings built in; → the check of a
    session on it."""
    model = configured(model, model_settings.settings)
    names, keys = list(DETECTION_OUTPUTS), DETECTION_OUTPUTS
    if model_settings.task.family == "segmentation":
        paste_masks_one_at_a_time(model)
        names, keys = [*names, MASKS], (*keys, "mask_probs")
    generator = torch.Generator().manual_seed(0)
    samples = [torch.rand(3, 240, 320, generator=generator), torch.rand(3, 300, 200, generator=generator)]
    _quiet_export(_Detections(model, keys).eval(), (samples[0],), path, input_names=[INPUT], output_names=names,
                  dynamic_axes={INPUT: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in names}})
    with torch.no_grad():
        expected = [model([sample])[0] for sample in samples]

    def check(session) -> float:
        worst = 0.0
        for sample, want in zip(samples, expected):
            got = dict(zip(keys, (torch.from_numpy(a) for a in session.run(names, {INPUT: sample.numpy()}))))
            worst = max(worst, _matched(want, got, f"a {sample.shape[2]}x{sample.shape[1]} image"))
        return worst

    return check


class _Detections(torch.nn.Module):
    """A torchvision detector for one image, its outputs in the order of `keys` (RetinaNet's dict has another)."""

    def __init__(self, detector: torch.nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.detector = detector
        self.keys = keys

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.detector([image])[0]
        return tuple(out[key] for key in self.keys)


def _matched(want: dict, got: dict, where: str) -> float:
    """The largest corner gap between torch's detections `want` and ONNX Runtime's `got`, each matched to one
    of the same label whose corners and score are within the tolerances (equal scores may come in either
    order); a ValueError when some detection has no match."""
    if len(got["boxes"]) != len(want["boxes"]):
        raise ValueError(f"ONNX Runtime found {len(got['boxes'])} detections where torch found "
                         f"{len(want['boxes'])} in {where}")
    free = list(range(len(got["boxes"])))
    worst = 0.0
    for i, (box, label, score) in enumerate(zip(want["boxes"], want["labels"], want["scores"])):
        gaps = {j: float((got["boxes"][j] - box).abs().max()) for j in free
                if got["labels"][j] == label and abs(float(got["scores"][j] - score)) <= TOLERANCE}
        j = min(gaps, key=gaps.get, default=None)
        if j is None or gaps[j] > BOX_TOLERANCE_PX:
            raise ValueError(f"a torch detection (label {int(label)}, score {float(score):.4f}) has no ONNX Runtime "
                             f"detection within {BOX_TOLERANCE_PX:g} px and {TOLERANCE:g} in score in {where}")
        if "mask_probs" in want:  # Mask R-CNN: the matched detection's mask too
            gap = float((got["mask_probs"][j] - want["mask_probs"][i]).abs().max())
            if gap > MASK_TOLERANCE:
                raise ValueError(f"a detection's mask probabilities differ from torch's by {gap:.2g} (more than "
                                 f"{MASK_TOLERANCE:g}) in {where}")
        free.remove(j)
        worst = max(worst, gaps[j])
    return worst
