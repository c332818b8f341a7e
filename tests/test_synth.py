"""Tests for models/data/synth.py, models/data/shapes.py and `data synth`."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from models.data.shapes import render_shape_image
from models.data.synth import DEFAULT_SHAPES, write_synthetic_dataset
from models.data.records import TASK_NAMES as TASKS
from serving.cli.data import add_commands as add_data_commands

BOX_KEYS = ("topX", "topY", "bottomX", "bottomY")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse every line of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def label_names(task: str, label: Any) -> set[str]:
    """The class names used by one JSONL label."""
    if task == "image_classification":
        return {label}
    if task == "image_classification_multilabel":
        return set(label)
    return {obj["label"] for obj in label}


def pixel_polygon(flat: list[float], width: int, height: int) -> list[tuple[int, int]]:
    """Normalised [x1, y1, ...] -> integer pixel vertices."""
    return [(round(flat[i] * width), round(flat[i + 1] * height)) for i in range(0, len(flat), 2)]


def rasterise(polygon: list[tuple[int, int]], width: int, height: int) -> np.ndarray:
    """Boolean mask of a polygon as PIL fills it."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=1)
    return np.asarray(mask, dtype=bool)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """One 20-image dataset per task, seed 3."""
    root = tmp_path_factory.mktemp("synth")
    return {task: (write_synthetic_dataset(task, root / task, 20, seed=3), root / task) for task in TASKS}


def all_lines(summary: Any) -> list[dict[str, Any]]:
    """Training then validation lines."""
    return read_jsonl(summary.train_jsonl) + read_jsonl(summary.validation_jsonl)


@pytest.mark.parametrize("task", TASKS)
def test_jsonl_lines_follow_data_format(task: str, datasets: dict[str, tuple[Any, Path]]) -> None:
    summary, root = datasets[task]
    lines = all_lines(summary)
    assert len(lines) == 20
    for line in lines:
        assert list(line) == ["image_url", "image_details", "label"]
        assert line["image_details"] == {"format": "png", "width": "160px", "height": "120px"}
        assert line["image_url"].startswith("images/") and line["image_url"].endswith(".png")
        with Image.open(root / line["image_url"]) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (160, 120), "RGB")
        label = line["label"]
        if task == "image_classification":
            assert label in DEFAULT_SHAPES
        elif task == "image_classification_multilabel":
            assert 1 <= len(label) <= 3 and label == sorted(set(label))
            assert set(label) <= set(DEFAULT_SHAPES)
        else:
            assert 1 <= len(label) <= 4
            for obj in label:
                expected = ["label", *BOX_KEYS, "isCrowd"]
                if task == "image_instance_segmentation":
                    expected = ["label", "isCrowd", "polygon", *BOX_KEYS]
                assert list(obj) == expected and obj["isCrowd"] == 0 and obj["label"] in DEFAULT_SHAPES
                assert 0 <= obj["topX"] < obj["bottomX"] <= 1 and 0 <= obj["topY"] < obj["bottomY"] <= 1
                for poly in obj.get("polygon", []):
                    assert len(poly) % 2 == 0 and len(poly) >= 6 and all(0 <= v <= 1 for v in poly)


def test_segmentation_polygons_match_drawn_pixels(datasets: dict[str, tuple[Any, Path]]) -> None:
    summary, root = datasets["image_instance_segmentation"]
    for line in all_lines(summary):
        pixels = np.asarray(Image.open(root / line["image_url"]).convert("RGB"))
        for obj in line["label"]:
            polygon = pixel_polygon(obj["polygon"][0], 160, 120)
            mask = rasterise(polygon, 160, 120)
            colours = pixels[mask]
            fill = colours[0]
            assert (colours == fill).all(), "a shape is one solid colour"
            x0, y0 = min(p[0] for p in polygon), min(p[1] for p in polygon)
            x1, y1 = max(p[0] for p in polygon), max(p[1] for p in polygon)
            crop = (slice(y0, y1 + 1), slice(x0, x1 + 1))
            # inside the box, exactly the polygon's pixels have the fill colour: the background differs
            assert np.array_equal((pixels[crop] == fill).all(axis=2), mask[crop])


def test_segmentation_boxes_are_polygon_bounds(datasets: dict[str, tuple[Any, Path]]) -> None:
    summary, _ = datasets["image_instance_segmentation"]
    for line in all_lines(summary):
        for obj in line["label"]:
            xs, ys = obj["polygon"][0][0::2], obj["polygon"][0][1::2]
            assert [obj[k] for k in BOX_KEYS] == [min(xs), min(ys), max(xs), max(ys)]


