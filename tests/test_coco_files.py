"""A dataset's COCO files (models/data/coco_files.py): read, verified as the cloud did, merged into records,
every problem named by file and id, and written back as JSONL the training code reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from models.data.coco_files import (
    MAX_FILE_BYTES, CocoDataset, CocoProblems, few_images_problems, read_coco_files, to_jsonl_lines,
)
from models.data.jsonl import read_jsonl
from models.data.records import Box

SIZE = (64, 56)
SAS = "sv=2022-11-02&ss=b&sig=SECRET"


def png(path: Path, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 120, 200)).save(path)
    return path


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def image(ident: int, name: str, size: tuple[int, int] = SIZE, **extra: Any) -> dict:
    return {"id": ident, "width": size[0], "height": size[1], "file_name": name, **extra}


def classification() -> dict:
    """Three images: two apples, one banana; categories listed out of id order."""
    return {"images": [image(1, "a.png"), image(2, "b.png"), image(3, "c.png")],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2}, {"id": 2, "image_id": 2, "category_id": 2},
                            {"id": 3, "image_id": 3, "category_id": 1}],
            "categories": [{"id": 2, "name": "apple"}, {"id": 1, "name": "banana"}]}


def detection() -> dict:
    return {"images": [image(1, "a.png"), image(2, "b.png")],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.1, 0.2, 0.5, 0.4], "area": 0.2},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 1.0, 1.0]},
                            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0.25, 0.5, 0.5, 0.25]}],
            "categories": [{"id": 1, "name": "can"}, {"id": 2, "name": "carton"}]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with a.png, b.png and c.png (64x56)."""
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / name)
    return tmp_path


def refused(uris: list[str], kind: str = "imageClassification", **options: Any) -> list[str]:
    with pytest.raises(CocoProblems) as caught:
        read_coco_files(uris, kind, **options)
    for problem in caught.value.problems:
        assert problem in str(caught.value)
    return caught.value.problems


def named(problems: list[str], *parts: str) -> str:
    """The problem that contains every part."""
    found = [p for p in problems if all(part in p for part in parts)]
    assert found, problems
    return found[0]


def only(problems: list[str], *parts: str) -> str:
    """The one problem; it contains every part."""
    assert len(problems) == 1, problems
    for part in parts:
        assert part in problems[0], problems[0]
    return problems[0]


# ---------------------------------------------------------------- valid sets


def test_a_classification_set_becomes_records_labels_in_id_order_and_images_per_category(folder: Path) -> None:
    coco = write(folder / "train.json", classification())
    dataset = read_coco_files([str(coco)], "imageClassification")
    assert dataset.kind == "imageClassification" and dataset.task == "image_classification"
    assert [(Path(r.image).name, r.label, r.line) for r in dataset.records] == [
        ("a.png", "apple", 1), ("b.png", "apple", 2), ("c.png", "banana", 3)]
    assert all(os.path.isabs(r.image) and r.source == str(coco) for r in dataset.records)
    assert dataset.labels == ["banana", "apple"]
    assert dataset.counts == {"banana": 1, "apple": 2}


def test_a_detection_set_becomes_boxes_with_relative_corners_and_boxes_per_category(folder: Path) -> None:
    coco = write(folder / "train.json", detection())
    dataset = read_coco_files([str(coco)], "imageObjectDetection")
    assert dataset.task == "image_object_detection"
    first, second = dataset.records
    assert first.label == (Box("can", 0.1, 0.2, 0.6, pytest.approx(0.6)), Box("carton", 0.0, 0.0, 1.0, 1.0))
    assert second.label == (Box("can", 0.25, 0.5, 0.75, 0.75),)
    assert dataset.labels == ["can", "carton"] and dataset.counts == {"can": 2, "carton": 1}


def test_a_detection_image_without_boxes_is_kept_as_a_background_image(folder: Path) -> None:
    data = detection()
    data["images"].append(image(3, "c.png"))
    dataset = read_coco_files([str(write(folder / "train.json", data))], "imageObjectDetection")
    assert dataset.records[2].label == ()


def test_a_box_a_hair_past_the_edge_is_accepted_and_clamped(folder: Path) -> None:
    data = detection()
    data["annotations"][2]["bbox"] = [0.5, 0.5, 0.5 + 1e-9, 0.5]
    dataset = read_coco_files([str(write(folder / "train.json", data))], "imageObjectDetection")
    assert dataset.records[1].label[0].x1 == 1.0


