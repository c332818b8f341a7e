"""`modelPerformance` (image-analysis.md, "Evaluations"): a model's scores on a labelled set, from its responses.

The sources name the metrics only ("Image classification: Average Precision, Accuracy Top 1,
Accuracy Top 5" and "Object detection: Mean Average Precision @ 30, Mean Average Precision @ 50,
Mean Average Precision @ 75", model-customization-en.txt), so the definitions are the project's
own (`classification_metrics`, pycocotools' COCOeval) and are written out on each function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from models.data.records import Box, Record
from models.tasks.detection_metrics import coco_average_precision
from models.tasks.metrics import classification_metrics, label_keys

ECE_BINS = 15  # image-analysis.md: calibrationECE (15 bins)
DETECTION_IOUS = (0.30, 0.50, 0.75)  # meanAveragePrecision30, 50, 75
MAX_DETECTIONS = 100  # COCO's maxDets
_CORNERS = ("topX", "topY", "bottomX", "bottomY")


def _check_rows(records: Sequence[Record], responses: Sequence[Any], labels: Sequence[str]) -> dict[str, int]:
    """Refuse mismatched lengths, an empty set, error rows and repeated labels; label → column."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses; each image needs one response")
    if not records:
        raise ValueError("no images to evaluate")
    for i, (record, response) in enumerate(zip(records, responses)):
        if not isinstance(response, Mapping):
            raise ValueError(f"response {i} ({record.where}) is not an object: {response!r}")
        if "error" in response:
            raise ValueError(f"response {i} ({record.where}) is an error row: {response['error']!r}")
    index = {label: k for k, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"labels repeat a name: {list(labels)}")
    return index


def _column(index: Mapping[str, int], name: Any, what: str) -> int:
    """The column of a label name, or a ValueError saying where the unknown name was."""
    if name not in index:
        raise ValueError(f"{what} has label {name!r}, which is not one of the model's labels {list(index)}")
    return index[name]


def _finite(value: Any, what: str) -> float:
    """A finite number, or a ValueError naming it."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{what} is {value!r}; expected a finite number")
    return number


# ---------------------------------------------------------------- classifiers


def _probability_row(response: Mapping[str, Any], index: Mapping[str, int], what: str) -> np.ndarray:
    """One classification response (`{"probs": [...], "labels": [...]}`) as probabilities in `labels` order."""
    probs, names = response.get("probs"), response.get("labels")
    if not isinstance(probs, Sequence) or not isinstance(names, Sequence) or len(probs) != len(names):
        raise ValueError(f"{what} needs 'probs' and 'labels' lists of the same length, got keys {sorted(response)}")
    if not all(isinstance(n, str) for n in names) or len(names) != len(index) or set(names) != set(index):
        raise ValueError(f"{what} gives labels {list(names)}; expected each of {list(index)} once")
    row = np.zeros(len(index))
    for name, prob in zip(names, probs):
        value = _finite(prob, f"{what} probability of {name!r}")
        if not -1e-6 <= value <= 1.0 + 1e-6:
            raise ValueError(f"{what} probability of {name!r} is {value}; expected a number in [0, 1]")
        row[index[name]] = min(max(value, 0.0), 1.0)
    return row


def expected_calibration_error(confidences: Any, correct: Any, bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width bins ((m-1)/M, m/M] of |accuracy - mean confidence| x share of images."""
    confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    if confidences.shape != correct.shape or confidences.size == 0:
        raise ValueError("confidences and correct must be two non-empty sequences of the same length")
    inner_edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    which = np.searchsorted(inner_edges, confidences, side="left")  # edge values fall in the lower bin
    gap = np.bincount(which, weights=correct - confidences, minlength=bins)
    return float(np.abs(gap).sum() / confidences.size)


def classifier_performance(records: Sequence[Record], responses: Sequence[dict], labels: Sequence[str]) -> dict:
    """A classifier's `modelPerformance` from one response per record (same order).

    - ``accuracyTop1`` / ``accuracyTop5``: share of images whose true class has the highest
      probability / is among the five highest (1.0 with five classes or fewer); ties: scikit-learn's.
    - ``averagePrecision``: macro AP, the mean over classes with at least one image of the
      one-vs-rest average precision (scikit-learn's ``average_precision_score``, no interpolation),
      as ``classification_metrics`` computes it for training. The sources only name it ("Average
      Precision"); macro is the project's existing definition, and it weighs rare tags equally.
    - ``calibrationECE``: `expected_calibration_error` of the top-1 probability, 15 bins.
    - ``tagPerformance[tag].accuracy``: the share of that tag's images whose top-1 class is the
      tag (per-class recall). The sources do not define it; tags with no image get no entry.
    """
    index = _check_rows(records, responses, labels)
    if len(labels) < 2:
        raise ValueError(f"a classifier needs at least two labels, got {list(labels)}")
    targets = []
    for i, record in enumerate(records):
        if not isinstance(record.label, str):
            raise ValueError(f"record {i} ({record.where}) is not a single-class label: {record.label!r}")
        targets.append(_column(index, record.label, f"record {i} ({record.where})"))
    probs = np.stack([_probability_row(r, index, f"response {i} ({records[i].where})")
                      for i, r in enumerate(responses)])
    targets_array = np.asarray(targets, dtype=np.int64)
    metrics = classification_metrics(probs, targets_array, labels)
    confidences = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets_array
    present = set(targets)
    return {
        "accuracyTop1": metrics["accuracy"],
        "accuracyTop5": metrics["accuracy_top5"],
        "averagePrecision": metrics["average_precision"],
        "calibrationECE": expected_calibration_error(confidences, correct),
        "tagPerformance": {
            label: {"accuracy": metrics[f"recall/{key}"]}
            for k, (label, key) in enumerate(zip(labels, label_keys(labels))) if k in present
        },
    }


