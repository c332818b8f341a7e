"""Tests for models/convert.py and `data from-coco` / `data from-voc`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from models.data.coco import coco_to_jsonl
from models.data.voc import voc_to_jsonl
from serving.cli.data import add_commands as add_data_commands

BOX_KEYS = ("topX", "topY", "bottomX", "bottomY")
W, H = 200, 100


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse every line of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def box_of(obj: dict[str, Any]) -> list[float]:
    """The four box values of a JSONL object."""
    return [obj[k] for k in BOX_KEYS]


def write_json(path: Path, data: Any) -> Path:
    """Write JSON and return the path."""
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def pixel_coco() -> dict[str, Any]:
    """Three 200x100 images: two objects (one crowd), one object, none."""
    return {
        "images": [
            {"id": 1, "width": W, "height": H, "file_name": "images/a.png"},
            {"id": 2, "width": W, "height": H, "file_name": "images/b.png"},
            {"id": 3, "width": W, "height": H, "file_name": "images/c.png"},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 30], "iscrowd": 0,
             "segmentation": [[20, 10, 60, 10, 60, 40, 20, 40]]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [100, 50, 50, 25], "iscrowd": 1,
             "segmentation": [[100, 50, 150, 50, 125, 75]]},
            {"id": 12, "image_id": 2, "category_id": 2, "bbox": [0, 0, 200, 100],
             "segmentation": [[0, 0, 200, 0, 200, 100, 0, 100]]},
        ],
    }


def relative_coco() -> dict[str, Any]:
    """`pixel_coco` with bbox and polygons divided by the image size (the vision-studio variant)."""
    data = pixel_coco()
    for ann in data["annotations"]:
        left, top, w, h = ann["bbox"]
        ann["bbox"] = [left / W, top / H, w / W, h / H]
        ann["segmentation"] = [[v / (W if i % 2 == 0 else H) for i, v in enumerate(p)] for p in ann["segmentation"]]
    return data


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """A folder with images/a.png, b.png, c.png (200x100)."""
    (tmp_path / "images").mkdir()
    for name in "abc":
        Image.new("RGB", (W, H), (90, 120, 150)).save(tmp_path / "images" / f"{name}.png")
    return tmp_path


def test_pixel_coco_bboxes_are_normalised(coco_dir: Path) -> None:
    out = coco_dir / "out" / "train.jsonl"
    s = coco_to_jsonl(write_json(coco_dir / "instances.json", pixel_coco()), out)
    assert (s.n_images, s.n_annotations, s.n_skipped, s.bbox_format_used) == (3, 3, 0, "pixel")
    assert s.labels == ["cat", "dog"] and s.warnings == []
    lines = read_jsonl(out)
    assert lines[0]["label"][0] == {
        "label": "cat", "topX": 0.1, "topY": 0.1, "bottomX": 0.3, "bottomY": 0.4, "isCrowd": 0
    }
    assert box_of(lines[0]["label"][1]) == [0.5, 0.5, 0.75, 0.75]
    assert box_of(lines[1]["label"][0]) == [0.0, 0.0, 1.0, 1.0]
    assert lines[0]["image_details"] == {"format": "png", "width": "200px", "height": "100px"}


def test_relative_coco_bboxes_detected_and_kept_relative(coco_dir: Path) -> None:
    pixel = coco_to_jsonl(write_json(coco_dir / "p.json", pixel_coco()), coco_dir / "p.jsonl")
    relative = coco_to_jsonl(write_json(coco_dir / "r.json", relative_coco()), coco_dir / "r.jsonl")
    assert (pixel.bbox_format_used, relative.bbox_format_used) == ("pixel", "relative")
    assert read_jsonl(coco_dir / "p.jsonl") == read_jsonl(coco_dir / "r.jsonl")


def test_bbox_format_can_be_forced(coco_dir: Path) -> None:
    s = coco_to_jsonl(write_json(coco_dir / "r.json", relative_coco()), coco_dir / "r.jsonl", bbox_format="pixel")
    assert s.bbox_format_used == "pixel"
    assert box_of(read_jsonl(coco_dir / "r.jsonl")[0]["label"][0]) == [0.0005, 0.001, 0.0015, 0.004]


def test_crowd_flags_and_images_without_annotations(coco_dir: Path) -> None:
    coco_to_jsonl(write_json(coco_dir / "c.json", pixel_coco()), coco_dir / "c.jsonl")
    lines = read_jsonl(coco_dir / "c.jsonl")
    assert [o["isCrowd"] for o in lines[0]["label"]] == [0, 1]
    assert lines[2]["label"] == [] and lines[2]["image_url"] == "images/c.png"


def test_detection_writes_boxes_only(coco_dir: Path) -> None:
    coco_to_jsonl(write_json(coco_dir / "c.json", pixel_coco()), coco_dir / "c.jsonl")
    for line in read_jsonl(coco_dir / "c.jsonl"):
        for obj in line["label"]:
            assert list(obj) == ["label", *BOX_KEYS, "isCrowd"]


def test_image_url_is_relative_to_output_jsonl(coco_dir: Path) -> None:
    out = coco_dir / "deep" / "er" / "train.jsonl"
    coco_to_jsonl(write_json(coco_dir / "c.json", pixel_coco()), out)
    for line in read_jsonl(out):
        assert not Path(line["image_url"]).is_absolute()
        expected = coco_dir / "images" / Path(line["image_url"]).name
        assert (out.parent / line["image_url"]).resolve() == expected.resolve()


def test_image_url_prefix_is_prepended(coco_dir: Path) -> None:
    prefix = "azureml://subscriptions/s/resourcegroups/r/workspaces/w/datastores/d/paths/"
    coco_to_jsonl(write_json(coco_dir / "c.json", pixel_coco()), coco_dir / "c.jsonl", image_url_prefix=prefix)
    assert read_jsonl(coco_dir / "c.jsonl")[1]["image_url"] == prefix + "images/b.png"


def test_missing_local_image_uses_coco_url_or_warns(tmp_path: Path) -> None:
    data = pixel_coco()
    data["images"][0]["coco_url"] = "http://example.com/a.png"
    s = coco_to_jsonl(write_json(tmp_path / "c.json", data), tmp_path / "c.jsonl")
    lines = read_jsonl(tmp_path / "c.jsonl")
    assert lines[0]["image_url"] == "http://example.com/a.png" and lines[1]["image_url"] == "images/b.png"
    assert any("2 image file(s) not found" in w and "images/b.png" in w for w in s.warnings)


@pytest.mark.parametrize("make", [pixel_coco, relative_coco])
def test_segmentation_polygons_are_normalised_with_boxes(coco_dir: Path, make: Any) -> None:
    out = coco_dir / "seg.jsonl"
    coco_to_jsonl(write_json(coco_dir / "s.json", make()), out, task="image_instance_segmentation")
    first = read_jsonl(out)[0]["label"]
    assert first[0] == {"label": "cat", "isCrowd": 0, "polygon": [[0.1, 0.1, 0.3, 0.1, 0.3, 0.4, 0.1, 0.4]],
                        "topX": 0.1, "topY": 0.1, "bottomX": 0.3, "bottomY": 0.4}
    assert first[1]["polygon"] == [[0.5, 0.5, 0.75, 0.5, 0.625, 0.75]] and first[1]["isCrowd"] == 1


def rectangle_mask() -> np.ndarray:
    """A 100x200 mask with a filled rectangle x 30..89, y 20..59."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[20:60, 30:90] = 1
    return mask


