"""Pretrained weights: a local state_dict file, or a torchvision weights name already in the
torch cache. Nothing is ever downloaded: a missing file is a clear error saying where to put it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from models.tasks.architectures import Architecture

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    pass


@dataclass(frozen=True)
class LoadReport:
    source: str
    loaded: int
    skipped: tuple[str, ...]  # keys of the model left at their initial values

    def __str__(self) -> str:
        return f"loaded {self.loaded} tensors from {self.source}; {len(self.skipped)} left initialised"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(f"weights={path}: not a readable torch state_dict ({exc})") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights={path}: expected a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _torchvision_weights(name: str, arch: Architecture) -> tuple[torchvision.models.WeightsEnum, str]:
    """Resolve `DEFAULT`, `IMAGENET1K_V1` or `ResNet18_Weights.IMAGENET1K_V1`; returns (weights, prefix)."""
    if arch.timm:
        raise WeightsError(f"weights={name}: {arch.name} is built by timm, whose weights come from the "
                           "Hugging Face hub; pass a local state_dict file instead (weights=/path/to/file.pth)")
    candidates: list[tuple[str, str]] = []
    if "." in name:
        enum = name.split(".", 1)[0]
        prefix = arch.backbone_prefix if enum == (arch.backbone_weights or "").split(".")[0] else ""
        candidates.append((name, prefix))
    else:
        if arch.weights:
            candidates.append((f"{arch.weights.split('.')[0]}.{name}", ""))
        if arch.backbone_weights:
            candidates.append((f"{arch.backbone_weights.split('.')[0]}.{name}", arch.backbone_prefix))
    for full, prefix in candidates:
        try:
            return torchvision.models.get_weight(full), prefix
        except (ValueError, KeyError, AttributeError):
            continue
    options = [w for w in (arch.weights, arch.backbone_weights) if w]
    raise WeightsError(f"weights={name} is not a torchvision weights name for {arch.name}"
                       + (f" (try {' or '.join(options)} or DEFAULT)" if options else ""))


def cached_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch keeps the file of these weights once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _match(model: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> tuple[dict, tuple[str, ...]]:
    own = model.state_dict()
    if prefix:
        state = {prefix + k: v for k, v in state.items()}
    elif not any(k in own for k in state):
        # a plain ResNet checkpoint given for a detector: it belongs under backbone.body.
        body = {"backbone.body." + k: v for k, v in state.items()}
        if any(k in own for k in body):
            state = body
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = tuple(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    return usable, skipped


def load_weights(model: nn.Module, arch: Architecture, weights: str) -> LoadReport:
    """Load pretrained weights into `model` where names and shapes match (new heads stay initialised)."""
    path = Path(weights).expanduser()
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") or path.exists():
        if not path.exists():
            raise WeightsError(f"weights={weights}: file not found")
        state, prefix, source = _read_state_dict(path), "", str(path)
    else:
        enum, prefix = _torchvision_weights(weights, arch)
        file = cached_file(enum)
        if not file.exists():
            raise WeightsError(
                f"weights={weights}: {enum} is not in the torch cache ({file}) and visionserve does not "
                f"download weights. On a machine with network run: python -c \"import torchvision; "
                f"torchvision.models.get_weight('{type(enum).__name__}.{enum.name}').get_state_dict()\" and copy "
                f"{file.name} to {file.parent}, or pass a local state_dict file (weights=/path/to/file.pth)"
            )
        state, source = _read_state_dict(file), f"{type(enum).__name__}.{enum.name}"
    usable, skipped = _match(model, state, prefix)
    if not usable:
        raise WeightsError(f"weights={weights}: no tensor matches {arch.name} by name and shape")
    model.load_state_dict(usable, strict=False)
    report = LoadReport(source, len(usable), skipped)
    log.info("%s", report)
    return report
