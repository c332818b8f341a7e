"""A private copy of a classifier prepared for attribution, leaving the scoring model untouched.

What the copy changes (its forward pass computes the same numbers):
- every `inplace=True` module (ReLU, ReLU6, Dropout, ...) becomes out-of-place: captum's backward
  hooks need the activation inputs intact;
- "guided" backpropagation, which captum applies to `nn.ReLU` modules only, is extended to the
  other activations by wrapping them in `GuidedActivation` (an `nn.ReLU` subclass computing the
  original function): at each activation the gradient passed back is the activation's own
  gradient with negative values zeroed. For ReLU (resnets, seresnext, resnest) that is exactly
  Springenberg et al.'s guided backprop; for ReLU6 (mobilenetv2) it also zeroes the gradient
  above 6; for GELU (ViT MLPs) and SiLU/Hardswish it is the natural generalisation. Attention
  softmax, LayerNorm and pooling are not guided;
- ViT: the patch tokens entering the last encoder block's attention (`ln_1`) are exposed as a
  [N, D, h, w] grid (`TokenGrid`) so GradCAM has a spatial layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import VisionTransformer

from models.tasks.classification import normalize
from models.tasks.settings import IMAGENET_MEAN, IMAGENET_STD

_GUIDED_TYPES = (nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Hardtanh)


class GuidedActivation(nn.ReLU):
    """Computes `act` but is an `nn.ReLU` to captum, so guided backprop clamps its input gradient."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


class TokenGrid(nn.Module):
    """[N, h*w, D] patch tokens → [N, D, h, w]: the spatial layer GradCAM hooks for a ViT."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, count, dim = tokens.shape
        side = math.isqrt(count)
        return tokens.transpose(1, 2).reshape(n, dim, side, side)


class _TappedNorm(nn.Module):
    """A ViT block's `ln_1` whose patch-token output passes through a `TokenGrid` (same values)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.grid = TokenGrid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(x)
        grid = self.grid(out[:, 1:])
        return torch.cat([out[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class ProbModel(nn.Module):
    """[0, 1] pixels → probabilities (softmax, or sigmoid for multilabel), or logits with `logits=True`."""

    def __init__(self, model: nn.Module, multilabel: bool, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.model = model
        self.multilabel = multilabel
        self.mean, self.std = tuple(mean), tuple(std)
        self.logits = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(normalize(pixels, self.mean, self.std)).float()
        if self.logits:
            return out
        return torch.sigmoid(out) if self.multilabel else torch.softmax(out, dim=1)


def _swap_activations(module: nn.Module) -> None:
    for name, child in module.named_children():
        if hasattr(child, "inplace"):
            child.inplace = False
        if isinstance(child, _GUIDED_TYPES) and not isinstance(child, nn.ReLU):
            setattr(module, name, GuidedActivation(child))
        else:
            _swap_activations(child)


def gradcam_layer(model: nn.Module, arch_name: str) -> nn.Module:
    """The layer guided GradCAM explains, per architecture (the copy must come from `prepare`)."""
    if isinstance(model, VisionTransformer):
        return model.encoder.layers[-1].ln_1.grid
    if hasattr(model, "layer4"):  # torchvision resnets, timm seresnext / resnest: the last stage
        return model.layer4
    if hasattr(model, "features"):  # mobilenetv2: the last features block (1x1 conv to 1280)
        return model.features[-1]
    raise ValueError(f"guided_gradcam: no GradCAM layer is known for {arch_name}; "
                     "use xrai, integrated_gradients or guided_backprop")


def prepare(model: nn.Module, multilabel: bool, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD) -> ProbModel:
    """A float32 eval-mode copy with out-of-place, guided activations (ViT: token grid tapped)."""
    private = copy.deepcopy(model).float().eval()
    for p in private.parameters():
        p.requires_grad_(False)
    _swap_activations(private)
    if isinstance(private, VisionTransformer):
        block = private.encoder.layers[-1]
        block.ln_1 = _TappedNorm(block.ln_1)
    return ProbModel(private, multilabel, mean, std)
