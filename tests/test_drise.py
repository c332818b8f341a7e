"""D-RISE explanations of detectors and instance segmentation (explain.detections, explain.drise): maps that point
at the explained object on synthetic scenes whose objects are known, a supplied box (a miss), the parameters'
bounds, the time budget and the cooperative stop."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from explain import Stopped, UnknownLabel, detector_copy, explain_detections, explaining_settings, parse_xai
from explain.drise import Sampling, random_masks, saliency, similarity
from models.errors import SettingsError
from serving.scorers import TorchScorer

DETECTORS = ("image_object_detection", "image_instance_segmentation")
FAST = {"number_of_masks": 160, "mask_resolution": 8, "internal_batch_size": 16, "time_budget_s": 600}


def _random_detector(task: str = "image_object_detection") -> tuple[TorchScorer, object]:
    """An untrained detector's scorer over a private copy (what serving explains through), and its settings."""
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.registry import get_task, inference_settings

    spec = get_task(task)
    settings = inference_settings(spec, {"min_size": 64, "max_size": 96})
    name = "fasterrcnn_resnet18_fpn" if spec.family == "detection" else "maskrcnn_resnet18_fpn"
    torch.manual_seed(0)
    model = build_model(get_architecture(name, spec.family), 3, settings).eval()
    return TorchScorer(detector_copy(model), spec.ops), settings


def _scene(trained, task: str, count: int):
    """The trained tiny model's scorer over a private copy, its settings and labels, and `count` of its synthetic
    images (float [3, H, W]) with their boxes."""
    from PIL import Image

    from serving.loading import ModelFolder, load_model

    result, data = trained(task)
    folder = ModelFolder.open(result.model_dir)
    loaded = load_model(folder, folder.plan("torch", "cpu"))
    private = detector_copy(loaded.model)
    # 100 region proposals instead of torchvision's 1000: the tiny scenes hold a few objects, and the box head's
    # cost grows with the proposals (measured: a batch of 16 masked 96x128 images 3.96 s with 1000, 0.98 s with 100)
    private.rpn._post_nms_top_n = {**private.rpn._post_nms_top_n, "testing": 100}
    detector = loaded.scorer.on(private)
    lines = [json.loads(line) for line in Path(data.train_jsonl).read_text().splitlines()][:count]
    scenes = []
    for line in lines:
        picture = Image.open(Path(data.train_jsonl).parent / line["image_url"]).convert("RGB")
        image = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255
        scenes.append((image, line["label"]))
    return detector, folder.model_settings.settings, folder.model_settings.labels, scenes