@pytest.mark.parametrize("compressed", [True, False])
def test_rle_segmentation_converted_to_polygons(coco_dir: Path, compressed: bool) -> None:
    mask = rectangle_mask()
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    else:
        flat = mask.flatten(order="F")
        changes = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
        rle = {"size": [H, W], "counts": runs.tolist()}
    data = pixel_coco()
    data["annotations"] = [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [30, 20, 60, 40], "iscrowd": 1,
                            "segmentation": rle}]
    out = coco_dir / "rle.jsonl"
    coco_to_jsonl(write_json(coco_dir / "rle.json", data), out, task="image_instance_segmentation")
    obj = read_jsonl(out)[0]["label"][0]
    assert obj["isCrowd"] == 1 and len(obj["polygon"]) == 1
    poly = obj["polygon"][0]
    pts = [(round(poly[i] * W), round(poly[i + 1] * H)) for i in range(0, len(poly), 2)]
    drawn = Image.new("L", (W, H), 0)
    ImageDraw.Draw(drawn).polygon(pts, fill=1)
    assert np.array_equal(np.asarray(drawn), mask)


def test_segmentation_task_requires_polygons_and_lists_ids(coco_dir: Path) -> None:
    data = pixel_coco()
    del data["annotations"][0]["segmentation"]
    data["annotations"][2]["segmentation"] = []
    with pytest.raises(ValueError, match=r"i\.json: 2 annotation\(s\) have no segmentation.*ids 10, 12"):
        coco_to_jsonl(write_json(coco_dir / "i.json", data), coco_dir / "o.jsonl", task="image_instance_segmentation")


