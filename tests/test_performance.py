"""Tests for models.tasks.performance: modelPerformance of classifiers and detectors, on hand-built sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.data.records import Box, Record
from models.tasks.performance import (
    classifier_performance, detector_performance, expected_calibration_error, model_performance,
)

TAGS = ["cat", "dog", "bird"]


def record(i: int, label: str | tuple[Box, ...]) -> Record:
    """Ground truth of image i, read from line i + 1 of test.jsonl."""
    return Record(image=f"img{i}.jpg", label=label, source="test.jsonl", line=i + 1)


def records(labels: list) -> list[Record]:
    """One record per label, in order."""
    return [record(i, label) for i, label in enumerate(labels)]


def scores(probs: dict[str, float]) -> dict:
    """A classification response (classification.format_output's shape) from label → probability."""
    return {"probs": list(probs.values()), "labels": list(probs)}


def obj(label: str, x0: float, y0: float, x1: float, y1: float, score: float) -> dict:
    """One detected object in detection.format_output's shape (relative corners)."""
    return {"box": {"topX": x0, "topY": y0, "bottomX": x1, "bottomY": y1}, "label": label, "score": score}


def found(*objects: dict) -> dict:
    """A detection response holding these objects."""
    return {"boxes": list(objects)}


def all_floats(value: object) -> list[float]:
    """Every number in a nested performance dict."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in all_floats(v)]
    return [value]


def assert_plain_unit_floats(performance: dict) -> None:
    """Every value is a plain Python float in [0, 1] (no NaN, no numpy scalar)."""
    for value in all_floats(performance):
        assert type(value) is float and math.isfinite(value) and 0.0 <= value <= 1.0, value


# ---------------------------------------------------------------- classifiers


def test_perfect_classifier_scores_one_everywhere_and_its_ece_is_one_minus_its_confidence():
    truth = ["cat", "dog", "bird", "cat"]
    responses = [scores({t: 0.9 if t == label else 0.05 for t in TAGS}) for label in truth]
    performance = classifier_performance(records(truth), responses, TAGS)
    assert performance["accuracyTop1"] == performance["accuracyTop5"] == performance["averagePrecision"] == 1.0
    assert performance["calibrationECE"] == pytest.approx(0.1)
    assert performance["tagPerformance"] == {tag: {"accuracy": 1.0} for tag in TAGS}
    assert_plain_unit_floats(performance)


def test_top5_catches_a_true_class_that_top1_misses():
    tags = [f"t{k}" for k in range(7)]
    ranked = [0.40, 0.20, 0.15, 0.10, 0.08, 0.05, 0.02]  # t0 first, t6 last

    def ranking() -> dict:
        return scores(dict(zip(tags, ranked)))

    truth = ["t0", "t2", "t5"]  # right; third (inside the top 5); sixth (outside)
    performance = classifier_performance(records(truth), [ranking() for _ in truth], tags)
    assert performance["accuracyTop1"] == pytest.approx(1 / 3)
    assert performance["accuracyTop5"] == pytest.approx(2 / 3)


def test_top5_is_one_with_five_classes_or_fewer_even_when_top1_is_always_wrong():
    truth = ["dog", "bird"]
    responses = [scores({"cat": 0.8, "dog": 0.1, "bird": 0.1})] * 2
    performance = classifier_performance(records(truth), responses, TAGS)
    assert performance["accuracyTop1"] == 0.0
    assert performance["accuracyTop5"] == 1.0


def test_ece_sums_each_bins_gap_weighted_by_its_share_of_images():
    # four images at confidence 0.95 (bin (14/15, 1]), three right: |0.75 - 0.95| x 1/2 = 0.1;
    # four at 0.55 (bin (8/15, 9/15]), two right: |0.5 - 0.55| x 1/2 = 0.025
    truth = ["cat", "cat", "cat", "dog", "cat", "cat", "dog", "dog"]
    confident, unsure = {"cat": 0.95, "dog": 0.05}, {"cat": 0.55, "dog": 0.45}
    responses = [scores(confident)] * 4 + [scores(unsure)] * 4
    performance = classifier_performance(records(truth), responses, ["cat", "dog"])
    assert performance["calibrationECE"] == pytest.approx(0.125)
    assert performance["accuracyTop1"] == pytest.approx(5 / 8)


def test_ece_agrees_with_torchmetrics_on_random_probabilities():
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(7)
    logits = rng.normal(size=(400, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = rng.integers(0, 6, size=400)
    ours = expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == targets)
    theirs = multiclass_calibration_error(torch.tensor(probs), torch.tensor(targets), num_classes=6, n_bins=15)
    assert ours == pytest.approx(float(theirs), abs=1e-5)


def test_tag_accuracy_is_the_share_of_each_tags_images_predicted_as_that_tag():
    # unbalanced: four cats (one taken for a dog), one dog; no bird image, so no bird entry
    truth = ["cat", "cat", "cat", "cat", "dog"]
    as_cat, as_dog = {"cat": 0.7, "dog": 0.2, "bird": 0.1}, {"cat": 0.3, "dog": 0.6, "bird": 0.1}
    responses = [scores(as_cat)] * 3 + [scores(as_dog)] * 2
    performance = classifier_performance(records(truth), responses, TAGS)
    assert performance["tagPerformance"] == {"cat": {"accuracy": 0.75}, "dog": {"accuracy": 1.0}}
    assert performance["accuracyTop1"] == pytest.approx(0.8)  # not the mean of the tags' 0.875


def test_average_precision_is_the_mean_over_tags_with_images_of_each_tags_one_vs_rest_ap():
    # cat ranks cat, dog, cat → AP (1 + 2/3) / 2; dog ranks cat, dog, cat with the dog second → AP 1/2;
    # bird has no image and is left out. Pooling every score (micro) would give 11/15 instead.
    truth = ["cat", "cat", "dog"]
    responses = [scores({"cat": 0.9, "dog": 0.1, "bird": 0.0}), scores({"cat": 0.4, "dog": 0.6, "bird": 0.0}),
                 scores({"cat": 0.6, "dog": 0.4, "bird": 0.0})]
    performance = classifier_performance(records(truth), responses, TAGS)
    assert performance["averagePrecision"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)


def test_responses_may_list_the_labels_in_any_order():
    truth = ["cat", "dog", "bird"]
    ordered = [scores({"cat": 0.5, "dog": 0.3, "bird": 0.2}), scores({"cat": 0.2, "dog": 0.7, "bird": 0.1}),
               scores({"cat": 0.6, "dog": 0.1, "bird": 0.3})]
    reordered = [scores(dict(reversed(list(zip(r["labels"], r["probs"]))))) for r in ordered]
    assert classifier_performance(records(truth), reordered, TAGS) == classifier_performance(
        records(truth), ordered, TAGS)


def test_a_response_missing_a_label_or_naming_an_unknown_one_is_refused():
    with pytest.raises(ValueError, match=r"response 0 \(test.jsonl:1\) gives labels \['cat', 'dog'\]"):
        classifier_performance(records(["cat"]), [scores({"cat": 0.6, "dog": 0.4})], TAGS)
    with pytest.raises(ValueError, match="'fish'"):
        classifier_performance(records(["cat"]), [scores({"cat": 0.6, "dog": 0.3, "fish": 0.1})], TAGS)


def test_a_true_class_the_model_does_not_know_is_refused_naming_the_record():
    with pytest.raises(ValueError, match=r"record 0 \(test.jsonl:1\) has label 'fish'"):
        classifier_performance(records(["fish"]), [scores({"cat": 0.5, "dog": 0.3, "bird": 0.2})], TAGS)


# ---------------------------------------------------------------- detectors


ONE = pytest.approx(1.0)  # pycocotools divides by tp + fp + machine epsilon


def box(label: str, x0: float, y0: float, x1: float, y1: float, crowd: bool = False) -> Box:
    """A ground-truth box (relative corners)."""
    return Box(label, x0, y0, x1, y1, is_crowd=crowd)


def test_perfect_detector_scores_one_at_every_iou():
    truth = records([(box("cat", 0.1, 0.1, 0.4, 0.5), box("dog", 0.5, 0.5, 0.9, 0.8)), (box("cat", 0.2, 0.2, 0.6, 0.6),)])
    responses = [found(obj("cat", 0.1, 0.1, 0.4, 0.5, 0.9), obj("dog", 0.5, 0.5, 0.9, 0.8, 0.8)),
                 found(obj("cat", 0.2, 0.2, 0.6, 0.6, 0.7))]
    performance = detector_performance(truth, responses, TAGS)
    assert performance == {
        "meanAveragePrecision30": ONE, "meanAveragePrecision50": ONE, "meanAveragePrecision75": ONE,
        "tagPerformance": {"cat": {"averagePrecision50": ONE}, "dog": {"averagePrecision50": ONE}},
    }
    assert_plain_unit_floats(performance)


def test_a_box_at_iou_0_6_counts_at_0_30_and_0_50_but_not_at_0_75():
    # ground truth 0.4 x 0.5, the detection shifted right by 0.1: overlap 0.15, union 0.25, IoU 0.6
    truth = records([(box("cat", 0.0, 0.0, 0.4, 0.5),)])
    performance = detector_performance(truth, [found(obj("cat", 0.1, 0.0, 0.5, 0.5, 0.9))], TAGS)
    assert performance["meanAveragePrecision30"] == ONE
    assert performance["meanAveragePrecision50"] == ONE
    assert performance["meanAveragePrecision75"] == 0.0


def test_a_false_positive_scoring_above_the_true_one_halves_ap():
    truth = records([(box("cat", 0.1, 0.1, 0.3, 0.3),)])
    right, wrong = obj("cat", 0.1, 0.1, 0.3, 0.3, 0.8), obj("cat", 0.6, 0.6, 0.9, 0.9, 0.9)
    performance = detector_performance(truth, [found(wrong, right)], TAGS)
    assert performance["meanAveragePrecision50"] == pytest.approx(0.5)  # precision 1/2 at every recall
    below = dict(wrong, score=0.7)
    assert detector_performance(truth, [found(below, right)], TAGS)["meanAveragePrecision50"] == ONE


def test_tag_ap50_is_given_per_tag_with_ground_truth_and_the_mean_leaves_out_tags_without():
    truth = records([(box("cat", 0.1, 0.1, 0.3, 0.3), box("dog", 0.5, 0.5, 0.8, 0.8))])
    responses = [found(obj("cat", 0.1, 0.1, 0.3, 0.3, 0.9), obj("dog", 0.0, 0.6, 0.2, 0.9, 0.8),
                       obj("dog", 0.5, 0.5, 0.8, 0.8, 0.7), obj("bird", 0.4, 0.0, 0.6, 0.2, 0.9))]
    performance = detector_performance(truth, responses, TAGS)
    assert performance["tagPerformance"] == {"cat": {"averagePrecision50": ONE},
                                             "dog": {"averagePrecision50": pytest.approx(0.5)}}
    assert performance["meanAveragePrecision50"] == pytest.approx(0.75)


def test_detections_on_an_image_without_boxes_are_false_positives():
    truth = records([(box("cat", 0.1, 0.1, 0.3, 0.3),), ()])
    responses = [found(obj("cat", 0.1, 0.1, 0.3, 0.3, 0.8)), found(obj("cat", 0.5, 0.5, 0.7, 0.7, 0.9))]
    assert detector_performance(truth, responses, TAGS)["meanAveragePrecision50"] == pytest.approx(0.5)
    assert detector_performance(truth, [responses[0], found()], TAGS)["meanAveragePrecision50"] == ONE


def test_a_detection_on_a_crowd_box_is_neither_right_nor_wrong():
    truth = records([(box("cat", 0.1, 0.1, 0.3, 0.3), box("cat", 0.5, 0.5, 0.9, 0.9, crowd=True))])
    responses = [found(obj("cat", 0.5, 0.5, 0.9, 0.9, 0.9), obj("cat", 0.1, 0.1, 0.3, 0.3, 0.8))]
    assert detector_performance(truth, responses, TAGS)["meanAveragePrecision50"] == ONE


def test_a_set_without_any_box_scores_zero_and_has_no_tags():
    performance = detector_performance(records([()]), [found(obj("cat", 0.1, 0.1, 0.3, 0.3, 0.9))], TAGS)
    assert performance == {"meanAveragePrecision30": 0.0, "meanAveragePrecision50": 0.0,
                           "meanAveragePrecision75": 0.0, "tagPerformance": {}}


def test_a_detection_naming_an_unknown_label_is_refused_naming_the_box():
    with pytest.raises(ValueError, match=r"response 0 \(test.jsonl:1\) boxes\[0\] has label 'fish'"):
        detector_performance(records([()]), [found(obj("fish", 0.1, 0.1, 0.3, 0.3, 0.9))], TAGS)


def test_a_detection_without_its_corners_is_refused():
    with pytest.raises(ValueError, match=r"boxes\[0\] needs 'box'"):
        detector_performance(records([()]), [found({"box": {"topX": 0.1}, "label": "cat", "score": 0.9})], TAGS)


# ---------------------------------------------------------------- both


CASES = [
    ("image_classification", record(0, "cat"), scores({"cat": 0.5, "dog": 0.3, "bird": 0.2})),
    ("image_object_detection", record(0, (box("cat", 0.1, 0.1, 0.3, 0.3),)), found(obj("cat", 0.1, 0.1, 0.3, 0.3, 0.9))),
]


@pytest.mark.parametrize(("task", "truth", "response"), CASES)
def test_model_performance_dispatches_on_the_task(task, truth, response):
    direct = classifier_performance if task == "image_classification" else detector_performance
    assert model_performance(task, [truth], [response], TAGS) == direct([truth], [response], TAGS)


@pytest.mark.parametrize(("task", "truth", "response"), CASES)
def test_records_and_responses_of_different_lengths_are_refused(task, truth, response):
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        model_performance(task, [truth, truth], [response], TAGS)


@pytest.mark.parametrize(("task", "truth", "response"), CASES)
def test_an_error_row_is_refused_naming_the_row(task, truth, response):
    error_row = {"error": {"code": "InvalidImage", "message": "cannot decode"}}
    with pytest.raises(ValueError, match=r"response 1 \(test.jsonl:1\) is an error row: .*InvalidImage"):
        model_performance(task, [truth, truth], [response, error_row], TAGS)


@pytest.mark.parametrize(("task", "truth", "response"), CASES)
def test_an_empty_set_is_refused(task, truth, response):
    with pytest.raises(ValueError, match="no images"):
        model_performance(task, [], [], TAGS)


def test_a_task_without_model_performance_is_refused():
    with pytest.raises(ValueError, match="image_classification_multilabel.*expected one of image_classification"):
        model_performance("image_classification_multilabel", [], [], TAGS)
