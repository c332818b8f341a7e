"""Detection and instance-segmentation metrics (mAP, precision, recall per label) from pycocotools'
``COCOeval``, the reference COCO evaluator (the same engine torchmetrics'
``MeanAveragePrecision(backend="pycocotools")`` wraps). It is called directly because the
torchmetrics wrapper neither exposes the per-image matches needed for exact precision/recall
counts nor keeps images without ground-truth masks in ``segm`` mode (their false positives would
be silently dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.tasks.metrics import (
    COCO_STAT_NAMES, VOC_RECALL_POINTS, IouType, MetricType, as_numpy, quiet, label_keys,
)


@dataclass(frozen=True)
class _Objects:
    """One image's boxes or masks, converted to COCO conventions (xywh boxes, RLE masks)."""

    labels: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    scores: np.ndarray
    crowd: np.ndarray
    rles: list[dict] | None
    size: tuple[int, int] | None


def _mask_array(value: Any, count: int) -> np.ndarray:
    """Return masks as bool [N, H, W]; accepts [N, 1, H, W] and float probabilities (> 0.5)."""
    masks = as_numpy(value)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.size == 0 and count == 0 and masks.ndim != 3:
        return np.zeros((0, 0, 0), dtype=bool)
    if masks.ndim != 3 or masks.shape[0] != count:
        raise ValueError(f"masks must have shape [{count}, H, W], got {masks.shape}")
    return masks if masks.dtype == bool else masks > 0.5


def _encode_masks(masks: np.ndarray) -> list[dict]:
    """RLE-encode bool [N, H, W] masks in one pycocotools call."""
    if masks.shape[0] == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))


def _objects(
    item: Mapping[str, Any], iou_type: IouType, num_classes: int, is_target: bool, score_threshold: float
) -> _Objects:
    """Validate one prediction/target dict, drop low-score predictions and convert to COCO form."""
    kind = "target" if is_target else "prediction"
    labels = as_numpy(item["labels"]).astype(np.int64).reshape(-1)
    n = labels.shape[0]
    if n and (labels.min() < 1 or labels.max() > num_classes):
        raise ValueError(f"{kind} labels must be in 1..{num_classes}, got {labels.min()}..{labels.max()}")
    scores = np.ones(n) if is_target else as_numpy(item["scores"], np.float64).reshape(-1)
    crowd = as_numpy(item.get("iscrowd", np.zeros(n)) if is_target else np.zeros(n)).astype(np.int64)
    crowd = crowd.reshape(-1)
    boxes = as_numpy(item["boxes"], np.float64).reshape(-1, 4) if "boxes" in item else None
    if scores.shape[0] != n or crowd.shape[0] != n or (boxes is not None and boxes.shape[0] != n):
        raise ValueError(f"{kind} boxes/scores/labels/iscrowd lengths differ")
    if boxes is None and iou_type == "bbox":
        raise ValueError(f"iou_type='bbox' needs 'boxes' in every {kind}")
    keep = scores >= score_threshold
    labels, scores, crowd = labels[keep], scores[keep], crowd[keep]
    rles, size = None, None
    if iou_type == "segm":
        if item.get("masks") is None:
            raise ValueError(f"iou_type='segm' needs 'masks' in every {kind}; got keys {sorted(item)}")
        masks = _mask_array(item["masks"], n)[keep]
        rles = _encode_masks(masks)
        size = (int(masks.shape[1]), int(masks.shape[2])) if masks.shape[1] and masks.shape[2] else None
        areas = mask_utils.area(rles).astype(np.float64) if rles else np.zeros(0)
        xywh = mask_utils.toBbox(rles) if rles else np.zeros((0, 4))
    else:
        xyxy = boxes[keep]
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        areas = xywh[:, 2] * xywh[:, 3]
    return _Objects(labels, xywh, areas, scores, crowd, rles, size)