def test_boxes_outside_image_clipped_and_degenerate_skipped_with_warnings(coco_dir: Path) -> None:
    data = pixel_coco()
    data["annotations"][0]["bbox"] = [-10, 90, 40, 30]  # sticks out left and bottom
    data["annotations"][1]["bbox"] = [250, 10, 20, 20]  # entirely right of the image
    data["annotations"][2]["bbox"] = [50, 50, 0, 10]  # zero width
    s = coco_to_jsonl(write_json(coco_dir / "i.json", data), coco_dir / "o.jsonl")
    assert (s.n_annotations, s.n_skipped, s.n_clipped) == (1, 2, 2)
    assert box_of(read_jsonl(coco_dir / "o.jsonl")[0]["label"][0]) == [0.0, 0.9, 0.15, 1.0]
    assert any("annotation 10" in w and "clipped" in w for w in s.warnings)
    assert any("annotation 11" in w and "skipped" in w for w in s.warnings)
    assert any("annotation 12" in w and "zero area" in w for w in s.warnings)
    assert s.labels == ["cat"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["annotations"][1].update(id=17, bbox=[1, 2, 3]),
         "instances.json: annotation 17: bbox has 3 values, expected 4"),
        (lambda d: d["annotations"][0].update(bbox=[1, "x", 3, 4]), "instances.json: annotation 10: bbox value is 'x'"),
        (lambda d: d["annotations"][0].update(category_id=9), "instances.json: annotation 10: category_id 9"),
        (lambda d: d["annotations"][2].update(image_id=99), "instances.json: annotation 12: image_id 99"),
        (lambda d: d["annotations"][0].pop("bbox"), "instances.json: annotation 10: missing 'bbox'"),
        (lambda d: d["images"][1].pop("file_name"), "instances.json: image 2: missing 'file_name'"),
        (lambda d: d["images"].append(dict(d["images"][0])), "instances.json: image 1: duplicate id"),
        (lambda d: d.pop("categories"), "instances.json: missing or invalid 'categories'"),
    ],
)
def test_malformed_coco_errors_name_file_and_annotation(coco_dir: Path, change: Any, message: str) -> None:
    data = pixel_coco()
    change(data)
    with pytest.raises(ValueError) as info:
        coco_to_jsonl(write_json(coco_dir / "instances.json", data), coco_dir / "o.jsonl")
    assert message in str(info.value)


def test_odd_polygon_is_an_error_naming_the_annotation(coco_dir: Path) -> None:
    data = pixel_coco()
    data["annotations"][1]["segmentation"] = [[1, 2, 3, 4, 5, 6, 7]]
    with pytest.raises(ValueError, match="i.json: annotation 11: segmentation polygon 0 has 7 values"):
        coco_to_jsonl(write_json(coco_dir / "i.json", data), coco_dir / "o.jsonl", task="image_instance_segmentation")


def test_classification_from_coco_needs_one_category_per_image(coco_dir: Path) -> None:
    data = pixel_coco()
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 11]
    data["annotations"].append({"id": 13, "image_id": 3, "category_id": 1, "bbox": [0, 0, 5, 5]})
    data["annotations"].append({"id": 14, "image_id": 3, "category_id": 1, "bbox": [9, 9, 5, 5]})
    s = coco_to_jsonl(write_json(coco_dir / "c.json", data), coco_dir / "c.jsonl", task="image_classification")
    assert [line["label"] for line in read_jsonl(coco_dir / "c.jsonl")] == ["cat", "dog", "cat"] and s.n_images == 3
    with pytest.raises(ValueError, match=r"c\.json: image 1 \(images/a\.png\).*\['cat', 'dog'\]"):
        coco_to_jsonl(write_json(coco_dir / "c.json", pixel_coco()), coco_dir / "c.jsonl", task="image_classification")


def test_multilabel_from_coco(coco_dir: Path) -> None:
    coco = write_json(coco_dir / "m.json", pixel_coco())
    coco_to_jsonl(coco, coco_dir / "m.jsonl", task="image_classification_multilabel")
    assert [line["label"] for line in read_jsonl(coco_dir / "m.jsonl")] == [["cat", "dog"], ["dog"], []]


# ---------------------------------------------------------------- Pascal VOC


