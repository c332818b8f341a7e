"""Classification (multiclass and multilabel): transforms, dataset, loss, prediction, output.

`eval_transform` is the single preprocessing path for validation and scoring:
resize to `valid_resize_size`, center crop `valid_crop_size`, normalisation by `image_mean` / `image_std`
(ImageNet's, or what the pretrained weights were trained with).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from models.data.records import Record
from models.data.images import decode

from models.tasks.settings import IMAGENET_MEAN, IMAGENET_STD

Triple = Sequence[float]


def _to_float(settings) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(settings.image_mean), list(settings.image_std))]


def eval_crop(settings) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """uint8 image → resize (shorter side) → center crop, still uint8: what the network sees
    (explanations are drawn on it)."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(settings.valid_resize_size, antialias=True),
        v2.CenterCrop(settings.valid_crop_size),
    ])


def eval_transform(settings) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """uint8 image (PIL or [3, H, W] tensor, CPU or GPU) → `eval_crop` → normalise: validation and
    inference alike, the same tensor operations wherever it runs."""
    return v2.Compose([eval_crop(settings), *_to_float(settings)])


def normalize(pixels: torch.Tensor, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD) -> torch.Tensor:
    """Float pixels in [0, 1] ([N, 3, H, W]) → the network's input (`image_mean` / `image_std`); differentiable."""
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def train_transform(settings) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop (25-100 % of the image area, so the object usually stays in view), flip and
    colour jitter; only resize + center crop without augmentations."""
    size = settings.train_crop_size
    if not settings.advanced_settings.apply_automl_train_augmentations:
        return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size), *_to_float(settings)])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        v2.ToImage(),
        *_to_float(settings),
    ])


class ImageDataset(torch.utils.data.Dataset):
    """Records → (image tensor, target): a class index, or a multi-hot float vector."""

    def __init__(self, records: Sequence[Record], labels: Sequence[str], transform: Callable, multilabel: bool):
        self.records = list(records)
        self.index = {name: i for i, name in enumerate(labels)}
        self.transform = transform
        self.multilabel = multilabel

    def __len__(self) -> int:
        return len(self.records)

    def target(self, record: Record) -> torch.Tensor:
        if self.multilabel:
            hot = torch.zeros(len(self.index))
            for name in record.label:
                hot[self.index[name]] = 1.0
            return hot
        return torch.tensor(self.index[record.label])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[i]
        try:
            image = decode(record.image)
        except ValueError as exc:
            raise ValueError(f"{record.where}: {record.image}: {exc}") from None
        return self.transform(image), self.target(record)


def class_weights(records: Sequence[Record], labels: Sequence[str], mode: int, multilabel: bool) -> torch.Tensor | None:
    """`weighted_loss`: 0 none, 1 sqrt of inverse frequency, 2 inverse frequency (mean 1)."""
    if mode == 0:
        return None
    counts = np.zeros(len(labels))
    index = {name: i for i, name in enumerate(labels)}
    for r in records:
        for name in r.label_names():
            counts[index[name]] += 1
    weights = counts.sum() / np.maximum(counts, 1.0)
    if mode == 1:
        weights = np.sqrt(weights)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
         multilabel: bool) -> torch.Tensor:
    logits = model(images)
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)
    return F.cross_entropy(logits, targets, weight=weights)


def predict(model: nn.Module, images: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Probabilities [N, C]: softmax (multiclass) or sigmoid per label (multilabel)."""
    return probabilities(model(images), multilabel)


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Logits [N, C] → probabilities: softmax (multiclass) or sigmoid per label (multilabel)."""
    logits = logits.float()
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def format_output(probs: Sequence[float], labels: Sequence[str]) -> dict:
    """scoring.md's response: every label with its probability."""
    return {"probs": [float(p) for p in probs], "labels": list(labels)}
