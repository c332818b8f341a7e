"""Scoring on ONNX Runtime: a classifier's `artifacts/model.onnx` (models.onnx_export) in place of the torch
network. Preprocessing, batching and the responses are the Predictor's, as for torch; explanations keep the
torch model (they need gradients).

Measured on the 2-core development machine (bench/inference_throughput.py), resnet18 at 224 on 2
threads: 31.2 ms per image at batch 1 in eager torch, 17.1 in ONNX Runtime, with no start-up cost
beyond loading the file (torch.compile takes 15-25 s for a similar speed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.export import ModelSettings
from models.onnx_export import INPUT, ONNX_FILE, OUTPUT, exportable

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


def onnx_file(folder: Path, spec: ModelSettings) -> Path:
    """The model.onnx in the artifacts `folder` of the model `spec`; a ValueError says why there is none."""
    if not exportable(spec.task):
        raise ValueError(f"backend onnx: {spec.model_name} ({spec.task.name}) has no ONNX file; only classifiers "
                         "are exported to ONNX for now: use the torch backend")
    path = folder / ONNX_FILE
    if not path.is_file():
        raise ValueError(f"backend onnx: {path} not found (a model exported before visionserve wrote ONNX files, "
                         "or one whose ONNX check failed: its training log says); use the torch backend or train "
                         "it again")
    return path


def onnx_scorer(folder: Path, spec: ModelSettings, device: torch.device) -> OnnxScorer:
    """The ONNX Runtime scorer of the model whose artifacts are in `folder`: on the CPU with as many threads
    as torch has here, on CUDA when `device` is a GPU and ONNX Runtime has its CUDA provider."""
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
    return OnnxScorer(session)