def voc_xml(filename: str | None, objects: list[dict[str, Any]], size: tuple[int, int] | None = (W, H)) -> str:
    """A Pascal VOC annotation document."""
    parts = ["<annotation><folder>VOC</folder>"]
    if filename:
        parts.append(f"<filename>{filename}</filename>")
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for obj in objects:
        box = "".join(f"<{k}>{obj[k]}</{k}>" for k in ("xmin", "ymin", "xmax", "ymax") if k in obj)
        difficult = f"<difficult>{obj['difficult']}</difficult>" if "difficult" in obj else ""
        parts.append(f"<object><name>{obj['name']}</name>{difficult}<bndbox>{box}</bndbox></object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def voc_dir(tmp_path: Path) -> Path:
    """A standard VOC layout with two annotated images."""
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name in ("0001", "0002"):
        Image.new("RGB", (W, H)).save(root / "JPEGImages" / f"{name}.jpg")
    objects = [{"name": "car", "xmin": 21, "ymin": 11, "xmax": 60, "ymax": 40},
               {"name": "person", "xmin": 101, "ymin": 51, "xmax": 150, "ymax": 75, "difficult": 1}]
    (root / "Annotations" / "0001.xml").write_text(voc_xml("0001.jpg", objects))
    (root / "Annotations" / "0002.xml").write_text(voc_xml("0002.jpg", []))
    return root


def test_voc_conversion_uses_one_based_inclusive_boxes_and_difficult_as_crowd(voc_dir: Path) -> None:
    out = voc_dir.parent / "voc.jsonl"
    s = voc_to_jsonl(voc_dir, out)
    assert (s.n_images, s.n_annotations, s.labels, s.warnings) == (2, 2, ["car", "person"], [])
    lines = read_jsonl(out)
    assert lines[0]["image_url"] == "VOC/JPEGImages/0001.jpg"
    assert lines[0]["image_details"] == {"format": "jpg", "width": "200px", "height": "100px"}
    assert lines[0]["label"] == [
        {"label": "car", "topX": 0.1, "topY": 0.1, "bottomX": 0.3, "bottomY": 0.4, "isCrowd": 0},
        {"label": "person", "topX": 0.5, "topY": 0.5, "bottomX": 0.75, "bottomY": 0.75, "isCrowd": 1},
    ]
    assert lines[1]["label"] == []


def test_voc_xml_next_to_images_with_size_from_image(tmp_path: Path) -> None:
    Image.new("RGB", (50, 80)).save(tmp_path / "pic.png")
    cup = {"name": "cup", "xmin": 1, "ymin": 1, "xmax": 60, "ymax": 80}  # wider than the 50 px image
    (tmp_path / "pic.xml").write_text(voc_xml(None, [cup], None))
    s = voc_to_jsonl(tmp_path, tmp_path / "out.jsonl")
    line = read_jsonl(tmp_path / "out.jsonl")[0]
    assert line["image_url"] == "pic.png" and line["image_details"]["width"] == "50px"
    assert line["label"][0] == {"label": "cup", "topX": 0.0, "topY": 0.0, "bottomX": 1.0, "bottomY": 1.0, "isCrowd": 0}
    assert s.n_clipped == 1 and "pic.xml: object 0" in s.warnings[0]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (voc_xml("0001.jpg", [{"name": "car", "xmin": 1, "ymin": 1, "xmax": 5}]),
         "bad.xml: object 0: <bndbox>: missing <ymax>"),
        (voc_xml("0001.jpg", [{"name": "car", "xmin": 1, "ymin": "a", "xmax": 5, "ymax": 5}]),
         "bad.xml: object 0: <bndbox>: <ymin> is 'a'"),
        (voc_xml("0001.jpg", [{"name": "car", "xmin": 9, "ymin": 1, "xmax": 5, "ymax": 5}]),
         "bad.xml: object 0: <bndbox> has xmax < xmin"),
        ("<annotation><object>", "bad.xml: cannot parse XML"),
    ],
)
def test_malformed_voc_errors_name_xml_file_and_field(voc_dir: Path, xml: str, message: str) -> None:
    (voc_dir / "Annotations" / "bad.xml").write_text(xml)
    with pytest.raises(ValueError) as info:
        voc_to_jsonl(voc_dir, voc_dir / "o.jsonl")
    assert message in str(info.value)


def test_voc_folder_without_xml_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no .xml files"):
        voc_to_jsonl(tmp_path, tmp_path / "o.jsonl")


# ---------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    """A parser with the data commands registered."""
    p = argparse.ArgumentParser()
    add_data_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_from_coco_prints_summary(coco_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = write_json(coco_dir / "r.json", relative_coco())
    args = parser().parse_args(["data", "from-coco", str(coco), "--out", str(coco_dir / "o.jsonl"),
                                "--task", "image_instance_segmentation"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "3 images and 3 annotations" in out and "bbox format relative" in out and "cat, dog" in out
    assert len(read_jsonl(coco_dir / "o.jsonl")) == 3


def test_cli_from_coco_error_returns_1(coco_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = pixel_coco()
    data["annotations"][0]["bbox"] = [1, 2]
    coco = write_json(coco_dir / "bad.json", data)
    argv = ["data", "from-coco", str(coco), "--out", str(coco_dir / "o.jsonl"), "--bbox-format", "pixel"]
    args = parser().parse_args(argv)
    assert args.func(args) == 1
    assert "bad.json: annotation 10: bbox has 2 values" in capsys.readouterr().err


def test_cli_from_voc_prints_summary(voc_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["data", "from-voc", str(voc_dir), "--out", str(voc_dir / "o.jsonl")])
    assert args.func(args) == 0
    assert "2 images and 2 annotations" in capsys.readouterr().out
