"""Tiled small-object inference: geometry mapped back exactly, merge semantics, tiling finding what
whole-image inference misses, and per-request parameter overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from models.tasks import detection
from models.errors import SettingsError
from models.tasks.registry import get_task, inference_settings
from models.tasks.tile_merge import merge_detections
from serving.predictor import Predictor


def _settings(**raw):
    return inference_settings(get_task("image_object_detection"), raw)


class BrightestBlobDetector(nn.Module):
    """A stand-in detector with a known answer: one box around the white pixels of each input,
    in that input's own pixel coordinates (so any error in mapping tiles back shows exactly)."""

    def forward(self, images):
        outputs = []
        for image in images:
            ys, xs = torch.nonzero(image.min(dim=0).values > 0.99, as_tuple=True)
            if len(xs) == 0:
                outputs.append({"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)})
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            outputs.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return outputs


def test_tile_boxes_are_mapped_back_to_exact_image_coordinates():
    image = torch.zeros(3, 120, 160)
    image[:, 70:80, 100:115] = 1.0  # wholly inside the bottom-right tile and the whole image
    settings = _settings(tile_grid_size="2x2", tile_overlap_ratio=0.25, tile_predictions_nms_thresh=0.25)
    [out] = detection.predict(BrightestBlobDetector(), [image], settings)
    # the tile's box and the whole image's box are the same object, so NMS leaves exactly one
    assert out["boxes"].tolist() == [[100.0, 70.0, 115.0, 80.0]]


def test_merge_removes_same_label_duplicates_from_different_tiles():
    boxes = torch.tensor([[10, 10, 50, 50], [12, 12, 50, 50.]])
    out = merge_detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), torch.tensor([0, 1]), 0.25)
    assert out["boxes"].tolist() == [[10, 10, 50, 50]] and out["scores"].tolist() == pytest.approx([0.9])


def test_merge_keeps_same_tile_boxes_and_other_labels():
    boxes = torch.tensor([[10, 10, 50, 50], [12, 12, 50, 50], [11, 11, 50, 50.]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 2])
    same_tile = merge_detections(boxes, scores, labels, torch.tensor([3, 3, 4]), 0.25)
    assert len(same_tile["boxes"]) == 3  # one tile's overlapping boxes stay; the label-2 box stays too
    assert same_tile["labels"].tolist() == [1, 1, 2]


def test_merge_threshold_is_strict_iou():
    boxes = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10.]])  # IoU = 50 / 150 = 1/3
    keep_both = merge_detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), torch.tensor([0, 1]), 0.34)
    drop_one = merge_detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), torch.tensor([0, 1]), 0.33)
    assert (len(keep_both["boxes"]), len(drop_one["boxes"])) == (2, 1)


def test_greedy_nmm_joins_a_border_cut_partial_box_into_the_whole_object():
    whole = [100, 100, 160, 140]
    partial = [100, 100, 130, 140]  # the part of the object left of a tile border: IoU 0.5, IoS 1.0
    boxes, scores = torch.tensor([partial, whole], dtype=torch.float32), torch.tensor([0.95, 0.7])
    labels, sources = torch.tensor([1, 1]), torch.tensor([0, 6])
    nms = merge_detections(boxes, scores, labels, sources, 0.6, "nms")
    nmm = merge_detections(boxes, scores, labels, sources, 0.6, "greedy_nmm")
    assert len(nms["boxes"]) == 2  # IoU-NMS keeps the partial box next to the whole one
    assert nmm["boxes"].tolist() == [whole] and nmm["scores"].tolist() == pytest.approx([0.95])


def test_merged_detections_are_capped_at_box_detections_per_img():
    class ManyBoxes(nn.Module):
        def forward(self, images):
            n = 30
            boxes = torch.stack([torch.tensor([i * 2.0, 0, i * 2.0 + 1, 1]) for i in range(n)])
            return [{"boxes": boxes, "scores": torch.linspace(1, 0.5, n), "labels": torch.arange(n) % 3 + 1}
                    for _ in images]

    [out] = detection.predict(ManyBoxes(), [torch.zeros(3, 80, 80)], _settings(tile_grid_size="2x1",
                                                                                  box_detections_per_img=20))
    assert len(out["boxes"]) == 20 and torch.all(out["scores"][:-1] >= out["scores"][1:])


