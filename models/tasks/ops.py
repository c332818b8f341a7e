"""What differs between the tasks, behind one interface (`TaskOps`): data, loss, prediction, metrics and output.

Training, validation and scoring call a task's ops and never branch on the task name themselves. A new task
either reuses one of the two families here or adds a class that satisfies `TaskOps` (tests check both do).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from models.data.records import Record
from models.tasks import classification, detection, detection_metrics, metrics
from models.tasks.tiling import tile_grid


class TrainingOps(Protocol):
    """What training and validation need of a task."""

    collate: Callable | None  # how a DataLoader batches the dataset's items (None: default stacking)

    def dataset(self, records: Sequence[Record], labels: Sequence[str], settings, *, train: bool) -> Any: ...

    def loss_context(self, records: Sequence[Record], labels: Sequence[str], settings) -> Any: ...

    def loss(self, model: nn.Module, batch, device: torch.device, context: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, loader, labels: Sequence[str], settings) -> dict[str, float]: ...


class ScoringOps(Protocol):
    """What scoring needs of a task: decode at the size the model needs, preprocess, predict, format."""

    def decode_size(self, settings, width: int, height: int) -> tuple[int, int] | None: ...

    def preprocess(self, settings) -> Callable: ...

    def input_shape(self, settings) -> tuple[int, ...] | None: ...

    def predict(self, model: nn.Module, inputs: Sequence[torch.Tensor], settings) -> list[Any]: ...

    def format(self, output: Any, size: tuple[int, int], labels: Sequence[str], settings) -> dict: ...


@runtime_checkable
class TaskOps(TrainingOps, ScoringOps, Protocol):
    """Everything that differs between tasks (models.tasks.registry.Task.ops)."""


class ClassificationOps:
    """Data, loss, prediction and output for image_classification(_multilabel)."""

    def __init__(self, multilabel: bool):
        self.multilabel = multilabel

    def dataset(self, records: Sequence[Record], labels: Sequence[str], settings, *, train: bool):
        transform = classification.train_transform(settings) if train else classification.eval_transform(settings)
        return classification.ImageDataset(records, labels, transform, self.multilabel)

    collate = None  # default collation stacks the fixed-size crops

    def preprocess(self, settings) -> Callable:
        return classification.eval_transform(settings)

    def input_shape(self, settings) -> tuple[int, ...] | None:
        """What one preprocessed image is: every one the same size (scoring can compile for it)."""
        return (3, settings.valid_crop_size, settings.valid_crop_size)

    def decode_size(self, settings, width: int, height: int) -> tuple[int, int] | None:
        """The size a width x height image needs to be decoded at (None: its own): the shorter side at
        valid_resize_size, what the evaluation transform resizes it to."""
        return _scaled(width, height, settings.valid_resize_size / min(width, height))

    def loss_context(self, records: Sequence[Record], labels: Sequence[str], settings) -> Any:
        return classification.class_weights(records, labels, settings.weighted_loss, self.multilabel)

    def loss(self, model: nn.Module, batch, device: torch.device, context: Any) -> torch.Tensor:
        images, targets = batch
        weights = context.to(device) if context is not None else None
        return classification.loss(model, images.to(device, non_blocking=True), targets.to(device), weights,
                                   self.multilabel)

    def predict(self, model: nn.Module, inputs: Sequence[torch.Tensor], settings) -> list[torch.Tensor]:
        batch = torch.stack(list(inputs)).to(_device(model), non_blocking=True)
        return list(classification.predict(model, batch, self.multilabel).cpu())

    def evaluate(self, model: nn.Module, loader, labels: Sequence[str], settings) -> dict[str, float]:
        probs, targets = [], []
        for images, target in loader:
            probs += self.predict(model, images, settings)
            targets.append(target)
        p = torch.stack(probs).numpy()
        t = torch.cat(targets).numpy()
        if self.multilabel:
            return metrics.multilabel_metrics(p, t, labels)
        return metrics.classification_metrics(p, t, labels)

    def format(self, output: torch.Tensor, size: tuple[int, int], labels: Sequence[str], settings) -> dict:
        return classification.format_output(output.tolist(), labels)


class DetectionOps:
    """Data, loss, prediction and output for image_object_detection / image_instance_segmentation."""

    def __init__(self, masks: bool):
        self.masks = masks

    def dataset(self, records: Sequence[Record], labels: Sequence[str], settings, *, train: bool):
        tiles = ()
        if train and settings.tile_grid is not None:
            tiles = detection.training_tiles(records, settings.tile_grid, settings.tile_overlap_ratio)
        transform = detection.train_transform(settings) if train else detection.eval_transform(settings)
        return detection.DetectionDataset(records, labels, transform, masks=self.masks, drop_crowd=train, tiles=tiles)

    collate = staticmethod(detection.collate)

    def preprocess(self, settings) -> Callable:
        return detection.eval_transform(settings)

    def input_shape(self, settings) -> tuple[int, ...] | None:
        """None: each image keeps its own size (and the model's output size depends on the data)."""
        return None

    def decode_size(self, settings, width: int, height: int) -> tuple[int, int] | None:
        """The size a width x height image needs to be decoded at (None: its own): what the detector's own
        transform would scale it to (min_size / max_size), or more when its tiles need more pixels."""
        scale = detection.model_scale(width, height, settings)
        if settings.tile_grid is not None:
            tile = tile_grid(width, height, settings.tile_grid, settings.tile_overlap_ratio)[0]
            scale = max(scale, detection.model_scale(tile.width, tile.height, settings))
        return _scaled(width, height, scale)

    def loss_context(self, records: Sequence[Record], labels: Sequence[str], settings) -> Any:
        return None

    def loss(self, model: nn.Module, batch, device: torch.device, context: Any) -> torch.Tensor:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        return detection.loss(model, images, targets)

    def predict(self, model: nn.Module, inputs: Sequence[torch.Tensor], settings) -> list[dict]:
        device = _device(model)
        outputs = detection.predict(model, [im.to(device, non_blocking=True) for im in inputs], settings)
        return [{k: v.cpu() for k, v in out.items()} for out in outputs]

    def evaluate(self, model: nn.Module, loader, labels: Sequence[str], settings) -> dict[str, float]:
        predictions, targets = [], []
        for images, batch_targets in loader:
            for out, target in zip(self.predict(model, images, settings), batch_targets):
                if self.masks:
                    out["masks"] = out["masks"][:, 0] > settings.mask_pixel_score_threshold
                    target = {**target, "masks": target["masks"].bool()}
                predictions.append(out)
                targets.append({k: v.as_subclass(torch.Tensor) for k, v in target.items()})
        return detection_metrics.detection_metrics(
            predictions, targets, labels, metric_type=settings.validation_metric_type,
            iou_threshold=settings.validation_iou_threshold, iou_type="segm" if self.masks else "bbox",
            score_threshold=settings.box_score_thresh, max_detections=settings.box_detections_per_img,
        )

    def format(self, output: dict, size: tuple[int, int], labels: Sequence[str], settings) -> dict:
        return detection.format_output(output, size[0], size[1], labels, settings)


def _scaled(width: int, height: int, scale: float) -> tuple[int, int] | None:
    """(width, height) times `scale` when that shrinks the image, else None."""
    if scale >= 1.0:
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def _device(model: nn.Module) -> torch.device:
    """Where the model's tensors are (the CPU for one that has none: an ONNX Runtime scorer)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
