"""The four attribution methods: one registry, each `(explainer, pixels, target, xai) → [3, S, S]`.

`pixels` is one [1, 3, S, S] float crop in [0, 1], the value range whose ImageNet normalisation
the network was trained on (`ProbModel` normalises). XRAI and integrated gradients explain the
target's probability (softmax, or sigmoid for multilabel); guided backprop and guided GradCAM its
logit (gradients of a saturated probability vanish). Integration steps and baselines go through
the network `internal_batch_size` images at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from explain.guided import ProbModel, gradcam_layer
from explain.params import XaiParameters


@dataclass
class Explainer:
    """A prepared private model (`guided.prepare`), its architecture name, and its device."""

    model: ProbModel
    arch_name: str
    device: torch.device

    def layer(self) -> nn.Module:
        return gradcam_layer(self.model.model, self.arch_name)


Method = Callable[[Explainer, torch.Tensor, int, XaiParameters], torch.Tensor]


def input_gradients(model: ProbModel, points: torch.Tensor, target: int, batch: int) -> torch.Tensor:
    """d prob[target] / d pixels for every point [K, 3, S, S], `batch` points per pass."""
    grads = []
    for chunk in points.split(batch):
        chunk = chunk.detach().requires_grad_(True)
        prob = model(chunk)[:, target]
        grads.append(torch.autograd.grad(prob.sum(), chunk)[0])
    return torch.cat(grads)


def path_integrated_gradients(model: ProbModel, x: torch.Tensor, baselines: torch.Tensor, target: int,
                              n_steps: int, batch: int) -> torch.Tensor:
    """saliency's integrated gradients (alphas linspace(0, 1, n_steps)) for several baselines at once:
    all baselines x steps points share batches. x [3, S, S], baselines [B, 3, S, S] → [B, 3, S, S]."""
    alphas = torch.linspace(0, 1, n_steps, device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
    diff = (x.unsqueeze(0) - baselines).unsqueeze(1)  # [B, 1, 3, S, S]
    points = (baselines.unsqueeze(1) + alphas * diff).flatten(0, 1)  # [B * n_steps, 3, S, S]
    grads = input_gradients(model, points, target, batch).view(len(baselines), n_steps, *x.shape)
    return grads.sum(1) * diff.squeeze(1) / n_steps


def saliency_call_model(model: ProbModel, device: torch.device):
    """saliency's `call_model_function`: [N, S, S, 3] pixels in [0, 1] → d prob[target] / d pixels."""
    import saliency.core as saliency

    def call(images: np.ndarray, call_model_args: dict | None = None, expected_keys=None) -> dict:
        points = torch.as_tensor(np.asarray(images), dtype=torch.float32, device=device).permute(0, 3, 1, 2)
        grads = input_gradients(model, points, call_model_args["target"], len(points))
        return {saliency.INPUT_OUTPUT_GRADIENTS: grads.permute(0, 2, 3, 1).cpu().numpy()}

    return call


def xrai(explainer: Explainer, pixels: torch.Tensor, target: int, xai: XaiParameters) -> torch.Tensor:
    """PAIR's XRAI over integrated gradients from a black and a white baseline (its defaults:
    the image's min and max), both baselines' steps batched; the region map on all 3 channels."""
    import saliency.core as saliency

    x = pixels[0]
    baselines = torch.stack([torch.full_like(x, float(x.min())), torch.full_like(x, float(x.max()))])
    with _probabilities(explainer.model):
        ig = path_integrated_gradients(explainer.model, x, baselines, target, xai.n_steps, xai.internal_batch_size)
    image = x.permute(1, 2, 0).cpu().numpy().astype(np.float64)
    base = ig.mean(0).permute(1, 2, 0).cpu().numpy()
    params = saliency.XRAIParameters(steps=xai.n_steps, algorithm="fast" if xai.xrai_fast else "full")
    # GetMask requires the model function; with base_attribution given it only segments and ranks regions
    mask = saliency.XRAI().GetMask(image, saliency_call_model(explainer.model, explainer.device),
                                   call_model_args={"target": target}, base_attribution=base,
                                   extra_parameters=params)
    return torch.as_tensor(np.asarray(mask), dtype=torch.float32).expand(3, -1, -1).clone()


def integrated_gradients(explainer: Explainer, pixels: torch.Tensor, target: int,
                         xai: XaiParameters) -> torch.Tensor:
    """captum's IntegratedGradients from a black image, `n_steps` with `approximation_method`."""
    from captum.attr import IntegratedGradients

    with _probabilities(explainer.model):
        attr = IntegratedGradients(explainer.model).attribute(
            pixels, baselines=torch.zeros_like(pixels), target=target, n_steps=xai.n_steps,
            method=xai.approximation_method, internal_batch_size=xai.internal_batch_size)
    return attr[0].detach()


def guided_backprop(explainer: Explainer, pixels: torch.Tensor, target: int, xai: XaiParameters) -> torch.Tensor:
    """captum's GuidedBackprop of the target's logit (guided activations: see `explain.guided`)."""
    from captum.attr import GuidedBackprop

    with _logits(explainer.model):
        attr = GuidedBackprop(explainer.model).attribute(pixels.clone().requires_grad_(True), target=target)
    return attr[0].detach()


def guided_gradcam(explainer: Explainer, pixels: torch.Tensor, target: int, xai: XaiParameters) -> torch.Tensor:
    """captum's GuidedGradCam of the target's logit on the architecture's last spatial stage."""
    from captum.attr import GuidedGradCam

    layer = explainer.layer()
    with _logits(explainer.model):
        attr = GuidedGradCam(explainer.model, layer).attribute(pixels.clone().requires_grad_(True), target=target,
                                                               interpolate_mode="bilinear")
    return attr[0].detach()


class _Mode:
    def __init__(self, model: ProbModel, logits: bool):
        self.model, self.logits = model, logits

    def __enter__(self) -> None:
        self.model.logits = self.logits

    def __exit__(self, *exc) -> None:
        self.model.logits = False


def _logits(model: ProbModel) -> _Mode:
    return _Mode(model, True)


def _probabilities(model: ProbModel) -> _Mode:
    return _Mode(model, False)


METHODS: dict[str, Method] = {
    "xrai": xrai,
    "integrated_gradients": integrated_gradients,
    "guided_gradcam": guided_gradcam,
    "guided_backprop": guided_backprop,
}


def attribute(explainer: Explainer, pixels: torch.Tensor, target: int, xai: XaiParameters) -> torch.Tensor:
    """[3, S, S] float32 CPU attributions of `target` by `xai.xai_algorithm`."""
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        pixels = pixels.clone().to(explainer.device, torch.float32)  # a normal tensor, even from inference mode
        return METHODS[xai.xai_algorithm](explainer, pixels, target, xai).float().cpu()