@pytest.mark.parametrize("model_name", ["fasterrcnn_resnet18_fpn", "retinanet_resnet50_fpn"])
def test_tiling_runs_on_every_detection_architecture(model_name):
    from models.tasks.architectures import build_model, get_architecture

    settings = _settings(tile_grid_size="3x2", min_size=64, max_size=96, box_score_thresh=0.0)
    model = build_model(get_architecture(model_name, "detection"), 3, settings).eval()
    with torch.inference_mode():
        [out] = detection.predict(model, [torch.rand(3, 90, 120)], settings)
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) <= settings.box_detections_per_img
    assert out["boxes"][:, 2].max() <= 120 and out["boxes"][:, 3].max() <= 90
    assert set(out["labels"].tolist()) <= {1, 2, 3}


def _mosaic(data, columns: int, rows: int) -> tuple[Image.Image, list[dict]]:
    """Training images of the memorised detector laid side by side; their boxes in mosaic fractions."""
    lines = [json.loads(line) for line in Path(data.train_jsonl).read_text().splitlines()][:columns * rows]
    first = Image.open(Path(data.train_jsonl).parent / lines[0]["image_url"])
    w, h = first.size
    mosaic = Image.new("RGB", (w * columns, h * rows))
    truths = []
    for k, line in enumerate(lines):
        col, row = k % columns, k // columns
        mosaic.paste(Image.open(Path(data.train_jsonl).parent / line["image_url"]).convert("RGB"), (col * w, row * h))
        for obj in line["label"]:
            truths.append({"label": obj["label"], "box": [(col + obj["topX"]) / columns, (row + obj["topY"]) / rows,
                                                          (col + obj["bottomX"]) / columns, (row + obj["bottomY"]) / rows]})
    return mosaic, truths


