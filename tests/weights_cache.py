"""Pretrained-weights caches for tests: files of the exact names, places and tensor shapes that torchvision
(torch hub's checkpoints folder) and timm (the Hugging Face cache) download, holding random values, so the
real loading path (cache lookup, head replacement, freezing) runs without a network.

`compact=True` writes every tensor as one value broadcast to its shape (a few bytes on disk whatever the
model's size), for tests that check names and shapes; otherwise a freshly initialised network's values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

COMMIT = "0" * 40  # the revision a filled Hugging Face cache says `main` points to


def cache_dirs(root: Path) -> dict[str, str]:
    """The environment variables that put torch's and the Hugging Face hub's caches under `root`."""
    return {"TORCH_HOME": str(root / "torch"), "HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(root / "hf" / "hub")}


def _compact(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor as a single stored value broadcast to its shape (positive: BatchNorm variances stay valid)."""
    out = {}
    for i, (key, value) in enumerate(state.items()):
        if value.dtype.is_floating_point:
            out[key] = torch.full((1,), 0.01 * (i % 7 + 1)).expand(value.shape) if value.dim() else torch.tensor(0.5)
        else:
            out[key] = torch.zeros((), dtype=value.dtype) if not value.dim() else torch.zeros(value.shape, dtype=value.dtype)
    return out


def source_network(kind: str, name: str, *, meta: bool = True) -> nn.Module:
    """The network the library's pretrained file belongs to (with its own head: 1000 or 91 classes)."""
    import contextlib
    import inspect

    with torch.device("meta") if meta else contextlib.nullcontext():
        if kind == "torchvision":
            import torchvision

            enum = type(torchvision.models.get_weight(name)).__name__
            builder = torchvision.models.get_model_builder(enum.removesuffix("_Weights").lower())
            extra = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
            return builder(weights=None, **extra)
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=False)


def put_torchvision(name: str, state: dict[str, torch.Tensor] | None = None, *, compact: bool = False) -> Path:
    """Write torchvision's `name` (e.g. ResNet18_Weights.IMAGENET1K_V1) where torch hub caches it."""
    import torchvision

    from models.train.weights import cached_file

    if state is None:
        network = source_network("torchvision", name, meta=compact)
        state = _compact(network.state_dict()) if compact else network.state_dict()
    path = cached_file(torchvision.models.get_weight(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def put_timm(repo: str, state: dict[str, torch.Tensor] | None = None, *, compact: bool = False) -> Path:
    """Write timm's `repo` (e.g. timm/resnest50d.in1k) into the Hugging Face cache as the hub lays it out."""
    from huggingface_hub import constants

    if state is None:
        network = source_network("timm", repo, meta=compact)
        state = _compact(network.state_dict()) if compact else network.state_dict()
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    path = folder / "snapshots" / COMMIT / "pytorch_model.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