def _annotations(image_id: int, objs: _Objects, first_id: int) -> list[dict]:
    """COCO annotation dicts for one image, with ids starting at ``first_id`` (must be >= 1)."""
    anns = [
        {"id": first_id + j, "image_id": image_id, "category_id": label, "bbox": box, "area": area,
         "iscrowd": crowd, "score": score}
        for j, (label, box, area, crowd, score) in enumerate(
            zip(objs.labels.tolist(), objs.boxes.tolist(), objs.areas.tolist(), objs.crowd.tolist(),
                objs.scores.tolist())
        )
    ]
    if objs.rles is not None:
        for ann, rle in zip(anns, objs.rles):
            ann["segmentation"] = rle
    return anns


def _make_coco(images: list[dict], annotations: list[dict], num_classes: int) -> COCO:
    """Build an indexed in-memory pycocotools COCO object."""
    coco = COCO()
    categories = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with quiet():
        coco.createIndex()
    return coco


def _coco_pair(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_type: IouType,
    score_threshold: float,
) -> tuple[COCO, COCO]:
    """Convert per-image predictions and targets into ground-truth and detection COCO objects."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    images: list[dict] = []
    gt_anns: list[dict] = []
    dt_anns: list[dict] = []
    for image_id, (pred, target) in enumerate(zip(predictions, targets)):
        gt = _objects(target, iou_type, num_classes, True, -np.inf)
        dt = _objects(pred, iou_type, num_classes, False, score_threshold)
        height, width = gt.size or dt.size or (0, 0)
        images.append({"id": image_id, "height": height, "width": width})
        gt_anns += _annotations(image_id, gt, len(gt_anns) + 1)
        dt_anns += _annotations(image_id, dt, len(dt_anns) + 1)
    return _make_coco(images, gt_anns, num_classes), _make_coco(images, dt_anns, num_classes)


def _evaluate(gt: COCO, dt: COCO, iou_type: IouType, max_dets: list[int], voc_threshold: float | None) -> COCOeval:
    """Run COCOeval; with ``voc_threshold`` use one IoU, one area range and a dense recall grid."""
    evaluator = COCOeval(gt, dt, iouType=iou_type)
    evaluator.params.maxDets = max_dets
    if voc_threshold is not None:
        evaluator.params.iouThrs = np.array([voc_threshold], dtype=np.float64)
        evaluator.params.recThrs = np.linspace(0.0, 1.0, VOC_RECALL_POINTS)
        evaluator.params.areaRng = [[0.0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
    with quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _match_counts(evaluator: COCOeval) -> tuple[int, int, int]:
    """Count (TP, FP, non-ignored GT) at the first IoU threshold of a single-area evaluation."""
    tp = fp = n_gt = 0
    for entry in evaluator.evalImgs:
        if entry is None:
            continue
        matched = entry["dtMatches"][0] > 0
        counted = ~entry["dtIgnore"][0].astype(bool)  # detections matched to crowd boxes are ignored
        tp += int(np.count_nonzero(matched & counted))
        fp += int(np.count_nonzero(~matched & counted))
        n_gt += int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
    return tp, fp, n_gt


def _voc_metrics(
    gt: COCO, dt: COCO, iou_type: IouType, keys: list[str], iou_threshold: float, max_detections: int
) -> dict[str, float]:
    """Per-class all-point AP at one IoU threshold, its mean, and overall precision/recall."""
    evaluator = _evaluate(gt, dt, iou_type, [max_detections], iou_threshold)
    precision = evaluator.eval["precision"][0, :, :, 0, 0]  # [recall points, classes]; -1: no GT
    has_gt = precision.min(axis=0) > -1
    ap = precision.mean(axis=0)
    tp, fp, n_gt = _match_counts(evaluator)
    result = {
        "mean_average_precision": float(ap[has_gt].mean()) if has_gt.any() else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / n_gt if n_gt else 0.0,
    }
    result.update({f"average_precision/{keys[k]}": float(ap[k]) for k in np.flatnonzero(has_gt)})
    return result


def _coco_metrics(gt: COCO, dt: COCO, iou_type: IouType, max_detections: int) -> dict[str, float]:
    """The 12 standard COCO statistics (101-point AP, IoU 0.50:0.95); undefined (-1) becomes 0.0."""
    max_dets = [min(1, max_detections), min(10, max_detections), max_detections]
    evaluator = _evaluate(gt, dt, iou_type, max_dets, None)
    with quiet():
        evaluator.summarize()
    return {name: max(float(value), 0.0) for name, value in zip(COCO_STAT_NAMES, evaluator.stats)}


def detection_metrics(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    *,
    metric_type: MetricType = "voc",
    iou_threshold: float = 0.5,
    iou_type: IouType = "bbox",
    score_threshold: float = 0.0,
    max_detections: int = 100,
) -> dict[str, float]:
    """Object-detection / instance-segmentation metrics computed with pycocotools' COCOeval.

    predictions: per image ``{"boxes": [N, 4] xyxy pixels, "scores": [N], "labels": [N] in 1..K,
    "masks": optional [N, H, W] bool (or [N, 1, H, W] probabilities, thresholded at 0.5)}``;
    targets: ``{"boxes", "labels", "iscrowd": optional [N] 0/1, "masks": optional}``. Tensors or
    numpy arrays. Label index i means ``labels[i - 1]``.

    Predictions scoring below ``score_threshold`` are dropped first. Crowd targets follow COCO
    semantics: they are never counted as ground truth, and detections matched to them are
    neither TP nor FP. A detection matches at IoU >= ``iou_threshold``. ``max_detections`` caps
    the highest-scoring detections per image and class (pycocotools' ``maxDets``).

    ``voc``: AP at IoU ``iou_threshold`` with all-point interpolation (VOC2010+), computed by
    pycocotools with that single IoU threshold and a dense grid of 1001 recall thresholds, so the
    mean of the interpolated precision at the grid points approximates the area under the
    interpolated PR curve within ~1/1000. Keys: ``mean_average_precision`` (mean over classes
    with non-crowd ground truth; 0.0 if none), ``precision`` = TP/(TP+FP) and ``recall`` =
    TP/GT over all classes, and ``average_precision/<label>`` for classes with ground truth.
    ``coco``: the 12 COCO statistics (``COCO_STAT_NAMES``, undefined ones reported as 0.0), and
    ``mean_average_precision`` = ``coco_map``. ``coco_voc``: both, with the voc
    ``mean_average_precision``. ``none``: ``{}``. ``iou_type="segm"`` matches masks.
    """
    if metric_type not in ("voc", "coco", "coco_voc", "none"):
        raise ValueError(f"unknown metric_type {metric_type!r}")
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"unknown iou_type {iou_type!r}")
    if not 0.0 < iou_threshold <= 1.0 or max_detections < 1:
        raise ValueError("iou_threshold must be in (0, 1] and max_detections >= 1")
    if metric_type == "none":
        return {}
    gt, dt = _coco_pair(predictions, targets, len(labels), iou_type, score_threshold)
    result: dict[str, float] = {}
    if metric_type in ("coco", "coco_voc"):
        result.update(_coco_metrics(gt, dt, iou_type, max_detections))
        result["mean_average_precision"] = result["coco_map"]
    if metric_type in ("voc", "coco_voc"):
        result.update(_voc_metrics(gt, dt, iou_type, label_keys(labels), iou_threshold, max_detections))
    return result


def coco_average_precision(
    predictions: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_thresholds: Sequence[float],
    max_detections: int = 100,
) -> np.ndarray:
    """COCO box AP per IoU threshold and class ([T, K]; 101 recall points, area "all"); NaN: no ground truth."""
    gt, dt = _coco_pair(predictions, targets, num_classes, "bbox", -np.inf)
    evaluator = COCOeval(gt, dt, iouType="bbox")
    evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
    evaluator.params.maxDets = [max_detections]
    evaluator.params.areaRng = [[0.0, 1e10]]
    evaluator.params.areaRngLbl = ["all"]
    with quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, 0]  # [thresholds, recall points, classes]; -1: no GT
    ap = precision.mean(axis=1)
    ap[(precision < 0).any(axis=1)] = np.nan
    return ap
