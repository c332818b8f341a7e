"""Tests for models.tasks.metrics: classification, multilabel, detection and segmentation metrics."""

from __future__ import annotations

import math
import posixpath
import re
import warnings

import numpy as np
import pytest
import torch

from models.tasks.detection_metrics import detection_metrics
from models.tasks.metrics import COCO_STAT_NAMES, classification_metrics, label_keys, multilabel_metrics, primary_metric_name

MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_\-. /]+$")


def boxes(*coords: float) -> torch.Tensor:
    """Float [N, 4] box tensor from a flat list of xyxy coordinates."""
    return torch.tensor(coords, dtype=torch.float32).reshape(-1, 4)


def target(box_list: torch.Tensor, labels: list[int], iscrowd: list[int] | None = None) -> dict:
    """Target dict in the detection_metrics input format."""
    item = {"boxes": box_list, "labels": torch.tensor(labels, dtype=torch.long)}
    if iscrowd is not None:
        item["iscrowd"] = torch.tensor(iscrowd, dtype=torch.long)
    return item


def prediction(box_list: torch.Tensor, scores: list[float], labels: list[int]) -> dict:
    """Prediction dict in the detection_metrics input format."""
    return {
        "boxes": box_list,
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def empty_target() -> dict:
    """Target dict for an image without objects."""
    return target(torch.zeros(0, 4), [])


def all_point_ap(is_tp: list[bool], n_gt: int) -> float:
    """Independent all-point interpolated AP (VOC2010+) for detections sorted by score."""
    tp = np.cumsum(is_tp)
    fp = np.cumsum(np.logical_not(is_tp))
    recall = np.concatenate([[0.0], tp / n_gt, [1.0]])
    precision = np.concatenate([[0.0], tp / (tp + fp), [0.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def square_masks(box_list: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Bool masks filling each (integer) box."""
    masks = torch.zeros(len(box_list), size, size, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(box_list.int().tolist()):
        masks[i, y0:y1, x0:x1] = True
    return masks


def assert_mlflow_safe(metrics: dict[str, float]) -> None:
    """Every key is MLflow-loggable and every value is a finite float."""
    for key, value in metrics.items():
        assert MLFLOW_NAME.match(key), key
        assert posixpath.normpath(key) == key, key
        assert isinstance(value, float) and math.isfinite(value), (key, value)


# ---------------------------------------------------------------- primary metric names


@pytest.mark.parametrize(
    ("task", "name"),
    [
        ("image_classification", "accuracy"),
        ("image_classification_multilabel", "iou"),
        ("image_object_detection", "mean_average_precision"),
        ("image_instance_segmentation", "mean_average_precision"),
    ],
)
def test_primary_metric_name_maps_each_task(task: str, name: str) -> None:
    assert primary_metric_name(task) == name


def test_primary_metric_name_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        primary_metric_name("image_regression")


# ---------------------------------------------------------------- classification


def test_classification_perfect_predictions_score_one() -> None:
    probs = np.eye(7)[[0, 1, 2, 3, 4, 5, 6, 0]] * 0.9 + 0.01
    metrics = classification_metrics(probs, np.array([0, 1, 2, 3, 4, 5, 6, 0]), list("abcdefg"))
    for key, value in metrics.items():
        if key != "log_loss":
            assert value == pytest.approx(1.0), key
    assert metrics["log_loss"] < 0.2
    assert_mlflow_safe(metrics)


def test_classification_top5_counts_target_within_five_best() -> None:
    probs = np.array([[0.3, 0.25, 0.2, 0.1, 0.08, 0.07, 0.0], [0.3, 0.25, 0.2, 0.1, 0.08, 0.07, 0.0]])
    metrics = classification_metrics(probs, np.array([4, 5]), list("abcdefg"))
    assert metrics["accuracy"] == 0.0
    assert metrics["accuracy_top5"] == pytest.approx(0.5)


def test_classification_with_absent_classes_and_few_classes_is_quiet_and_finite() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(probs, np.array([0, 0, 0]), ["x", "y", "z"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["accuracy_top5"] == 1.0  # C <= 5
    assert metrics["recall/z"] == 0.0 and metrics["precision/z"] == 0.0
    assert metrics["precision/x"] == 1.0 and metrics["precision/y"] == 0.0
    assert metrics["average_precision"] == 1.0  # only class x is present and it is ranked perfectly
    assert_mlflow_safe(metrics)


def test_classification_single_sample() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(np.array([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0]]), np.array([3]), list("abcdef"))
    assert metrics["accuracy"] == 1.0 and metrics["accuracy_top5"] == 1.0
    assert_mlflow_safe(metrics)


def test_classification_accepts_torch_inputs_and_rejects_bad_shapes() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert classification_metrics(probs, torch.tensor([0, 1]), ["a", "b"])["accuracy"] == 1.0
    with pytest.raises(ValueError):
        classification_metrics(probs, torch.tensor([0, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError):
        classification_metrics(probs, torch.tensor([0, 2]), ["a", "b"])


def test_per_class_keys_are_sanitised_and_unique() -> None:
    labels = ["cat/dog", "a b!", "caf\u00e9", "..", "", "cat?dog"]
    keys = label_keys(labels)
    assert keys == ["cat_dog", "a b_", "caf_", "__", "_", "cat_dog_2"]
    probs = np.eye(6)
    metrics = classification_metrics(probs, np.arange(6), labels)
    assert "precision/cat_dog" in metrics and "recall/cat_dog_2" in metrics
    assert_mlflow_safe(metrics)
    assert_mlflow_safe(multilabel_metrics(probs, np.eye(6, dtype=int), labels))


# ---------------------------------------------------------------- multilabel


def test_multilabel_perfect_predictions_score_one() -> None:
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    metrics = multilabel_metrics(truth * 0.8 + 0.1, truth, ["a", "b", "c"])
    assert all(value == pytest.approx(1.0) for value in metrics.values()), metrics
    assert_mlflow_safe(metrics)


def test_multilabel_iou_counts_empty_vs_empty_sample_as_one() -> None:
    truth = np.array([[0, 0, 0], [1, 1, 0]])
    probs = np.array([[0.1, 0.2, 0.3], [0.9, 0.2, 0.1]])  # sample 2 predicts {a} for {a, b}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = multilabel_metrics(probs, truth, ["a", "b", "c"])
    assert metrics["iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["iou_micro"] == pytest.approx(1 / 2)
    assert metrics["iou/a"] == 1.0 and metrics["iou/b"] == 0.0 and metrics["iou/c"] == 1.0
    assert metrics["iou_macro"] == pytest.approx(2 / 3)
    assert metrics["iou_weighted"] == pytest.approx(0.5)
    assert metrics["accuracy"] == 0.5
    assert metrics["precision_micro"] == 1.0 and metrics["recall_micro"] == 0.5
    assert_mlflow_safe(metrics)


def test_multilabel_threshold_is_inclusive() -> None:
    metrics = multilabel_metrics(np.array([[0.5, 0.49]]), np.array([[1, 0]]), ["a", "b"], threshold=0.5)
    assert metrics["iou"] == 1.0


# ---------------------------------------------------------------- detection: voc


def test_detection_perfect_predictions_score_one() -> None:
    gts = [target(boxes(0, 0, 10, 10, 20, 20, 40, 40), [1, 2]), target(boxes(5, 5, 50, 50), [1])]
    preds = [prediction(t["boxes"], [0.9] * len(t["labels"]), t["labels"].tolist()) for t in gts]
    metrics = detection_metrics(preds, gts, ["car", "person"], metric_type="coco_voc")
    for key in ("mean_average_precision", "precision", "recall", "average_precision/car", "coco_map", "coco_map_50"):
        assert metrics[key] == pytest.approx(1.0), key
    assert_mlflow_safe(metrics)


def test_voc_ap_matches_hand_computed_all_point_value() -> None:
    # 2 GT; detections by score: TP, FP, TP -> AP = 0.5 * 1 + 0.5 * (2/3) = 0.8333
    gts = [target(boxes(0, 0, 10, 10, 20, 20, 30, 30), [1, 1])]
    preds = [prediction(boxes(0, 0, 10, 10, 50, 50, 60, 60, 20, 20, 30, 30), [0.9, 0.8, 0.7], [1, 1, 1])]
    metrics = detection_metrics(preds, gts, ["thing"])
    assert metrics["mean_average_precision"] == pytest.approx(0.8333, abs=1e-3)
    assert metrics["average_precision/thing"] == metrics["mean_average_precision"]
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == 1.0


@pytest.mark.parametrize(
    ("outcomes", "n_gt"),
    [
        ([True, False, True], 2),
        ([False, True, True, False, True], 4),  # recall never reaches 1
        ([False, False, True], 1),
        ([True, True, False, False, True, False, True], 5),
    ],
)
def test_voc_ap_matches_independent_all_point_computation(outcomes: list[bool], n_gt: int) -> None:
    gt_boxes = [(100.0 * i, 0.0, 100.0 * i + 10, 10.0) for i in range(n_gt)]
    det_boxes, next_gt = [], 0
    for k, hit in enumerate(outcomes):
        if hit:
            det_boxes.append(gt_boxes[next_gt])
            next_gt += 1
        else:
            det_boxes.append((5.0 * k, 500.0, 5.0 * k + 4, 504.0))
    scores = np.linspace(0.9, 0.1, len(outcomes)).tolist()
    preds = [prediction(boxes(*np.ravel(det_boxes)), scores, [1] * len(outcomes))]
    gts = [target(boxes(*np.ravel(gt_boxes)), [1] * n_gt)]
    metrics = detection_metrics(preds, gts, ["thing"])
    assert metrics["mean_average_precision"] == pytest.approx(all_point_ap(outcomes, n_gt), abs=1e-3)
    assert metrics["recall"] == pytest.approx(sum(outcomes) / n_gt)


def test_voc_uses_the_given_iou_threshold() -> None:
    gts = [target(boxes(0, 0, 10, 10), [1])]
    preds = [prediction(boxes(0, 0, 10, 6), [0.9], [1])]  # IoU 0.6
    assert detection_metrics(preds, gts, ["a"], iou_threshold=0.5)["mean_average_precision"] == pytest.approx(1.0)
    assert detection_metrics(preds, gts, ["a"], iou_threshold=0.7)["mean_average_precision"] == 0.0


def test_detection_on_crowd_box_is_not_a_false_positive() -> None:
    gt_boxes = boxes(0, 0, 10, 10, 50, 50, 90, 90)
    preds = [prediction(boxes(52, 52, 88, 88, 0, 0, 10, 10), [0.95, 0.9], [1, 1])]
    with_crowd = detection_metrics(preds, [target(gt_boxes, [1, 1], iscrowd=[0, 1])], ["a"])
    assert with_crowd["mean_average_precision"] == pytest.approx(1.0)
    assert with_crowd["precision"] == 1.0 and with_crowd["recall"] == 1.0
    without_crowd = detection_metrics(preds, [target(gt_boxes[:1], [1])], ["a"])
    assert without_crowd["precision"] == 0.5
    assert without_crowd["mean_average_precision"] == pytest.approx(0.5, abs=1e-3)


def test_crowd_only_class_is_excluded_from_the_mean() -> None:
    gts = [target(boxes(0, 0, 10, 10, 50, 50, 90, 90), [1, 2], iscrowd=[0, 1])]
    preds = [prediction(boxes(0, 0, 10, 10), [0.9], [1])]
    metrics = detection_metrics(preds, gts, ["a", "b"])
    assert metrics["mean_average_precision"] == pytest.approx(1.0)
    assert "average_precision/b" not in metrics


def test_score_threshold_drops_low_scoring_predictions() -> None:
    gts = [target(boxes(0, 0, 10, 10), [1]), empty_target()]
    preds = [prediction(boxes(0, 0, 10, 10), [0.9], [1]), prediction(boxes(0, 0, 10, 10), [0.4], [1])]
    kept = detection_metrics(preds, gts, ["a"], score_threshold=0.0)
    dropped = detection_metrics(preds, gts, ["a"], score_threshold=0.5)
    assert kept["precision"] == 0.5
    assert dropped["precision"] == 1.0 and dropped["mean_average_precision"] == pytest.approx(1.0)
    gone = detection_metrics(preds, gts, ["a"], score_threshold=0.95)
    assert gone["mean_average_precision"] == 0.0 and gone["precision"] == 0.0 and gone["recall"] == 0.0


def test_false_positives_on_background_images_lower_ap() -> None:
    gts = [target(boxes(0, 0, 10, 10), [1]), empty_target()]
    preds = [prediction(boxes(0, 0, 10, 10), [0.5], [1]), prediction(boxes(0, 0, 10, 10), [0.9], [1])]
    assert detection_metrics(preds, gts, ["a"])["mean_average_precision"] == pytest.approx(0.5, abs=1e-3)


def test_classes_without_ground_truth_do_not_produce_nan() -> None:
    gts = [target(boxes(0, 0, 10, 10), [1]), empty_target()]
    preds = [prediction(boxes(0, 0, 10, 10), [0.9], [1]), prediction(torch.zeros(0, 4), [], [])]
    metrics = detection_metrics(preds, gts, ["a", "b", "c"], metric_type="coco_voc")
    assert metrics["mean_average_precision"] == pytest.approx(1.0)
    assert set(k for k in metrics if k.startswith("average_precision/")) == {"average_precision/a"}
    assert_mlflow_safe(metrics)


@pytest.mark.parametrize("metric_type", ["voc", "coco", "coco_voc"])
def test_everything_empty_gives_zero_not_nan(metric_type: str) -> None:
    empty = prediction(torch.zeros(0, 4), [], [])
    for preds, gts in (([], []), ([empty, empty], [empty_target(), empty_target()])):
        metrics = detection_metrics(preds, gts, ["a"], metric_type=metric_type)
        assert metrics["mean_average_precision"] == 0.0
        assert_mlflow_safe(metrics)


def test_detection_accepts_numpy_inputs() -> None:
    gts = [{"boxes": np.array([[0, 0, 10, 10]], dtype=np.float32), "labels": np.array([1])}]
    preds = [{"boxes": np.array([[0, 0, 10, 10]]), "scores": np.array([0.8]), "labels": np.array([1])}]
    assert detection_metrics(preds, gts, ["a"])["mean_average_precision"] == pytest.approx(1.0)


def test_detection_rejects_labels_outside_one_to_k() -> None:
    gts = [target(boxes(0, 0, 10, 10), [1])]
    with pytest.raises(ValueError, match="labels must be in 1..1"):
        detection_metrics([prediction(boxes(0, 0, 10, 10), [0.9], [0])], gts, ["a"])
    with pytest.raises(ValueError, match="predictions but"):
        detection_metrics([], gts, ["a"])


# ---------------------------------------------------------------- detection: coco


def test_coco_keys_present_and_within_unit_interval() -> None:
    gts = [target(boxes(0, 0, 10, 10, 20, 20, 80, 80, 0, 0, 200, 200), [1, 2, 1])]
    preds = [prediction(boxes(1, 1, 10, 10, 22, 20, 80, 75, 0, 0, 180, 200), [0.9, 0.8, 0.7], [1, 2, 1])]
    metrics = detection_metrics(preds, gts, ["a", "b"], metric_type="coco")
    assert set(COCO_STAT_NAMES) <= set(metrics)
    assert all(0.0 <= metrics[name] <= 1.0 for name in COCO_STAT_NAMES)
    assert metrics["mean_average_precision"] == metrics["coco_map"]
    assert "precision" not in metrics
    both = detection_metrics(preds, gts, ["a", "b"], metric_type="coco_voc")
    voc = detection_metrics(preds, gts, ["a", "b"], metric_type="voc")
    assert both["mean_average_precision"] == voc["mean_average_precision"] != both["coco_map"]
    assert detection_metrics(preds, gts, ["a", "b"], metric_type="none") == {}


def test_coco_stats_agree_with_torchmetrics_pycocotools_backend() -> None:
    from torchmetrics.detection import MeanAveragePrecision

    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(6):
        corner = rng.uniform(0, 200, (4, 2))
        gt_boxes = np.concatenate([corner, corner + rng.uniform(5, 120, (4, 2))], axis=1)
        det_boxes = np.concatenate([gt_boxes + rng.normal(0, 4, gt_boxes.shape), gt_boxes[:2] + 30])
        gts.append(target(torch.tensor(gt_boxes, dtype=torch.float32), rng.integers(1, 3, 4).tolist(), [0, 0, 0, 1]))
        preds.append(prediction(torch.tensor(det_boxes, dtype=torch.float32), rng.uniform(0, 1, 6).tolist(),
                                rng.integers(1, 3, 6).tolist()))
    ours = detection_metrics(preds, gts, ["a", "b"], metric_type="coco")
    reference = MeanAveragePrecision(backend="pycocotools")
    reference.update(preds, gts)
    theirs = reference.compute()
    for name in ("map", "map_50", "map_75", "map_small", "map_medium", "mar_1", "mar_10", "mar_100"):
        assert ours[f"coco_{name}"] == pytest.approx(max(float(theirs[name]), 0.0), abs=1e-6), name


# ---------------------------------------------------------------- instance segmentation


def test_segm_uses_masks_not_boxes() -> None:
    box = boxes(8, 8, 40, 40)
    half = torch.zeros(1, 64, 64, dtype=torch.bool)
    half[0, 8:24, 8:40] = True  # half of the box: mask IoU 0.5
    gts = [{**target(box, [1]), "masks": square_masks(box)}, {**empty_target(), "masks": torch.zeros(0, 64, 64)}]
    preds = [{**prediction(box, [0.9], [1]), "masks": half}, {**prediction(torch.zeros(0, 4), [], []),
                                                           "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}]
    bbox = detection_metrics(preds, gts, ["a"])
    segm = detection_metrics(preds, gts, ["a"], iou_type="segm", iou_threshold=0.6)
    assert bbox["mean_average_precision"] == pytest.approx(1.0)
    assert segm["mean_average_precision"] == 0.0
    loose = detection_metrics(preds, gts, ["a"], iou_type="segm", iou_threshold=0.5)
    assert loose["mean_average_precision"] == pytest.approx(1.0)


def test_segm_accepts_float_masks_with_channel_dim_and_counts_background_false_positives() -> None:
    box = boxes(8, 8, 40, 40)
    soft = square_masks(box).float()[:, None] * 0.9
    gts = [{**target(box, [1]), "masks": square_masks(box)}, {**empty_target(), "masks": torch.zeros(0, 64, 64)}]
    preds = [{**prediction(box, [0.5], [1]), "masks": soft}, {**prediction(box, [0.9], [1]), "masks": soft}]
    metrics = detection_metrics(preds, gts, ["a"], iou_type="segm", metric_type="coco_voc")
    assert metrics["mean_average_precision"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["precision"] == 0.5
    assert all(0.0 <= metrics[name] <= 1.0 for name in COCO_STAT_NAMES)


def test_segm_without_masks_raises_clear_error() -> None:
    gts = [target(boxes(0, 0, 10, 10), [1])]
    preds = [prediction(boxes(0, 0, 10, 10), [0.9], [1])]
    with pytest.raises(ValueError, match="needs 'masks'"):
        detection_metrics(preds, gts, ["a"], iou_type="segm")
