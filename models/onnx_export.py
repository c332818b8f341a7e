"""`artifacts/model.onnx`: a trained classifier as ONNX, to score with ONNX Runtime anywhere (the cloud hands
its users one with every AutoML image model).

The graph takes what the evaluation transform makes, float32 `[batch, 3, height, width]` (resized to
valid_resize_size, center-cropped to valid_crop_size, normalised by image_mean / image_std), under the
name `input1`, and gives the logits, `[batch, labels]`, as `output1`: softmax (multi-class) or sigmoid
(multi-label) turns them into the scores `/score` answers. The batch is dynamic, and so are height and
width but for ViTs (built for one valid_crop_size). The file's metadata repeats the task, the labels
and that preprocessing.

Detectors and instance segmentation are not exported (yet): `exportable` says which tasks are.

torch's TorchScript-based exporter writes it: on the 2-core development machine it exported resnet18 in
2.4 s, the dynamo exporter (which also needs onnxscript) in 16 s, and every training exports.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from models.tasks.architectures import build_model, get_architecture

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUT, OUTPUT = "input1", "output1"  # the names of the cloud's ONNX classifiers
OPSET = 17
# the most an ONNX Runtime probability may differ from torch's on the check at export time
TOLERANCE = 1e-4


def exportable(task: Any) -> bool:
    """Whether a model of this task (models.tasks.registry.Task) gets a model.onnx."""
    return task.family == "classification"


def _probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def metadata(model_settings: Any) -> dict[str, str]:
    """What a user scoring the file alone needs to know, as ONNX metadata (string values)."""
    s = model_settings.settings
    return {"task": model_settings.task.name, "model_name": model_settings.model_name,
            "labels": json.dumps(list(model_settings.labels)),
            "preprocessing": json.dumps({"valid_resize_size": s.valid_resize_size, "valid_crop_size": s.valid_crop_size,
                                         "image_mean": list(s.image_mean), "image_std": list(s.image_std),
                                         "input": "RGB, [0, 1] floats, resized, center-cropped, normalised"}),
            "output": "logits: softmax (multi-class) or sigmoid (multi-label) gives the scores"}


def write_onnx(path: str | Path, model_settings: Any, state_dict: dict[str, torch.Tensor]) -> Path | None:
    """The classifier of `state_dict` as ONNX at `path`, checked against torch on a batch of two; None (with
    a warning, and no file) when the export or the check fails: the model is still served by torch."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    task = model_settings.task
    arch = get_architecture(model_settings.model_name, task.family)
    crop = model_settings.settings.valid_crop_size
    try:
        model = build_model(arch, len(model_settings.labels), model_settings.settings)
        model.load_state_dict(state_dict, strict=False)
        model.eval().float().cpu()
        sample = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
        axes = {0: "batch"} if arch.fixed_input else {0: "batch", 2: "height", 3: "width"}
        # traced with autograd on: without it, torch's attention takes a fused fast path ONNX has no operator for
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(model, (sample,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: axes, OUTPUT: {0: "batch"}}, opset_version=OPSET, dynamo=False)
        with torch.no_grad():
            expected = _probabilities(model(sample), task.ops.multilabel)
        graph = onnx.load(str(path))
        for key, value in metadata(model_settings).items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = _probabilities(torch.from_numpy(session.run([OUTPUT], {INPUT: sample.numpy()})[0]), task.ops.multilabel)
        difference = float((got - expected).abs().max())
        if difference > TOLERANCE:
            raise ValueError(f"ONNX Runtime's probabilities differ from torch's by {difference:.2g} "
                             f"(more than {TOLERANCE:g})")
    except Exception as exc:  # noqa: BLE001  (an optional artifact: the model folder is complete without it)
        path.unlink(missing_ok=True)
        log.warning("no %s for %s: %s: %s", ONNX_FILE, model_settings.model_name, type(exc).__name__,
                    (str(exc).strip().splitlines() or [""])[0])
        return None
    log.info("wrote %s (%s, largest difference from torch %.1e)", path.name, model_settings.model_name, difference)
    return path
