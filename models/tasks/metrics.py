"""Validation metrics for the four image tasks, with flat MLflow-safe metric names.

Classification metrics come from scikit-learn (here); detection and instance-segmentation metrics
from pycocotools (`models.tasks.detection_metrics`).
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch

MetricType = Literal["voc", "coco", "coco_voc", "none"]
IouType = Literal["bbox", "segm"]

PRIMARY_METRICS: Mapping[str, str] = MappingProxyType(
    {
        "image_classification": "accuracy",
        "image_classification_multilabel": "iou",
        "image_object_detection": "mean_average_precision",
        "image_instance_segmentation": "mean_average_precision",
    }
)

COCO_STAT_NAMES: tuple[str, ...] = tuple(  # order of pycocotools' COCOeval.stats
    f"coco_{name}"
    for name in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                 "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")
)

VOC_RECALL_POINTS = 1001  # recall grid size approximating the all-point (VOC2010+) AP area
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_\-. ]")
_MAX_LABEL_LEN = 200


def primary_metric_name(task: str) -> str:
    """Return the primary metric key for a task name."""
    try:
        return PRIMARY_METRICS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(PRIMARY_METRICS)}") from None


def metric_safe_name(label: object) -> str:
    """Turn a label into one MLflow-safe metric path component (no '/', never '.' or '..')."""
    name = _UNSAFE_CHARS.sub("_", str(label)).strip()[:_MAX_LABEL_LEN]
    if not name or set(name) == {"."}:
        name = "_" * max(len(name), 1)
    return name


def label_keys(labels: Sequence[object]) -> list[str]:
    """Sanitise labels for use in metric keys, de-duplicating collisions with a numeric suffix."""
    keys: list[str] = []
    seen: set[str] = set()
    for label in labels:
        base = key = metric_safe_name(label)
        suffix = 2
        while key in seen:
            key, suffix = f"{base}_{suffix}", suffix + 1
        seen.add(key)
        keys.append(key)
    return keys


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pycocotools' prints and sklearn's undefined-metric warnings inside the block."""
    from sklearn.exceptions import UndefinedMetricWarning

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _sklearn_metrics():
    """sklearn.metrics, imported when first needed (it adds about a second to every process start)."""
    from sklearn import metrics

    return metrics


def as_numpy(value: Any, dtype: Any = None) -> np.ndarray:
    """Convert a tensor, array or sequence to a numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _mean_average_precision(onehot: np.ndarray, scores: np.ndarray) -> float:
    """Macro average precision over the columns that have at least one positive (0.0 if none)."""
    present = np.flatnonzero(onehot.any(axis=0))
    if present.size == 0:
        return 0.0
    skm = _sklearn_metrics()
    aps = [skm.average_precision_score(onehot[:, c], scores[:, c]) for c in present]
    return float(np.mean(aps))


def _check_scores(probs: np.ndarray, n_labels: int) -> None:
    """Validate a [N, C] score matrix against the label list."""
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must have shape [N>0, C], got {probs.shape}")
    if probs.shape[1] != n_labels:
        raise ValueError(f"probs has {probs.shape[1]} columns but {n_labels} labels were given")


def classification_metrics(probs: Any, targets: Any, labels: Sequence[str]) -> dict[str, float]:
    """Multi-class metrics: accuracy (primary), top-5 accuracy, macro P/R, AP, log loss, per-class P/R."""
    probs = as_numpy(probs, np.float64)
    targets = as_numpy(targets).astype(np.int64).reshape(-1)
    _check_scores(probs, len(labels))
    n_classes = probs.shape[1]
    if targets.shape[0] != probs.shape[0] or targets.min() < 0 or targets.max() >= n_classes:
        raise ValueError("targets must be N class indices in [0, C)")
    classes = np.arange(n_classes)
    preds = probs.argmax(axis=1)
    skm = _sklearn_metrics()
    with quiet():
        top5 = 1.0 if n_classes <= 5 else skm.top_k_accuracy_score(targets, probs, k=5, labels=classes)
        per_p, per_r, _, _ = skm.precision_recall_fscore_support(
            targets, preds, labels=classes, average=None, zero_division=0
        )
        normalised = np.clip(probs, 1e-15, None)
        normalised /= normalised.sum(axis=1, keepdims=True)
        result = {
            "accuracy": float(skm.accuracy_score(targets, preds)),
            "accuracy_top5": float(top5),
            "precision_macro": float(skm.precision_score(targets, preds, average="macro", zero_division=0)),
            "recall_macro": float(skm.recall_score(targets, preds, average="macro", zero_division=0)),
            "average_precision": _mean_average_precision(np.eye(n_classes)[targets], probs),
            "log_loss": float(skm.log_loss(targets, normalised, labels=classes)),
        }
    for key, p, r in zip(label_keys(labels), per_p, per_r):
        result[f"precision/{key}"] = float(p)
        result[f"recall/{key}"] = float(r)
    return result


def multilabel_metrics(
    probs: Any, targets: Any, labels: Sequence[str], threshold: float = 0.5
) -> dict[str, float]:
    """Multi-label metrics: sample IoU (primary), micro/macro/weighted IoU, exact match, P/R, AP, per-class IoU.

    A 0/0 IoU (nothing true, nothing predicted) counts as 1.0, per sample and per class, so
    ``iou_macro`` is the mean of the ``iou/<label>`` values.
    """
    probs = as_numpy(probs, np.float64)
    truth = as_numpy(targets).astype(np.int64)
    _check_scores(probs, len(labels))
    if truth.shape != probs.shape or not np.isin(truth, (0, 1)).all():
        raise ValueError(f"targets must be a 0/1 matrix of shape {probs.shape}")
    preds = (probs >= threshold).astype(np.int64)
    skm = _sklearn_metrics()
    with quiet():
        per_class = skm.jaccard_score(truth, preds, average=None, zero_division=1.0)
        result = {
            "iou": float(skm.jaccard_score(truth, preds, average="samples", zero_division=1.0)),
            "iou_micro": float(skm.jaccard_score(truth, preds, average="micro", zero_division=1.0)),
            "iou_macro": float(np.mean(per_class)),
            "iou_weighted": float(skm.jaccard_score(truth, preds, average="weighted", zero_division=1.0)),
            "accuracy": float(skm.accuracy_score(truth, preds)),
            "precision_micro": float(skm.precision_score(truth, preds, average="micro", zero_division=0)),
            "recall_micro": float(skm.recall_score(truth, preds, average="micro", zero_division=0)),
            "average_precision": _mean_average_precision(truth, probs),
        }
    result.update({f"iou/{key}": float(v) for key, v in zip(label_keys(labels), per_class)})
    return result