@pytest.mark.parametrize("kind", ["imageClassification", "MultiClassClassification", "multiclassclassification",
                                  "IMAGECLASSIFICATION"])
def test_classification_kind_is_read_in_every_spelling_and_case(folder: Path, kind: str) -> None:
    dataset = read_coco_files([str(write(folder / "train.json", classification()))], kind)
    assert dataset.kind == "imageClassification"


@pytest.mark.parametrize("kind", ["imageObjectDetection", "ObjectDetection", "objectdetection"])
def test_detection_kind_is_read_in_every_spelling_and_case(folder: Path, kind: str) -> None:
    dataset = read_coco_files([str(write(folder / "train.json", detection()))], kind)
    assert dataset.kind == "imageObjectDetection"


def test_an_unknown_kind_is_refused_naming_annotation_kind(folder: Path) -> None:
    only(refused([str(write(folder / "train.json", classification()))], "segmentation"),
         "annotationKind", "'segmentation'")


@pytest.mark.parametrize("count", [0, 11])
def test_zero_or_more_than_ten_files_are_refused(folder: Path, count: int) -> None:
    only(refused([str(folder / "train.json")] * count), "annotationFileUris", f"{count} URIs")


@pytest.mark.parametrize("make", [classification, detection])
def test_jsonl_lines_read_back_through_read_jsonl_as_the_same_records(folder: Path, make: Callable[[], dict]) -> None:
    kind = "imageClassification" if make is classification else "imageObjectDetection"
    coco = write(folder / "train.json", make())
    dataset = read_coco_files([str(coco)], kind)
    lines = to_jsonl_lines(dataset)
    out = folder / "elsewhere" / "train.jsonl"
    out.parent.mkdir()
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    back = read_jsonl(out, dataset.task)
    assert not back.problems
    assert [(r.image, r.label) for r in back.records] == [(r.image, r.label) for r in dataset.records]
    assert lines[0]["image_details"] == {"format": "png"}


def test_files_are_merged_by_category_name_with_image_ids_per_file(folder: Path) -> None:
    second = {"images": [image(1, "c.png")], "annotations": [{"id": 1, "image_id": 1, "category_id": 7}],
              "categories": [{"id": 7, "name": "apple"}, {"id": 9, "name": "cherry"}]}
    one, two = write(folder / "one.json", classification()), write(folder / "two.json", second)
    dataset = read_coco_files([str(one), str(two)], "imageClassification")
    assert [(r.source, r.line, r.label) for r in dataset.records][-1] == (str(two), 1, "apple")
    assert dataset.labels == ["banana", "apple", "cherry"]
    assert dataset.counts == {"banana": 1, "apple": 3, "cherry": 0}


# ---------------------------------------------------------------- where files and images are


def test_blob_urls_with_sas_map_under_the_image_root_with_or_without_the_container(tmp_path: Path) -> None:
    root = tmp_path / "root"
    png(root / "container" / "imgs" / "a.png")
    png(root / "imgs" / "b.png")  # copied without its container folder
    png(root / "container" / "imgs" / "c.png")
    blob = "https://acct.blob.core.windows.net/container"
    data = classification()
    data["images"] = [image(1, "a.png", absolute_url=f"{blob}/imgs/a.png?{SAS}"),
                      image(2, "b.png", coco_url=f"{blob}/imgs/b.png"),
                      image(3, "c.png", absolute_url=f"{blob}/imgs/c.png")]
    write(root / "container" / "labels" / "train.json", data)
    dataset = read_coco_files([f"{blob}/labels/train.json?{SAS}"], "imageClassification", image_root=root)
    assert [r.image for r in dataset.records] == [str(root / "container/imgs/a.png"), str(root / "imgs/b.png"),
                                                  str(root / "container/imgs/c.png")]
    assert dataset.records[0].source == f"{blob}/labels/train.json"


def test_a_blob_annotation_file_copied_without_its_container_is_found(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / "dir" / name)
    write(tmp_path / "dir" / "train.json", classification())
    dataset = read_coco_files([f"https://acct.blob.core.windows.net/box/dir/train.json?{SAS}"],
                              "imageClassification", image_root=str(tmp_path))
    assert dataset.records[0].image == str(tmp_path / "dir" / "a.png")