# ---------------------------------------------------------------- detectors


def _target(record: Record, index: Mapping[str, int], what: str) -> dict[str, np.ndarray]:
    """A detection record's boxes as a `coco_average_precision` target (relative xyxy, 1-based labels)."""
    boxes = record.label
    if isinstance(boxes, str) or not all(isinstance(b, Box) for b in boxes):
        raise ValueError(f"{what} is not a list of boxes: {boxes!r}")
    return {
        "boxes": np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes], dtype=np.float64).reshape(-1, 4),
        "labels": np.array([_column(index, b.label, what) + 1 for b in boxes], dtype=np.int64),
        "iscrowd": np.array([int(b.is_crowd) for b in boxes], dtype=np.int64),
    }


def _prediction(response: Mapping[str, Any], index: Mapping[str, int], what: str) -> dict[str, np.ndarray]:
    """One detection response (`{"boxes": [{"box": {topX..}, "label", "score"}]}`) as a prediction."""
    items = response.get("boxes")
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ValueError(f"{what} needs a 'boxes' list, got keys {sorted(response)}")
    corners, classes, scores = [], [], []
    for j, item in enumerate(items):
        where = f"{what} boxes[{j}]"
        box = item.get("box") if isinstance(item, Mapping) else None
        if not isinstance(box, Mapping) or any(key not in box for key in _CORNERS) or "score" not in item:
            raise ValueError(f"{where} needs 'box' {{{', '.join(_CORNERS)}}}, 'label' and 'score', got {item!r}")
        corners.append([_finite(box[key], f"{where}.box.{key}") for key in _CORNERS])
        classes.append(_column(index, item.get("label"), where) + 1)
        scores.append(_finite(item["score"], f"{where}.score"))
    return {
        "boxes": np.array(corners, dtype=np.float64).reshape(-1, 4),
        "labels": np.array(classes, dtype=np.int64),
        "scores": np.array(scores, dtype=np.float64),
    }


def _mean(values: np.ndarray) -> float:
    """Mean over the classes with ground truth (NaN marks the others); 0.0 when none has any."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else 0.0


def detector_performance(records: Sequence[Record], responses: Sequence[dict], labels: Sequence[str]) -> dict:
    """A detector's `modelPerformance` from one response per record (same order).

    ``meanAveragePrecision30`` / ``50`` / ``75``: COCO box AP (pycocotools' COCOeval, 101 recall
    points, area "all", at most 100 detections per image and class) at IoU 0.30, 0.50 and 0.75 (a
    detection matches at IoU >= the threshold), averaged over the labels with ground truth (0.0 when
    no image has a box). ``tagPerformance[tag].averagePrecision50``: that tag's AP at IoU 0.50, for
    tags with ground truth only. Boxes are relative corners on both sides (IoU does not depend on
    the scale); crowd boxes follow COCO (never ground truth, detections on them neither right nor
    wrong); images without boxes count their detections as false positives. A perfect score reads
    1 - 1e-16, not 1.0: pycocotools divides by tp + fp + machine epsilon.
    """
    index = _check_rows(records, responses, labels)
    targets = [_target(r, index, f"record {i} ({r.where})") for i, r in enumerate(records)]
    predictions = [_prediction(r, index, f"response {i} ({records[i].where})") for i, r in enumerate(responses)]
    ap = coco_average_precision(predictions, targets, len(labels), DETECTION_IOUS, MAX_DETECTIONS)
    at30, at50, at75 = ap
    return {
        "meanAveragePrecision30": _mean(at30),
        "meanAveragePrecision50": _mean(at50),
        "meanAveragePrecision75": _mean(at75),
        "tagPerformance": {
            label: {"averagePrecision50": float(at50[k])} for k, label in enumerate(labels) if not np.isnan(at50[k])
        },
    }


PERFORMANCE: Mapping[str, Callable[[Sequence[Record], Sequence[dict], Sequence[str]], dict]] = MappingProxyType({
    "image_classification": classifier_performance,
    "image_object_detection": detector_performance,
})


def model_performance(task: str, records: Sequence[Record], responses: Sequence[dict], labels: Sequence[str]) -> dict:
    """`modelPerformance` for a classifier or a detector, by task name."""
    if task not in PERFORMANCE:
        raise ValueError(f"no modelPerformance for task {task!r}; expected one of {', '.join(PERFORMANCE)}")
    return PERFORMANCE[task](records, responses, labels)
