"""What scores a model's images (a light module: the command line lists these without loading torch).

- `torch`: the torch network, eager, or compiled for CPU classifiers where asked (serving.compiled);
- `onnx`: the folder's `artifacts/model.onnx` on ONNX Runtime (classifiers and detectors; serving.onnx_backend).

Explanations always run on the torch network: they need gradients.
"""

BACKENDS = ("torch", "onnx")