def _inside(box: dict, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[int(box["topY"] * height):int(np.ceil(box["bottomY"] * height)),
         int(box["topX"] * width):int(np.ceil(box["bottomX"] * width))] = True
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("task", DETECTORS)
def test_d_rise_saliency_points_inside_the_explained_detection(trained, task):
    """Pointing game on the detector's own detections: the map's maximum falls inside the explained box far more
    often than a random point would (chance = the box's share of the image), and the mean saliency inside the
    box is above the mean outside."""
    detector, settings, labels, scenes = _scene(trained, task, 3)
    xai = parse_xai({**FAST, "max_explained_detections": 1, "attributions": True}, task)
    hits, chance, contrast = [], [], []
    for image, _ in scenes:
        prediction = detector.predict([image], settings)[0]
        keep = prediction["scores"] >= 0.5
        prediction = {k: v[keep] for k, v in prediction.items()}
        assert len(prediction["boxes"]), "the tiny detector finds its training objects"
        out = explain_detections(detector, image, prediction, labels, xai, settings)
        explained, saliency_map = out["explained_boxes"][0], torch.tensor(out["attributions"][0])
        assert explained["detection"] == 0 and saliency_map.shape == image.shape[1:]
        inside = _inside(explained["box"], *image.shape[1:])
        peak = int(saliency_map.argmax())
        hits.append(bool(inside.flatten()[peak]))
        chance.append(float(inside.float().mean()))
        contrast.append(float(saliency_map[inside].mean() - saliency_map[~inside].mean()))
    assert sum(hits) >= 2 and np.mean(chance) < 0.4, (hits, chance)
    assert np.mean(contrast) > 0, contrast


@pytest.mark.slow
def test_d_rise_explains_a_box_the_request_supplies(trained):
    """A target box over a known object (the label it has) gets a map that favours that object; a box over
    empty background, where the model finds nothing, is answered too, with a similarity of about 0."""
    detector, settings, labels, scenes = _scene(trained, "image_object_detection", 1)
    image, objects = scenes[0]
    obj = objects[0]
    box = {k: obj[k] for k in ("topX", "topY", "bottomX", "bottomY")}
    no_detections = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    xai = parse_xai({**FAST, "max_explained_detections": 0, "attributions": True,
                     "target_box": {"label": obj["label"], **box}}, "image_object_detection")
    out = explain_detections(detector, image, no_detections, labels, xai, settings)
    (explained,) = out["explained_boxes"]
    assert explained["detection"] is None and explained["score"] is None and explained["label"] == obj["label"]
    assert explained["similarity"] > 0.3
    saliency_map = torch.tensor(out["attributions"][0])
    inside = _inside(box, *image.shape[1:])
    assert saliency_map[inside].mean() > saliency_map[~inside].mean()

    empty = {"label": obj["label"], "topX": 0.0, "topY": 0.0, "bottomX": 0.08, "bottomY": 0.08}
    occupied = [_inside(o, *image.shape[1:]) for o in objects]
    assert not any(m[: int(0.08 * image.shape[1]) + 1, : int(0.08 * image.shape[2]) + 1].any() for m in occupied)
    out = explain_detections(detector, image, no_detections, labels,
                             xai.model_copy(update={"target_box": xai.target_box.model_copy(update=empty),
                                                    "number_of_masks": 16}), settings)
    assert out["explained_boxes"][0]["similarity"] < 0.05


def test_d_rise_answers_in_the_documented_shape():
    """explained_boxes, one PNG and one [height, width] map per explained item, supplied box first, masks_used."""
    from PIL import Image

    detector, settings = _random_detector("image_instance_segmentation")
    image = torch.rand(3, 48, 64)
    prediction = {"boxes": torch.tensor([[4.0, 4, 30, 20], [30, 20, 60, 44]]), "labels": torch.tensor([1, 3]),
                  "scores": torch.tensor([0.4, 0.9])}
    xai = parse_xai({"number_of_masks": 8, "attributions": True, "max_explained_detections": 1, "time_budget_s": 600,
                     "target_box": {"label": "b", "topX": 0.1, "topY": 0.1, "bottomX": 0.5, "bottomY": 0.6}},
                    "image_instance_segmentation")
    out = explain_detections(detector, image, prediction, ["a", "b", "c"], xai, settings)
    assert out["masks_used"] == 8
    supplied, detection = out["explained_boxes"]
    assert supplied["detection"] is None and supplied["label"] == "b"
    assert supplied["box"] == {"topX": 0.1, "topY": 0.1, "bottomX": 0.5, "bottomY": 0.6}
    assert detection["detection"] == 1 and detection["label"] == "c" and detection["score"] == pytest.approx(0.9)
    assert detection["box"] == {"topX": 30 / 64, "topY": 20 / 48, "bottomX": 60 / 64, "bottomY": 44 / 48}
    assert len(out["visualizations"]) == len(out["attributions"]) == 2
    assert np.asarray(out["attributions"][1]).shape == (48, 64)
    png = Image.open(__import__("io").BytesIO(base64.b64decode(out["visualizations"][0])))
    assert png.format == "PNG"
    no_pictures = explain_detections(detector, image, prediction, ["a", "b", "c"],
                                     xai.model_copy(update={"visualizations": False, "attributions": False}),
                                     settings)
    assert "visualizations" not in no_pictures and "attributions" not in no_pictures


@pytest.mark.parametrize("raw, named", [
    ({"number_of_masks": 7}, "xai_parameters.number_of_masks=7 is out of range"),
    ({"number_of_masks": 20001}, "xai_parameters.number_of_masks=20001"),
    ({"mask_resolution": 1}, "xai_parameters.mask_resolution=1"),
    ({"mask_keep_probability": 0.99}, "xai_parameters.mask_keep_probability=0.99"),
    ({"time_budget_s": 0}, "xai_parameters.time_budget_s=0"),
    ({"internal_batch_size": 65}, "xai_parameters.internal_batch_size=65"),
    ({"max_explained_detections": 11}, "xai_parameters.max_explained_detections=11"),
    ({"detection_score_threshold": -0.1}, "xai_parameters.detection_score_threshold=-0.1"),
    ({"xai_algorithm": "xrai"}, "xai_parameters.xai_algorithm=xrai"),
    ({"n_steps": 50}, "xai_parameters.n_steps: unknown parameter"),
    ({"target_box": {"label": "a", "topX": 0.6, "bottomX": 0.2}}, "xai_parameters.target_box="),
    ({"target_box": {"topX": 0.1}}, "label is required"),
    ({"target_box": {"label": "a", "topY": 1.5}}, "target_box="),
    ({"max_explained_detections": 0}, "xai_parameters.max_explained_detections=0 and no target_box"),
])
def test_d_rise_parameters_out_of_bounds_are_refused_naming_the_parameter(raw, named):
    with pytest.raises(SettingsError) as caught:
        parse_xai(raw, "image_object_detection")
    assert any(named in problem for problem in caught.value.problems), caught.value.problems


def test_d_rise_is_for_detectors_and_names_the_models_labels():
    with pytest.raises(SettingsError, match="xai_parameters.xai_algorithm=d_rise"):
        parse_xai({"xai_algorithm": "d_rise"}, "image_classification")
    assert parse_xai(None, "image_instance_segmentation").xai_algorithm == "d_rise"
    assert parse_xai(None, "image_classification_multilabel").xai_algorithm == "xrai"
    detector, settings = _random_detector()
    xai = parse_xai({"number_of_masks": 8, "target_box": {"label": "pallet"}}, "image_object_detection")
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    with pytest.raises(UnknownLabel, match=r"target_box.label='pallet' is not a label of this model \(its labels: a, b\)"):
        explain_detections(detector, torch.rand(3, 32, 32), empty, ["a", "b"], xai, settings)


def test_d_rise_keeps_its_time_budget_and_uses_the_masks_done():
    detector, settings = _random_detector()
    settings = explaining_settings(settings)
    image, box, label = torch.rand(3, 48, 64), torch.tensor([[8.0, 8, 40, 40]]), torch.tensor([1])
    detector.predict([image], settings)  # warm: the first pass of a model allocates
    started = time.perf_counter()
    detector.predict([image], settings)
    one_pass = time.perf_counter() - started  # on a shared machine this is what the budget's slack scales with
    budget = max(1.5, 4 * one_pass)
    started = time.perf_counter()
    result = saliency(detector, image, box, label, settings, Sampling(masks=20000, batch=4, budget_s=budget))
    elapsed = time.perf_counter() - started
    assert result.out_of_time and 1 <= result.masks < 20000
    # a batch starts only when it is expected to end within the budget: past it by at most about one pass
    assert elapsed < budget + 2 * one_pass + 0.5, (elapsed, budget, one_pass)
    assert result.maps.shape == (1, 48, 64) and torch.isfinite(result.maps).all()


def test_d_rise_stops_between_mask_batches_when_asked():
    detector, settings = _random_detector()
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Stopped):
        saliency(detector, torch.rand(3, 32, 32), torch.tensor([[0.0, 0, 16, 16]]), torch.tensor([1]), settings,
                 Sampling(masks=1000, batch=2, budget_s=600), stop)
    assert len(asked) == 3  # two batches ran, the third was never started