def test_detection_boxes_match_segmentation_of_same_seed(datasets: dict[str, tuple[Any, Path]]) -> None:
    det = all_lines(datasets["image_object_detection"][0])
    seg = all_lines(datasets["image_instance_segmentation"][0])
    for d, s in zip(det, seg):
        assert [[o[k] for k in ("label", *BOX_KEYS)] for o in d["label"]] == [
            [o[k] for k in ("label", *BOX_KEYS)] for o in s["label"]
        ]


def test_objects_in_one_image_do_not_overlap(datasets: dict[str, tuple[Any, Path]]) -> None:
    summary, _ = datasets["image_object_detection"]
    for line in all_lines(summary):
        boxes = [[o[k] for k in BOX_KEYS] for o in line["label"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


@pytest.mark.parametrize("task", TASKS)
def test_validation_and_training_use_the_same_labels(task: str, datasets: dict[str, tuple[Any, Path]]) -> None:
    summary, _ = datasets[task]
    train = set().union(*(label_names(task, line["label"]) for line in read_jsonl(summary.train_jsonl)))
    validation = set().union(*(label_names(task, line["label"]) for line in read_jsonl(summary.validation_jsonl)))
    assert train == validation == set(DEFAULT_SHAPES) == set(summary.labels)


@pytest.mark.parametrize("task", ["image_classification_multilabel", "image_instance_segmentation"])
def test_two_validation_images_still_hold_every_label(task: str, tmp_path: Path) -> None:
    summary = write_synthetic_dataset(task, tmp_path, 10, seed=8)
    assert summary.n_validation == 2
    validation = set().union(*(label_names(task, line["label"]) for line in read_jsonl(summary.validation_jsonl)))
    assert validation == set(DEFAULT_SHAPES)


def test_classification_labels_are_balanced(datasets: dict[str, tuple[Any, Path]]) -> None:
    summary, _ = datasets["image_classification"]
    for path in (summary.train_jsonl, summary.validation_jsonl):
        counts = Counter(line["label"] for line in read_jsonl(path))
        assert max(counts.values()) - min(counts.values()) <= 1


def test_classification_shape_is_big(datasets: dict[str, tuple[Any, Path]]) -> None:
    summary, root = datasets["image_classification"]
    for line in read_jsonl(summary.train_jsonl)[:5]:
        pixels = np.asarray(Image.open(root / line["image_url"]))
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        fill = colours[counts.argmax()]  # the shape is the only large single-colour area
        ys, xs = np.nonzero((pixels == fill).all(axis=2))
        extent = max(xs.max() - xs.min(), ys.max() - ys.min())
        assert 0.35 * 120 - 1 <= extent <= 0.70 * 120 + 1


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = write_synthetic_dataset("image_instance_segmentation", tmp_path / "a", 6, seed=11)
    b = write_synthetic_dataset("image_instance_segmentation", tmp_path / "b", 6, seed=11)
    c = write_synthetic_dataset("image_instance_segmentation", tmp_path / "c", 6, seed=12)
    assert a.train_jsonl.read_bytes() == b.train_jsonl.read_bytes()
    assert a.validation_jsonl.read_bytes() == b.validation_jsonl.read_bytes()
    assert (a.images_dir / "000004.png").read_bytes() == (b.images_dir / "000004.png").read_bytes()
    assert a.train_jsonl.read_bytes() != c.train_jsonl.read_bytes()


@pytest.mark.parametrize(
    ("images", "fraction", "n_train", "n_validation"),
    [(10, 0.2, 8, 2), (2, 0.2, 1, 1), (1, 0.2, 1, 0), (7, 0.9, 1, 6), (5, 0.0, 5, 0)],
)
def test_split_sizes_and_distinct_images(
    tmp_path: Path, images: int, fraction: float, n_train: int, n_validation: int
) -> None:
    s = write_synthetic_dataset("image_classification", tmp_path, images, validation_fraction=fraction)
    train, validation = read_jsonl(s.train_jsonl), read_jsonl(s.validation_jsonl)
    assert (s.n_train, s.n_validation, len(train), len(validation)) == (n_train, n_validation, n_train, n_validation)
    assert not {line["image_url"] for line in train} & {line["image_url"] for line in validation}
    assert len(list(s.images_dir.iterdir())) == images


def test_small_objects_are_10_to_30_px_in_large_jpegs(tmp_path: Path) -> None:
    s = write_synthetic_dataset("image_object_detection", tmp_path, 2, small_objects=True, seed=5)
    for line in all_lines(s):
        assert line["image_details"] == {"format": "jpg", "width": "1600px", "height": "1200px"}
        with Image.open(tmp_path / line["image_url"]) as im:
            assert (im.format, im.size) == ("JPEG", (1600, 1200))
        assert 8 <= len(line["label"]) <= 20
        for obj in line["label"]:
            w = round((obj["bottomX"] - obj["topX"]) * 1600)
            h = round((obj["bottomY"] - obj["topY"]) * 1200)
            assert 10 <= max(w, h) <= 30


def test_small_objects_rejected_for_classification(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_classification"):
        write_synthetic_dataset("image_classification", tmp_path, 4, small_objects=True)


@pytest.mark.parametrize("size", [(49, 100), (100, 10)])
def test_images_smaller_than_50px_rejected(tmp_path: Path, size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="50x50"):
        write_synthetic_dataset("image_object_detection", tmp_path, 4, image_size=size)


def test_unknown_task_and_shape_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        write_synthetic_dataset("image_regression", tmp_path, 4)
    with pytest.raises(ValueError, match="hexagon"):
        write_synthetic_dataset("image_classification", tmp_path, 4, shapes=("circle", "hexagon"))


def test_custom_size_and_shapes(tmp_path: Path) -> None:
    s = write_synthetic_dataset(
        "image_classification_multilabel", tmp_path, 6, image_size=(64, 80), shapes=("star", "circle")
    )
    assert s.labels == ["circle", "star"]
    for line in all_lines(s):
        assert line["image_details"]["width"] == "64px" and line["image_details"]["height"] == "80px"
        assert set(line["label"]) <= {"circle", "star"}


def test_render_shape_image_returns_exact_polygons_and_boxes() -> None:
    shapes = [("square", (40.0, 30.0), 20.0), ("circle", (120.0, 60.0), 30.0), ("star", (70.0, 90.0), 24.0)]
    image, objects = render_shape_image(160, 120, shapes, seed=2)
    background, none = render_shape_image(160, 120, [], seed=2)
    assert none == [] and image.size == (160, 120)
    changed = (np.asarray(image) != np.asarray(background)).any(axis=2)
    union = np.zeros_like(changed)
    for (name, (cx, cy), size), obj in zip(shapes, objects):
        pts = list(zip(obj["polygon"][0::2], obj["polygon"][1::2]))
        assert obj["label"] == name
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        assert obj["box"] == (min(xs), min(ys), max(xs), max(ys))
        x0, y0, x1, y1 = obj["box"]
        assert abs(max(x1 - x0, y1 - y0) - size) <= 1 and abs((x0 + x1) / 2 - cx) <= 1 and abs((y0 + y1) / 2 - cy) <= 1
        union |= rasterise(pts, 160, 120)
    assert np.array_equal(changed, union)


def test_textured_background_is_low_contrast_but_not_flat() -> None:
    for seed in range(6):
        background, _ = render_shape_image(160, 120, [], seed=seed)
        pixels = np.asarray(background, dtype=float)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
        assert (pixels.max(axis=(0, 1)) - pixels.min(axis=(0, 1))).max() < 160
    plain, _ = render_shape_image(80, 60, [], background="plain")
    assert len(np.unique(np.asarray(plain).reshape(-1, 3), axis=0)) == 1


def test_progress_bar_for_many_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_synthetic_dataset("image_classification", tmp_path, 201, image_size=(50, 50))
    assert "synth images" in capsys.readouterr().err


def test_cli_data_synth_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["data", "synth", "--task", "image_object_detection", "--out", str(tmp_path), "--images", "5",
         "--size", "80x60", "--seed", "4", "--validation-fraction", "0.4"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "3 training and 2 validation images" in out and str(tmp_path / "train.jsonl") in out
    assert read_jsonl(tmp_path / "train.jsonl")[0]["image_details"]["width"] == "80px"
    args = parser.parse_args(["data", "synth", "--task", "image_classification", "--out", str(tmp_path),
                              "--images", "4", "--small-objects"])
    assert args.func(args) == 1
    assert "image_classification" in capsys.readouterr().err