def test_file_urls_name_a_local_annotation_file_and_its_images(folder: Path) -> None:
    png(folder / "elsewhere" / "d.png")
    data = classification()
    data["images"][0]["absolute_url"] = (folder / "elsewhere" / "d.png").as_uri()
    coco = write(folder / "train.json", data)
    dataset = read_coco_files([coco.as_uri()], "imageClassification")
    assert [r.image for r in dataset.records] == [str(folder / "elsewhere" / "d.png"), str(folder / "b.png"),
                                                  str(folder / "c.png")]
    assert dataset.records[0].source == coco.as_uri()


def test_a_missing_annotation_file_is_named_by_its_uri_without_the_sas_token(tmp_path: Path) -> None:
    uri = "https://acct.blob.core.windows.net/c/train.json"
    problem = only(refused([f"{uri}?{SAS}"], image_root=tmp_path), uri, "file not found")
    assert "SECRET" not in problem


def test_a_missing_blob_image_is_named_without_the_sas_token(tmp_path: Path) -> None:
    data = classification()
    data["images"][1]["coco_url"] = f"https://acct.blob.core.windows.net/c/b.png?{SAS}"
    for name in ("a.png", "c.png"):
        png(tmp_path / "c" / name)
    write(tmp_path / "c" / "train.json", data)
    uri = "https://acct.blob.core.windows.net/c/train.json"
    problem = only(refused([f"{uri}?{SAS}"], image_root=tmp_path),
                   f"{uri}: image 2: https://acct.blob.core.windows.net/c/b.png: file not found")
    assert "SECRET" not in problem


def test_a_cloud_uri_without_an_image_root_is_refused() -> None:
    only(refused(["https://acct.blob.core.windows.net/c/train.json"]), "c/train.json", "no image root")


@pytest.mark.parametrize("uri", ["https://acct.blob.core.windows.net/c/../../outside.json",
                                 "https://acct.blob.core.windows.net/c/%2e%2e/%2e%2e/outside.json",
                                 "azureml://subscriptions/s/datastores/d/paths/../outside.json"])
def test_an_annotation_uri_leaving_the_image_root_is_refused(tmp_path: Path, uri: str) -> None:
    write(tmp_path / "outside.json", classification())
    only(refused([uri], image_root=tmp_path / "root"), "outside the image root")


def test_images_leaving_the_image_root_are_refused_naming_file_and_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    png(tmp_path / "outside.png")
    data = classification()
    data["images"] = [image(1, "a.png", absolute_url="https://acct.blob.core.windows.net/c/../../outside.png"),
                      image(2, "../../outside.png"), image(3, "c.png", absolute_url=str(tmp_path / "outside.png"))]
    write(root / "c" / "train.json", data)
    uri = "https://acct.blob.core.windows.net/c/train.json"
    problems = refused([uri], image_root=root)
    assert len(problems) == 3
    for ident, problem in zip((1, 2, 3), problems):
        assert problem.startswith(f"{uri}: image {ident}: ") and "outside" in problem and "refused" in problem


def test_check_images_false_reads_without_the_image_files(tmp_path: Path) -> None:
    coco = write(tmp_path / "train.json", classification())
    dataset = read_coco_files([str(coco)], "imageClassification", check_images=False)
    assert [Path(r.image).name for r in dataset.records] == ["a.png", "b.png", "c.png"]


