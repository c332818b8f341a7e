"""Each task end to end: synthetic data → training → MLflow model folder → a fresh process loads it
with mlflow.pyfunc.load_model → responses in scoring.md's schema with the right answers."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_SIZE, TASKS, run_pyfunc_in_new_process
from models.tasks.polygons import polygons_to_mask

pytestmark = pytest.mark.slow


def _lines(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def _b64(path: Path) -> str:
    return base64.encodebytes(path.read_bytes()).decode("utf-8")  # with newlines, as the cloud's clients send


def _png(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_ROWS = ["this is not base64 !!", base64.b64encode(b"plain text, not an image").decode(), _png((20, 20))]


@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory):
    """`scored(task)` → (responses, bad-row responses, JSONL lines, result): every training image plus
    BAD_ROWS, scored once per task by a fresh Python process through mlflow.pyfunc.load_model."""
    cache: dict = {}

    def get(task: str):
        if task not in cache:
            result, data = trained(task)
            lines = _lines(Path(data.train_jsonl))
            rows = [_b64(Path(data.train_jsonl).parent / line["image_url"]) for line in lines] + BAD_ROWS
            responses = run_pyfunc_in_new_process(result.model_dir, rows, tmp_path_factory.mktemp(task))
            cache[task] = (responses[:len(lines)], responses[len(lines):], lines, result)
        return cache[task]

    return get


def _iou(a: dict, b: dict) -> float:
    ix = max(0.0, min(a["bottomX"], b["bottomX"]) - max(a["topX"], b["topX"]))
    iy = max(0.0, min(a["bottomY"], b["bottomY"]) - max(a["topY"], b["topY"]))
    inter = ix * iy
    area = lambda r: (r["bottomX"] - r["topX"]) * (r["bottomY"] - r["topY"])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("task", TASKS)
def test_model_folder_has_the_cloud_layout_and_plain_weights(trained, task):
    result, data = trained(task)
    folder = result.model_dir
    for name in ("MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "mlflow_model.py",
                 "artifacts/settings.json", "artifacts/model.pt"):
        assert (folder / name).is_file(), name
    assert not (folder / "uv.lock").exists()
    settings = json.loads((folder / "artifacts" / "settings.json").read_text())
    assert settings["task"] == task and settings["labels"] == data.labels
    expected = {"valid_resize_size", "valid_crop_size"} if "classification" in task else {
        "min_size", "max_size", "box_score_thresh", "nms_iou_thresh", "box_detections_per_img", "tile_grid_size",
        "tile_overlap_ratio", "tile_predictions_nms_thresh"}
    if task == "image_instance_segmentation":
        expected |= {"mask_pixel_score_threshold", "max_number_of_polygon_points", "export_as_image", "image_type"}
    assert expected <= set(settings)
    assert settings.get("valid_crop_size", 64) == 64 and settings.get("min_size", 96) == 96  # values used in training
    state = torch.load(folder / "artifacts" / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def test_multiclass_answers_every_label_and_the_right_class(scored):
    responses, _, lines, result = scored("image_classification")
    for response, line in zip(responses, lines):
        assert set(response) == {"probs", "labels"}
        assert response["labels"] == result.labels
        assert sum(response["probs"]) == pytest.approx(1.0, abs=1e-4)
        assert response["labels"][int(np.argmax(response["probs"]))] == line["label"]


def test_multilabel_answers_independent_probabilities_and_the_right_set(scored):
    responses, _, lines, result = scored("image_classification_multilabel")
    for response, line in zip(responses, lines):
        assert response["labels"] == result.labels
        predicted = {label for label, p in zip(response["labels"], response["probs"]) if p >= 0.5}
        assert predicted == set(line["label"])


@pytest.mark.parametrize("task", ["image_object_detection", "image_instance_segmentation"])
def test_detections_have_the_right_labels_and_normalised_coordinates(scored, task):
    responses, _, lines, _ = scored(task)
    for response, line in zip(responses, lines):
        assert set(response) == {"boxes"}
        for item in response["boxes"]:
            assert set(item["box"]) == {"topX", "topY", "bottomX", "bottomY"}
            assert all(0.0 <= v <= 1.0 for v in item["box"].values())
            assert item["score"] >= 0.3  # box_score_thresh from settings.json
        for truth in line["label"]:
            best = max((_iou(truth, p["box"]) for p in response["boxes"] if p["label"] == truth["label"]), default=0)
            assert best >= 0.5, (line["image_url"], truth)


def test_instance_polygons_cover_the_drawn_shapes(scored):
    responses, _, lines, _ = scored("image_instance_segmentation")
    width, height = IMAGE_SIZE
    for response, line in zip(responses, lines):
        for truth in line["label"]:
            true_mask = polygons_to_mask(truth["polygon"], width, height).astype(bool)
            overlaps = []
            for p in response["boxes"]:
                assert isinstance(p["polygon"], list) and all(len(s) % 2 == 0 and len(s) <= 200 for s in p["polygon"])
                if p["label"] == truth["label"] and p["polygon"]:
                    mask = polygons_to_mask(p["polygon"], width, height).astype(bool)
                    overlaps.append((mask & true_mask).sum() / (mask | true_mask).sum())
            assert max(overlaps, default=0) >= 0.5, (line["image_url"], truth["label"])


def _grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=pixels).astype(bool)


@pytest.mark.parametrize("image_type", ["PNG", "JPG"])
def test_export_as_image_returns_each_mask_as_an_image_of_the_image_size_matching_its_polygon(trained, image_type):
    from serving.predictor import Predictor

    result, data = trained("image_instance_segmentation")
    predictor = Predictor.load(result.model_dir)
    lines = _lines(Path(data.train_jsonl))[:4]
    images = [Image.open(Path(data.train_jsonl).parent / line["image_url"]).convert("RGB") for line in lines]
    plain = predictor.predict_images(images)
    answers = predictor.predict_images(images, {"export_as_image": True, "image_type": image_type})
    assert all("mask" not in box for response in plain for box in response["boxes"])  # off by default
    checked = 0
    for image, response, without in zip(images, answers, plain):
        assert [{k: v for k, v in b.items() if k != "mask"} for b in response["boxes"]] == without["boxes"]
        for box in response["boxes"]:
            picture = Image.open(io.BytesIO(base64.b64decode(box["mask"], validate=True)))
            assert picture.format == {"PNG": "PNG", "JPG": "JPEG"}[image_type]
            assert picture.size == image.size and picture.mode == "L"  # the whole image, one channel
            pixels = np.asarray(picture)
            if image_type == "PNG":
                assert set(np.unique(pixels)) <= {0, 255}  # lossless: exactly the binary mask
            mask = pixels > 127
            drawn = polygons_to_mask(box["polygon"], *image.size).astype(bool)
            # the polygon is the mask's outline through its boundary pixels' centres, simplified by under a
            # pixel: on shapes of ~100 px (a star's thin arms) that is no IoU test, but each lies within a
            # pixel or two of the other
            assert mask.sum() > 0 and drawn.sum() > 0, box["label"]
            assert (drawn & _grown(mask, 1)).sum() >= 0.95 * drawn.sum(), box["label"]
            assert (mask & _grown(drawn, 2)).sum() >= 0.95 * mask.sum(), box["label"]
            ys, xs = np.nonzero(mask)  # and it lies inside its box
            b = box["box"]
            assert xs.min() >= b["topX"] * image.width - 2 and xs.max() <= b["bottomX"] * image.width + 2
            assert ys.min() >= b["topY"] * image.height - 2 and ys.max() <= b["bottomY"] * image.height + 2
            checked += 1
    assert checked >= len(lines)


@pytest.mark.parametrize("task", TASKS)
def test_bad_rows_get_an_error_in_place_and_the_rest_are_answered(scored, task):
    good, errors, lines, _ = scored(task)
    assert len(good) == len(lines) and not any("error" in r for r in good)
    codes = [e["error"]["code"] for e in errors]
    assert codes == ["invalid_base64", "not_an_image", "too_small"]
    for offset, e in enumerate(errors):
        row = len(lines) + offset
        assert e["error"]["row"] == row and e["error"]["message"].startswith(f"image {row}:")
    assert "at least 50x50" in errors[2]["error"]["message"]