def test_rise_masks_keep_cells_with_the_asked_probability_at_random_shifts():
    generator = torch.Generator().manual_seed(0)
    masks = random_masks(400, 30, 50, resolution=5, keep=0.25, generator=generator)
    assert masks.shape == (400, 30, 50) and masks.min() >= 0 and masks.max() <= 1
    assert abs(float(masks.mean()) - 0.25) < 0.03
    assert len({tuple((m > 0.5).flatten()[:50].tolist()) for m in masks[:50]}) > 40  # shifted, not one grid


def test_similarity_is_iou_times_same_label_times_score():
    target_boxes, target_labels = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([1, 2])
    found = [{"boxes": torch.tensor([[0.0, 0, 10, 5], [20, 20, 30, 30]]), "labels": torch.tensor([1, 1]),
              "scores": torch.tensor([0.8, 0.9])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}]
    weights = similarity(target_boxes, target_labels, found)
    assert weights[0].tolist() == pytest.approx([0.5 * 0.8, 0.0])  # the second target's label is not found
    assert weights[1].tolist() == [0.0, 0.0]


def test_d_rise_scores_a_private_copy_at_the_requests_sizes_with_scores_down_to_its_floor():
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.registry import get_task, inference_settings

    task = get_task("image_instance_segmentation")
    original = build_model(get_architecture("maskrcnn_resnet18_fpn", "segmentation"), 3,
                           inference_settings(task, {})).eval()
    private = detector_copy(original)
    assert original.roi_heads.has_mask() and not private.roi_heads.has_mask()
    assert all(not p.requires_grad for p in private.parameters())
    assert private.backbone.body.conv1.weight.data_ptr() != original.backbone.body.conv1.weight.data_ptr()
    request = inference_settings(task, {"min_size": 80, "max_size": 100, "box_score_thresh": 0.9})
    explaining = explaining_settings(request)
    assert (explaining.box_score_thresh, explaining.min_size, explaining.max_size) == (0.01, 80, 100)
    assert request.box_score_thresh == 0.9  # the request's own settings are not changed
    found = TorchScorer(private, task.ops).predict(list(torch.rand(2, 3, 40, 50)), explaining)
    assert len(found) == 2 and set(found[0]) == {"boxes", "labels", "scores"}
