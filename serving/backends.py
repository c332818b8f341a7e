"""What scores a model's images (a light module: the command line lists these without loading torch).

- `auto` (the default): `onnx` for a classifier on the CPU whose folder has a model.onnx, else `torch`;
  measured on 2 CPUs, resnet18 at 224: 17.1 ms per image at batch 1 on ONNX Runtime, 31.2 eager, and
  torch.compile's similar speed costs 15-25 s of start-up. Detectors stay on torch: a Faster R-CNN took
  2.24 s on ONNX Runtime against 1.78 s in torch. On a GPU, torch.
- `torch`: the torch network, eager, or compiled for CPU classifiers where asked (serving.compiled);
- `onnx`: the folder's `artifacts/model.onnx` on ONNX Runtime (any task; serving.onnx_backend).

Explanations always run on the torch network: they need gradients.
"""

BACKENDS = ("auto", "torch", "onnx")
DEFAULT_BACKEND = "auto"

# Replicas that score on ONNX Runtime: torch's OpenMP threads, which run only the preprocessing there, wait
# without spinning, so that they leave the CPUs to ONNX Runtime's own threads. resnet18, 2 threads, one 640x480
# JPEG per call: 29.0 -> 22.4 ms per image (20.3 in batches of 8). Eager resnet18 is slower with it (28.6 -> 34.8
# ms); a Faster R-CNN is not (1.21 s either way), so the hub's replicas, which hold both, get it too.
ONNX_REPLICA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def choose(backend: str, family: str, on_cpu: bool, has_onnx: bool) -> str:
    """The backend `backend` means for a model of task `family` ("classification", ...) on the CPU or not,
    whose folder has a model.onnx or not: "torch" or "onnx"."""
    if backend != "auto":
        return backend
    return "onnx" if on_cpu and family == "classification" and has_onnx else "torch"