# ---------------------------------------------------------------- hostile files, each problem named


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A change to a COCO dict: `value` at `path` (keys and indexes separated by dots)."""
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return change


def _drop(path: str) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        del target[last]
    return change


CLASSIFICATION_CASES = {
    "duplicate image id": (_set("images.1.id", 1), ["image 1: duplicate id"]),  # and annotation 2's image_id 2
    "duplicate annotation id": (_set("annotations.1.id", 1), ["annotation 1: duplicate id"]),
    "duplicate category id": (_set("categories.1.id", 2), ["category 2: duplicate id"]),
    "image without id": (_drop("images.0.id"), ["images[0]: image has no id"]),
    "string annotation id": (_set("annotations.2.id", "x"), ["annotations[2]: annotation id 'x' must be a positive"]),
    "unknown image id": (_set("annotations.0.image_id", 9), ["annotation 1: image_id 9 names no image"]),
    "unknown category id": (_set("annotations.0.category_id", 5), ["annotation 1: category_id 5 names no category"]),
    "missing category id": (_drop("annotations.0.category_id"), ["annotation 1: category_id is missing"]),
    "empty category name": (_set("categories.0.name", " "), ["category 2: name ' ' must be a non-empty string"]),
    "duplicate category names": (_set("categories.1.name", "apple"), ["category 1: name 'apple' is already category 2"]),
    "missing width": (_drop("images.1.width"), ["image 2: width is missing"]),
    "fractional height": (_set("images.1.height", 56.5), ["image 2: height 56.5 must be a positive integer"]),
    "nowhere to find the image": (_drop("images.2.file_name"), ["image 3: has no absolute_url, coco_url or file_name"]),
    "two categories on one image": (lambda d: d["annotations"].append({"id": 4, "image_id": 3, "category_id": 2}),
                                    ["image 3 (c.png): has categories 'apple', 'banana'; a classifier takes exactly one"]),
    "image without a category": (lambda d: d["annotations"].pop(), ["image 3 (c.png): has no category annotation"]),
    "declared size differs": (_set("images.0.width", 65), ["image 1: a.png: width x height is declared 65x56, "
                                                           "but the image is 64x56 pixels"]),
    "image file missing": (_set("images.0.file_name", "gone.png"), ["image 1: gone.png: file not found"]),
}

DETECTION_CASES = {
    "pixel box": (_set("annotations.0.bbox", [10, 20, 30, 15]),
                  ["annotation 1: bbox [10, 20, 30, 15] has values above 1", "must be relative"]),
    "past the right edge": (_set("annotations.0.bbox", [0.5, 0.2, 0.7, 0.1]),
                            ["annotation 1: bbox [0.5, 0.2, 0.7, 0.1] ends past the image's right edge "
                             "(left + width = 1.2 > 1)"]),
    "past the bottom edge": (_set("annotations.2.bbox", [0.1, 0.6, 0.2, 0.5]),
                             ["annotation 3: bbox [0.1, 0.6, 0.2, 0.5] ends past the image's bottom edge "
                              "(top + height = 1.1 > 1)"]),
    "negative left": (_set("annotations.0.bbox", [-0.1, 0.2, 0.5, 0.4]), ["annotation 1: ", "left = -0.1 < 0"]),
    "zero width": (_set("annotations.1.bbox", [0.1, 0.2, 0, 0.4]), ["annotation 2: ", "has width 0; it must be positive"]),
    "three numbers": (_set("annotations.1.bbox", [0.1, 0.2, 0.3]), ["annotation 2: bbox [0.1, 0.2, 0.3] must be 4"]),
    "not numbers": (_set("annotations.1.bbox", ["a", 0.2, 0.3, 0.1]), ["annotation 2: ", "must be 4 finite numbers"]),
    "missing bbox": (_drop("annotations.2.bbox"), ["annotation 3: bbox is missing"]),
    "bad crowd flag": (_set("annotations.2.iscrowd", "maybe"), ["annotation 3: iscrowd: crowd flag 'maybe'"]),
}


@pytest.mark.parametrize("case", sorted(CLASSIFICATION_CASES))
def test_each_hostile_classification_file_is_refused_naming_the_file_and_the_id(folder: Path, case: str) -> None:
    change, parts = CLASSIFICATION_CASES[case]
    data = classification()
    change(data)
    coco = str(write(folder / "train.json", data))
    problems = refused([coco])
    named(problems, *parts)
    assert all(p.startswith(f"{coco}: ") for p in problems)


@pytest.mark.parametrize("case", sorted(DETECTION_CASES))
def test_each_hostile_detection_file_is_refused_naming_the_file_and_the_id(folder: Path, case: str) -> None:
    change, parts = DETECTION_CASES[case]
    data = detection()
    change(data)
    coco = str(write(folder / "train.json", data))
    problems = refused([coco], "imageObjectDetection")
    named(problems, *parts)
    assert all(p.startswith(f"{coco}: ") for p in problems)


@pytest.mark.parametrize("size", [(40, 40), (10_241, 50)])
def test_an_image_outside_the_training_limits_is_refused(folder: Path, size: tuple[int, int]) -> None:
    png(folder / "odd.png", size)
    data = classification()
    data["images"][0] = image(1, "odd.png", size)
    only(refused([str(write(folder / "train.json", data))]), "train.json: image 1: odd.png: image is "
         f"{size[0]}x{size[1]} pixels")


def test_a_file_that_is_not_an_image_is_refused(folder: Path) -> None:
    (folder / "a.png").write_text("not a picture")
    only(refused([str(write(folder / "train.json", classification()))]), "image 1: a.png: not a readable image")


@pytest.mark.parametrize("text, part", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                        ('{"images": [], "categories": []}', "'annotations' is missing"),
                                        ("[" * 100_000 + "]" * 100_000, "nested too deeply")])
def test_a_file_that_is_not_a_coco_object_is_refused(tmp_path: Path, text: str, part: str) -> None:
    coco = str(write(tmp_path / "train.json", text))
    assert only(refused([coco]), part).startswith(coco)


def test_every_problem_of_every_file_is_reported_at_once(folder: Path) -> None:
    bad = detection()
    bad["annotations"][0]["bbox"] = [0.5, 0.2, 0.7, 0.9]  # past the right and the bottom edge
    bad["annotations"][1]["category_id"] = 3
    bad["images"][1]["id"] = 1
    worse = detection()
    worse["annotations"][2]["bbox"] = [12, 30, 40, 40]
    one, two = str(write(folder / "one.json", bad)), str(write(folder / "two.json", worse))
    problems = refused([one, two, str(folder / "three.json")], "imageObjectDetection")
    assert len(problems) == 7, problems
    assert sum(p.startswith(f"{one}: ") for p in problems) == 5
    for part in ("image 1: duplicate id", "annotation 3: image_id 2 names no image", "right edge", "bottom edge",
                 "annotation 2: category_id 3 names no category"):
        named(problems, f"{one}: ", part)
    assert any(p.startswith(f"{two}: annotation 3: bbox [12, 30, 40, 40]") for p in problems)
    assert any(p.startswith(f"{folder / 'three.json'}: file not found") for p in problems)


def test_image_file_problems_are_reported_with_the_annotation_problems(folder: Path) -> None:
    data = detection()
    data["annotations"][0]["bbox"] = [0.5, 0.2, 0.7, 0.1]
    data["images"][1]["file_name"] = "gone.png"
    problems = refused([str(write(folder / "train.json", data))], "imageObjectDetection")
    assert len(problems) == 2
    named(problems, "annotation 1: ", "right edge")
    named(problems, "image 2: gone.png: file not found")


def test_problems_are_capped_with_a_count_of_the_rest(folder: Path) -> None:
    data = detection()
    data["annotations"] = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [5, 5, 5, 5]} for i in range(1, 151)]
    with pytest.raises(CocoProblems) as caught:
        read_coco_files([str(write(folder / "train.json", data))], "imageObjectDetection")
    assert len(caught.value.problems) == 101 and caught.value.problems[-1] == "… and 50 more"
    assert str(caught.value).startswith("150 problem(s) in the COCO files")


def test_a_file_over_200_mb_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "train.json"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    only(refused([str(huge)]), str(huge), "at most 209,715,200 bytes")


def test_a_file_with_over_a_million_annotations_is_refused(tmp_path: Path) -> None:
    text = '{"images": [], "categories": [], "annotations": [' + ",".join(["{}"] * 1_000_001) + "]}"
    only(refused([str(write(tmp_path / "train.json", text))]), "train.json: has 1,000,001 annotations; at most "
         "1,000,000")


# ---------------------------------------------------------------- the minimum to train


def test_few_images_problems_name_each_category_short_of_images_and_its_count(folder: Path) -> None:
    data = classification()
    data["categories"].append({"id": 3, "name": "cherry"})
    dataset = read_coco_files([str(write(folder / "train.json", data))], "imageClassification")
    assert few_images_problems(dataset) == ["category 'banana' has 1 image; at least 2 are needed",
                                            "category 'cherry' has 0 images; at least 2 are needed"]
    assert few_images_problems(dataset, minimum=1) == ["category 'cherry' has 0 images; at least 1 is needed"]


def test_few_images_problems_count_boxes_for_a_detector(folder: Path) -> None:
    dataset = read_coco_files([str(write(folder / "train.json", detection()))], "imageObjectDetection")
    assert few_images_problems(dataset) == ["category 'carton' has 1 box; at least 2 are needed"]


def test_a_classifier_of_one_category_is_short_of_categories() -> None:
    dataset = CocoDataset("imageClassification", [], ["apple"], {"apple": 5})
    assert few_images_problems(dataset) == ["a classifier needs at least 2 categories; the dataset has 1"]



def test_a_confined_read_refuses_local_files_outside_the_image_root(tmp_path):
    """What a server does with URIs its API users name: inside the root only, for COCO files and images."""
    inside = tmp_path / "root"
    inside.mkdir()
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    with pytest.raises(CocoProblems, match=r"elsewhere\.json lies outside the image root; refused"):
        read_coco_files([str(outside)], "imageClassification", image_root=inside, confined=True)
    with pytest.raises(CocoProblems, match="no image root is set; refused"):
        read_coco_files([str(outside)], "imageClassification", confined=True)