def _recall(response: dict, truths: list[dict]) -> float:
    def iou(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    found = 0
    for t in truths:
        boxes = [[p["box"][k] for k in ("topX", "topY", "bottomX", "bottomY")] for p in response["boxes"]
                 if p["label"] == t["label"]]
        found += any(iou(t["box"], b) >= 0.5 for b in boxes)
    return found / len(truths)


@pytest.mark.slow
def test_tiling_finds_small_objects_whole_image_inference_misses(trained):
    """A 4x2 mosaic of the detector's images: scored whole, every object is half the size it was
    trained at; scored as 4x2 tiles (no overlap), each tile is one training image at its own scale."""
    result, data = trained("image_object_detection")
    predictor = Predictor.load(result.model_dir)
    mosaic, truths = _mosaic(data, 4, 2)
    sizes = {"min_size": 96, "max_size": 2000}
    [whole] = predictor.predict_images([mosaic], sizes)
    [tiled] = predictor.predict_images([mosaic], {**sizes, "tile_grid_size": "4x2", "tile_overlap_ratio": 0.0})
    assert _recall(tiled, truths) >= 0.9
    assert _recall(tiled, truths) >= _recall(whole, truths) + 0.3


@pytest.mark.slow
def test_per_request_parameters_override_settings_json_for_that_request_only(trained):
    result, data = trained("image_object_detection")
    predictor = Predictor.load(result.model_dir)
    image = Image.open(sorted(Path(data.images_dir).iterdir())[0]).convert("RGB")
    [default] = predictor.predict_images([image])
    [strict] = predictor.predict_images([image], {"box_score_thresh": 0.99})
    [loose] = predictor.predict_images([image], {"box_score_thresh": 0.01, "box_detections_per_img": 3})
    [uncapped] = predictor.predict_images([image], {"box_score_thresh": 0.01})
    [again] = predictor.predict_images([image])
    # the threshold drops boxes before NMS, which suppresses a box only for a higher-scoring one: a stricter
    # threshold answers exactly the boxes of a looser one that score above it, in the same order
    assert all(b["score"] >= 0.99 for b in strict["boxes"])
    assert strict["boxes"] == [b for b in default["boxes"] if b["score"] > 0.99]
    assert default["boxes"] == [b for b in uncapped["boxes"] if b["score"] > 0.3]  # settings.json's threshold
    scores = [b["score"] for b in uncapped["boxes"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    middle = (scores[0] + scores[-1]) / 2  # a threshold that must drop some boxes and keep others
    [cut] = predictor.predict_images([image], {"box_score_thresh": middle})
    assert cut["boxes"] == [b for b in uncapped["boxes"] if b["score"] > middle]
    assert 0 < len(cut["boxes"]) < len(uncapped["boxes"])
    assert len(loose["boxes"]) == 3 and loose["boxes"] == uncapped["boxes"][:3]
    assert again == default


def test_bad_request_parameters_are_named(trained):
    result, _ = trained("image_classification")
    predictor = Predictor.load(result.model_dir)
    with pytest.raises(SettingsError) as info:
        predictor.settings_for({"box_score_thresh": 0.5, "valid_crop_size": 0, "half_precision": True})
    text = "\n".join(info.value.problems)
    assert "half_precision: set when the model loads" in text
    with pytest.raises(SettingsError) as info:
        predictor.settings_for({"box_score_thresh": 0.5, "valid_crop_size": 0})
    text = "\n".join(info.value.problems)
    assert "box_score_thresh: unknown parameter" in text and "valid_crop_size=0 is out of range" in text


def test_tiles_of_several_images_are_pooled_into_shared_passes():
    """Two images of one size and one of another: the tiles of the two go through together, their whole images
    together, and every box is still mapped back into its own image."""
    calls: list[list[tuple[int, ...]]] = []

    class Recording(BrightestBlobDetector):
        def forward(self, images):
            calls.append([tuple(image.shape) for image in images])
            return super().forward(images)

    first, second, other = torch.zeros(3, 120, 160), torch.zeros(3, 120, 160), torch.zeros(3, 90, 200)
    first[:, 70:80, 100:115] = second[:, 10:20, 20:30] = other[:, 40:50, 150:170] = 1.0
    settings = _settings(tile_grid_size="2x2", batch_size=16, min_size=100, max_size=400)  # 16 inputs per pass
    outs = detection.predict(Recording(), [first, second, other], settings)
    assert [o["boxes"].tolist() for o in outs] == [[[100.0, 70.0, 115.0, 80.0]], [[20.0, 10.0, 30.0, 20.0]],
                                                   [[150.0, 40.0, 170.0, 50.0]]]
    assert sorted(len(shapes) for shapes in calls) == [1, 2, 4, 8]  # other, first + second; other's tiles, theirs
    assert next(shapes for shapes in calls if len(shapes) == 1) == [(3, 90, 200)]


@pytest.mark.slow
def test_pooled_tiles_answer_as_one_image_at_a_time(trained):
    """The tiny trained detector, tiled 3x2: four images scored in one call (their tiles pooled) get the answers
    each gets alone, up to the float rounding of batched convolutions."""
    result, data = trained("image_object_detection")
    predictor = Predictor.load(result.model_dir, backend="torch")
    images = [Image.open(path).convert("RGB") for path in sorted(Path(data.images_dir).iterdir())[:3]]
    images.append(images[0].resize((images[0].width * 2, images[0].height)))  # another size, another share
    params = {"tile_grid_size": "3x2", "min_size": 96, "max_size": 400}
    together = predictor.predict_images(images, params)
    alone = [predictor.predict_images([image], params)[0] for image in images]
    assert sum(len(answer["boxes"]) for answer in alone) >= 4
    for pooled, single in zip(together, alone):
        assert [b["label"] for b in pooled["boxes"]] == [b["label"] for b in single["boxes"]]
        for a, b in zip(pooled["boxes"], single["boxes"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert [a["box"][k] for k in sorted(a["box"])] == pytest.approx([b["box"][k] for k in sorted(b["box"])],
                                                                            abs=1e-4)
