"""Labelled data (models/data.py): JSONL and MLTable reading, image_url resolution, labels per
task, and the checks before training, each problem named by file, line and field (data.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from models.data.checks import check_training_set
from models.data.records import Box, LabelError
from models.data.jsonl import mltable_files, read_dataset, read_jsonl, resolve_image_url
from models.data.records import Dataset
from models.errors import DataError

CLASSES = "image_classification"
MULTILABEL = "image_classification_multilabel"
DETECTION = "image_object_detection"
SEGMENTATION = "image_instance_segmentation"

# data.md's examples, verbatim (the classification line with a full cloud URL for "...").
CLOUD = "azureml://subscriptions/sub-1/resourcegroups/rg/workspaces/ws/datastores/ds/paths/"
DOC_CLASSIFICATION = ('{"image_url": "' + CLOUD + 'image_data/Image_01.jpg", "image_details": {"format": "jpg", '
                      '"width": "400px", "height": "258px"}, "label": "can"}')
DOC_BOX = {"label": "can", "topX": 0.260, "topY": 0.406, "bottomX": 0.735, "bottomY": 0.701, "isCrowd": 0}
DOC_POLYGON = {"label": "can", "isCrowd": 0, "polygon": [[0.2, 0.3, 0.6, 0.25, 0.7, 0.8, 0.25, 0.75]]}


def write_image(path: Path, size: tuple[int, int] = (64, 64), colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """Dicts become JSON; strings are written as they are (for broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def label_for(task: str, i: int):
    name = ("can", "carton")[i % 2]
    if task == CLASSES:
        return name
    if task == MULTILABEL:
        return [name, "milk_bottle"] if i % 3 == 0 else [name]
    if task == DETECTION:
        return [{**DOC_BOX, "label": name}]
    return [{**DOC_POLYGON, "label": name}]


def dataset_lines(folder: Path, task: str, n: int = 10, prefix: str = "img") -> list[dict]:
    """`n` valid lines for `task`, with their 64x64 images in folder/images."""
    lines = []
    for i in range(n):
        write_image(folder / "images" / f"{prefix}{i:02d}.png")
        lines.append({"image_url": f"images/{prefix}{i:02d}.png", "image_details": {"format": "png"},
                      "label": label_for(task, i)})
    return lines


def problems_of(train: Dataset, validation: Dataset | None = None) -> list[str]:
    with pytest.raises(DataError) as info:
        check_training_set(train, validation)
    return info.value.problems


def only_record(dataset: Dataset):
    assert dataset.problems == [], dataset.problems
    assert len(dataset.records) == 1
    return dataset.records[0]


# ---------------------------------------------------------------- data.md examples, per task


def test_doc_classification_line_reads_label_and_maps_the_cloud_url_under_the_image_root(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [DOC_CLASSIFICATION])
    record = only_record(read_jsonl(path, CLASSES, image_root=tmp_path / "root"))
    assert record.label == "can"
    assert Path(record.image) == tmp_path / "root" / "image_data" / "Image_01.jpg"
    assert record.where == "train.jsonl:1"


def test_doc_multilabel_line_reads_a_list_of_names(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": ["can", "milk_bottle"]},
                                                  {"image_url": "b.jpg", "label": []}])
    dataset = read_jsonl(path, MULTILABEL)
    assert dataset.problems == []
    assert [r.label for r in dataset.records] == [("can", "milk_bottle"), ()]
    assert dataset.labels() == ["can", "milk_bottle"]


def test_doc_detection_box_reads_corners_and_crowd_flag(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": [DOC_BOX]}])
    record = only_record(read_jsonl(path, DETECTION))
    assert record.label == (Box("can", 0.260, 0.406, 0.735, 0.701, False, ()),)


def test_doc_segmentation_polygon_reads_segments_and_their_bounding_box(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": [DOC_POLYGON]}])
    (box,) = only_record(read_jsonl(path, SEGMENTATION)).label
    assert box.label == "can" and box.is_crowd is False
    assert box.polygons == ((0.2, 0.3, 0.6, 0.25, 0.7, 0.8, 0.25, 0.75),)
    assert (box.x0, box.y0, box.x1, box.y1) == (0.2, 0.25, 0.7, 0.8)


def test_segmentation_with_several_segments_keeps_them_all_in_one_instance(tmp_path):
    obj = {"label": "can", "polygon": [[0.1, 0.1, 0.3, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.5, 0.9, 0.9]]}
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": [obj]}])
    (box,) = only_record(read_jsonl(path, SEGMENTATION)).label
    assert len(box.polygons) == 2
    assert (box.x0, box.y0, box.x1, box.y1) == (0.1, 0.1, 0.9, 0.9)


def test_detection_image_without_objects_is_an_empty_list(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": []}])
    assert only_record(read_jsonl(path, DETECTION)).label == ()


# ---------------------------------------------------------------- tolerated variants


def test_label_as_single_dict_with_string_coordinates_is_a_one_box_list(tmp_path):
    single = {"label": "can", "topX": "0.1", "topY": "0.2", "bottomX": "0.5", "bottomY": "0.6", "isCrowd": "true"}
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": single}])
    assert only_record(read_jsonl(path, DETECTION)).label == (Box("can", 0.1, 0.2, 0.5, 0.6, True, ()),)


@pytest.mark.parametrize("value, crowd", [
    (True, True), (False, False), (1, True), (0, False), ("true", True), ("false", False),
    ("1", True), ("0", False), ("True", True),
])
def test_is_crowd_accepts_bool_int_and_strings(tmp_path, value, crowd):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": [{**DOC_BOX, "isCrowd": value}]}])
    assert only_record(read_jsonl(path, DETECTION)).label[0].is_crowd is crowd


def test_is_crowd_may_be_left_out(tmp_path):
    box = {k: v for k, v in DOC_BOX.items() if k != "isCrowd"}
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": [box]}])
    assert only_record(read_jsonl(path, DETECTION)).label[0].is_crowd is False


def test_is_crowd_with_another_value_is_a_problem_naming_the_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": [{**DOC_BOX, "isCrowd": "maybe"}]}])
    dataset = read_jsonl(path, DETECTION)
    assert dataset.records == []
    assert [str(p) for p in dataset.problems][0].startswith("train.jsonl:1: label[0].isCrowd: ")


@pytest.mark.parametrize("details", [
    {"format": "jpg", "width": "400px", "height": "258px"},
    {"format": "jpeg", "width": 400, "height": 258},
    {},
])
def test_image_details_with_px_strings_or_integers_are_accepted(tmp_path, details):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "image_details": details, "label": "can"}])
    assert only_record(read_jsonl(path, CLASSES)).label == "can"


def test_classification_label_as_one_element_list_is_the_class_name(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": ["can"]}])
    assert only_record(read_jsonl(path, CLASSES)).label == "can"


def test_multilabel_names_are_deduplicated_and_sorted(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": "a.jpg", "label": ["milk_bottle", "can", "can"]}])
    assert only_record(read_jsonl(path, MULTILABEL)).label == ("can", "milk_bottle")


def test_byte_order_mark_and_blank_lines_are_tolerated_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"image_url": "a.jpg", "label": "can"})
    path.write_bytes(("\ufeff" + good + "\n\n   \n" + '{"label": "can"}\n').encode("utf-8"))
    dataset = read_jsonl(path, CLASSES)
    assert [r.line for r in dataset.records] == [1]
    assert [str(p) for p in dataset.problems] == ["train.jsonl:4: image_url: missing or not a string"]


# ---------------------------------------------------------------- image_url resolution


def test_relative_image_url_is_relative_to_the_jsonl_folder(tmp_path):
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [{"image_url": "images/a.jpg", "label": "can"}])
    assert Path(only_record(read_jsonl(path, CLASSES)).image) == tmp_path / "data" / "images" / "a.jpg"
    # an image root is for cloud URLs; relative paths stay relative to the JSONL
    record = only_record(read_jsonl(path, CLASSES, image_root=tmp_path / "root"))
    assert Path(record.image) == tmp_path / "data" / "images" / "a.jpg"


def test_relative_image_url_with_parent_folder_resolves_from_the_jsonl_folder(tmp_path):
    image = write_image(tmp_path / "images" / "a.png")
    path = write_jsonl(tmp_path / "labels" / "train.jsonl", [{"image_url": "../images/a.png", "label": "can"}])
    assert Path(only_record(read_jsonl(path, CLASSES)).image).resolve() == image


def test_absolute_image_url_is_used_as_it_is(tmp_path):
    image = tmp_path / "elsewhere" / "a.jpg"
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [{"image_url": str(image), "label": "can"}])
    assert Path(only_record(read_jsonl(path, CLASSES, image_root=tmp_path / "root")).image) == image


def test_file_url_is_a_local_path(tmp_path):
    image = tmp_path / "my images" / "a.jpg"
    assert Path(resolve_image_url(image.as_uri(), tmp_path / "data", None)) == image  # file:///.../my%20images/a.jpg
    assert Path(resolve_image_url(f"file://{image}", tmp_path / "data", None)) == image
    assert Path(resolve_image_url(f"file://localhost{image}", tmp_path / "data", None)) == image


def test_file_url_with_a_relative_path_is_relative_to_the_jsonl_folder(tmp_path):
    base = tmp_path / "data"
    assert Path(resolve_image_url("file://./images/a.jpg", base, None)) == base / "images" / "a.jpg"


@pytest.mark.parametrize("url", [
    "azureml://subscriptions/s/resourcegroups/rg/workspaces/ws/datastores/ds/paths/image_data/sub/a.jpg",
    "AmlDatastore://image_data/sub/a.jpg",
    "amldatastore://image_data/sub/a.jpg",
    "https://account.blob.core.windows.net/container/image_data/sub/a.jpg",
])
def test_cloud_urls_map_under_the_image_root(tmp_path, url):
    root = tmp_path / "root"
    assert Path(resolve_image_url(url, tmp_path / "data", root)) == root / "image_data" / "sub" / "a.jpg"


def test_cloud_url_without_an_image_root_maps_under_the_jsonl_folder(tmp_path):
    url = CLOUD + "image_data/a.jpg"
    assert Path(resolve_image_url(url, tmp_path / "data", None)) == tmp_path / "data" / "image_data" / "a.jpg"


def test_cloud_url_with_escaped_characters_is_unquoted(tmp_path):
    url = CLOUD + "image%20data/a%2Bb.jpg"
    assert Path(resolve_image_url(url, tmp_path, tmp_path / "root")) == tmp_path / "root" / "image data" / "a+b.jpg"


@pytest.mark.parametrize("url, reaches", [
    (CLOUD + "/etc/shadow", "/etc/shadow"),  # azureml://.../paths//etc/shadow
    (CLOUD + "image_data/../../secret.jpg", "secret.jpg"),
    ("AmlDatastore://../etc/passwd", "etc/passwd"),
    ("s3://bucket/a/../../b.jpg", "b.jpg"),
    ("https://account.blob.core.windows.net/container/sub/%2e%2e/%2E%2E/c.jpg", "c.jpg"),
    ("gs://bucket/..", ""),
])
def test_a_cloud_url_that_climbs_out_of_the_image_root_is_refused(tmp_path, url, reaches):
    root = tmp_path / "root"
    mapped = reaches if reaches.startswith("/") else str(Path(tmp_path, reaches)).rstrip("/")
    with pytest.raises(LabelError, match=f"maps to {re.escape(mapped)}, outside the image root {re.escape(str(root))}"):
        resolve_image_url(url, tmp_path / "data", root)
    with pytest.raises(LabelError, match="outside .*the folder of the file naming it"):  # no image root: the same rule
        resolve_image_url(url, tmp_path / "data" / "deeper" / "still", None)


def test_a_cloud_url_may_use_dots_that_stay_inside_the_image_root(tmp_path):
    root = tmp_path / "root"
    assert Path(resolve_image_url(CLOUD + "a/../b/./c.jpg", tmp_path, root)).resolve() == root / "b" / "c.jpg"
    assert Path(resolve_image_url(CLOUD + "a//b.jpg", tmp_path, root)).resolve() == root / "a" / "b.jpg"


def test_training_data_names_the_line_of_a_cloud_url_that_escapes(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"image_url": CLOUD + "image_data/a.jpg", "label": "can"},
                                                  {"image_url": CLOUD + "/etc/shadow", "label": "can"},
                                                  {"image_url": "../images/b.jpg", "label": "can"},
                                                  {"image_url": "/elsewhere/c.jpg", "label": "can"}])
    dataset = read_jsonl(path, CLASSES, image_root=tmp_path / "root")
    assert [str(p) for p in dataset.problems] == [
        f"train.jsonl:2: image_url: {CLOUD}/etc/shadow maps to /etc/shadow, outside the image root {tmp_path / 'root'}; refused"]
    assert [r.line for r in dataset.records] == [1, 3, 4]  # relative and absolute paths are as before
    assert [r.image for r in dataset.records][1:] == [str(tmp_path / "../images/b.jpg"), "/elsewhere/c.jpg"]


def test_images_behind_cloud_urls_are_found_under_the_image_root(tmp_path):
    root = tmp_path / "root"
    lines = []
    for i in range(10):
        write_image(root / "image_data" / f"{i}.png")
        lines.append({"image_url": f"{CLOUD}image_data/{i}.png", "label": ("can", "carton")[i % 2]})
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", lines), CLASSES, image_root=root)
    check_training_set(train, None)  # no problem: every image is found


# ---------------------------------------------------------------- MLTable


MLTABLE = """\
paths:
  - file: ./train_annotations.jsonl
transformations:
  - read_json_lines:
        encoding: utf8
        invalid_lines: {invalid}
        include_path_column: false
  - convert_column_types:
      - columns: image_url
        column_type: stream_info
"""


def write_mltable(folder: Path, lines: list, invalid: str = "error") -> Path:
    write_jsonl(folder / "train_annotations.jsonl", lines)
    (folder / "MLTable").write_text(MLTABLE.format(invalid=invalid))
    return folder


def test_mltable_folder_as_in_data_md_is_read(tmp_path):
    folder = write_mltable(tmp_path / "train-mltable", dataset_lines(tmp_path / "train-mltable", DETECTION))
    dataset = read_dataset(folder, DETECTION)
    assert dataset.problems == [] and dataset.warnings == []
    assert len(dataset.records) == 10
    assert Path(dataset.records[0].image) == folder / "images" / "img00.png"
    assert dataset.records[0].where == "train_annotations.jsonl:1"
    assert dataset.labels() == ["can", "carton"]
    check_training_set(dataset, None)


def test_mltable_file_itself_may_be_named(tmp_path):
    folder = write_mltable(tmp_path / "t", [{"image_url": "a.jpg", "label": "can"}])
    assert len(read_dataset(folder / "MLTable", CLASSES).records) == 1


def test_mltable_invalid_lines_error_makes_bad_lines_problems(tmp_path):
    folder = write_mltable(tmp_path / "t", [{"image_url": "a.jpg", "label": "can"}, "{not json"])
    dataset = read_dataset(folder, CLASSES)
    assert len(dataset.records) == 1
    assert [str(p) for p in dataset.problems][0].startswith("train_annotations.jsonl:2: not valid JSON")
    assert dataset.warnings == []


def test_mltable_invalid_lines_drop_turns_bad_lines_into_warnings_not_silence(tmp_path):
    lines = dataset_lines(tmp_path / "t", CLASSES, n=10)
    lines[3] = "{not json"
    lines[6] = {"image_url": "images/img06.png"}  # no label
    folder = write_mltable(tmp_path / "t", lines, invalid="drop")
    dataset = read_dataset(folder, CLASSES)
    assert dataset.problems == []
    assert len(dataset.records) == 8
    warnings = [str(w) for w in dataset.warnings]
    assert len(warnings) == 2
    assert warnings[0].startswith("train_annotations.jsonl:4: not valid JSON")
    assert warnings[1] == "train_annotations.jsonl:7: label: missing"
    # dropped lines still count against the minimum number of images
    assert any("8 image(s); at least 10" in p for p in problems_of(dataset))


def test_mltable_whose_lines_are_all_dropped_is_still_an_error(tmp_path):
    folder = write_mltable(tmp_path / "t", ["{bad", "{worse"], invalid="drop")
    dataset = read_dataset(folder, CLASSES)
    assert len(dataset.warnings) == 2
    assert any("no images listed" in str(p) for p in dataset.problems)


@pytest.mark.parametrize("paths", ["paths: [train_annotations.jsonl]\n",
                                   "paths:\n  - train_annotations.jsonl\n"])
def test_mltable_plain_string_path_entries_are_refused_naming_the_file_line_and_entry(tmp_path, paths):
    folder = write_mltable(tmp_path / "t", [{"image_url": "a.jpg", "label": "can"}])
    (folder / "MLTable").write_text("# written by hand\n" + paths)
    [problem] = [str(p) for p in read_dataset(folder, CLASSES).problems]
    line = 2 if paths.startswith("paths: [") else 3
    assert problem.startswith(f"{folder / 'MLTable'}:{line}: paths[0]: 'train_annotations.jsonl' is a plain string")
    assert "write `- file: train_annotations.jsonl`" in problem
    with pytest.raises(DataError) as info:  # what batch scoring reads: the same problem, raised
        mltable_files(folder)
    assert info.value.problems == [problem] and str(folder) in str(info.value)


def test_mltable_entries_that_are_not_paths_and_broken_yaml_are_problems_not_silence(tmp_path):
    folder = write_mltable(tmp_path / "t", [{"image_url": "a.jpg", "label": "can"}])
    spec = folder / "MLTable"
    spec.write_text("paths:\n  - file: ./train_annotations.jsonl\n  - path: other.jsonl\n")
    dataset = read_dataset(folder, CLASSES)
    assert len(dataset.records) == 1  # the good entry is still read
    assert [str(p) for p in dataset.problems] == [
        f"{spec}:3: paths[1]: {{'path': 'other.jsonl'}} is not a path entry; use `- file: ...`, "
        "`- pattern: ...` or `- folder: ...`"]
    spec.write_text("paths: train_annotations.jsonl\n")
    assert str(read_dataset(folder, CLASSES).problems[0]).startswith(f"{spec}: paths: must be a list of entries")
    spec.write_text("paths:\n  - file: [\n")
    assert str(read_dataset(folder, CLASSES).problems[0]).startswith(f"{spec}:3: not valid YAML")


def test_folder_without_mltable_file_is_a_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    dataset = read_dataset(tmp_path / "empty", CLASSES)
    assert dataset.records == []
    assert "no MLTable file" in str(dataset.problems[0])


def test_missing_jsonl_file_is_a_problem(tmp_path):
    dataset = read_dataset(tmp_path / "nope.jsonl", CLASSES)
    assert "file not found" in str(dataset.problems[0])


# ---------------------------------------------------------------- validation: file, line, field


def read_with_line(tmp_path: Path, task: str, line_no: int, line) -> Dataset:
    """A valid 10-image dataset for `task` whose line `line_no` (1-based) is replaced."""
    lines = dataset_lines(tmp_path, task, n=10)
    lines[line_no - 1] = line
    return read_dataset(write_jsonl(tmp_path / "train.jsonl", lines), task)


@pytest.mark.parametrize("task", [CLASSES, MULTILABEL, DETECTION, SEGMENTATION])
def test_valid_dataset_of_ten_images_passes_for_every_task(tmp_path, task):
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", dataset_lines(tmp_path, task)), task)
    validation = read_dataset(write_jsonl(tmp_path / "val.jsonl", dataset_lines(tmp_path, task, 3, "v")), task)
    check_training_set(train, validation)


def test_coordinate_outside_0_1_is_named_by_file_line_and_field(tmp_path):
    train = read_with_line(tmp_path, DETECTION, 3, {"image_url": "images/img02.png",
                                                    "label": [DOC_BOX, {**DOC_BOX, "bottomY": 1.2}]})
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:3: label[1].bottomY: ")
    assert "outside [0, 1]" in problem


def test_pixel_coordinates_are_rejected_as_outside_0_1(tmp_path):
    train = read_with_line(tmp_path, DETECTION, 2, {"image_url": "images/img01.png",
                                                    "label": [{**DOC_BOX, "topX": 26, "bottomX": 73}]})
    assert problems_of(train)[0].startswith("train.jsonl:2: label[0].topX: ")


def test_top_x_greater_than_bottom_x_is_named(tmp_path):
    train = read_with_line(tmp_path, DETECTION, 5, {"image_url": "images/img04.png",
                                                    "label": [{**DOC_BOX, "topX": 0.8, "bottomX": 0.2}]})
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:5: label[0].topX: ")
    assert "not less than bottomX" in problem


def test_non_numeric_coordinate_is_named(tmp_path):
    train = read_with_line(tmp_path, DETECTION, 1, {"image_url": "images/img00.png",
                                                    "label": [{**DOC_BOX, "topY": "abc"}]})
    assert problems_of(train)[0].startswith("train.jsonl:1: label[0].topY: ")


def test_polygon_with_odd_number_of_values_is_named(tmp_path):
    bad = {"label": "can", "polygon": [[0.1, 0.1, 0.5, 0.1, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]]}
    train = read_with_line(tmp_path, SEGMENTATION, 4, {"image_url": "images/img03.png", "label": [bad]})
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:4: label[0].polygon[1]: ")
    assert "odd number of values" in problem


def test_polygon_coordinate_outside_0_1_is_named(tmp_path):
    bad = {"label": "can", "polygon": [[0.1, 0.1, 1.5, 0.1, 0.5, 0.5]]}
    train = read_with_line(tmp_path, SEGMENTATION, 2, {"image_url": "images/img01.png", "label": [bad]})
    assert problems_of(train)[0].startswith("train.jsonl:2: label[0].polygon[0][2]: ")


def test_segmentation_object_without_polygon_is_named(tmp_path):
    train = read_with_line(tmp_path, SEGMENTATION, 6, {"image_url": "images/img05.png", "label": [DOC_BOX]})
    assert problems_of(train)[0].startswith("train.jsonl:6: label[0].polygon: ")


def test_unknown_label_in_validation_data_is_named_by_validation_file_line_and_field(tmp_path):
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", dataset_lines(tmp_path, DETECTION)), DETECTION)
    val_lines = dataset_lines(tmp_path, DETECTION, 3, "v")
    val_lines[1]["label"] = [DOC_BOX, {**DOC_BOX, "label": "water_bottle"}]
    validation = read_dataset(write_jsonl(tmp_path / "val.jsonl", val_lines), DETECTION)
    (problem,) = problems_of(train, validation)
    assert problem.startswith("val.jsonl:2: label[1]: 'water_bottle' is not a label of the training data")


def test_unknown_class_in_multiclass_validation_data_is_named(tmp_path):
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", dataset_lines(tmp_path, CLASSES)), CLASSES)
    val_lines = dataset_lines(tmp_path, CLASSES, 3, "v")
    val_lines[2]["label"] = "water_bottle"
    validation = read_dataset(write_jsonl(tmp_path / "val.jsonl", val_lines), CLASSES)
    assert problems_of(train, validation) == [
        "val.jsonl:3: label: 'water_bottle' is not a label of the training data (can, carton)"]


def test_missing_image_is_named(tmp_path):
    train = read_with_line(tmp_path, CLASSES, 7, {"image_url": "images/gone.png", "label": "can"})
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:7: image_url: image not found: ")
    assert "gone.png" in problem


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png" * 4)
    train = read_with_line(tmp_path, CLASSES, 8, {"image_url": "images/corrupt.png", "label": "can"})
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:8: image_url: ")
    assert "corrupt.png" in problem


def test_truncated_png_is_named_instead_of_crashing_the_check(tmp_path):
    full = write_image(tmp_path / "full.png", (80, 80))
    data = full.read_bytes()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    train = read_with_line(tmp_path, CLASSES, 9, {"image_url": "images/cut.png", "label": "can"})
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:9: image_url: ")
    assert "truncated" in problem


def test_image_smaller_than_50x50_is_named(tmp_path):
    write_image(tmp_path / "images" / "tiny.png", (49, 60))
    train = read_with_line(tmp_path, CLASSES, 10, {"image_url": "images/tiny.png", "label": "can"})
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:10: image_url: ")
    assert "49x60" in problem and "at least 50x50" in problem


def test_fewer_than_ten_images_is_rejected(tmp_path):
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", dataset_lines(tmp_path, CLASSES, n=9)), CLASSES)
    (problem,) = problems_of(train)
    assert problem.startswith(str(tmp_path / "train.jsonl"))
    assert "9 image(s); at least 10 are needed" in problem


def test_invalid_json_line_is_named(tmp_path):
    train = read_with_line(tmp_path, CLASSES, 4, '{"image_url": "images/img03.png", "label": "can"')
    (problem,) = problems_of(train)
    assert problem.startswith("train.jsonl:4: not valid JSON")


def test_line_that_is_not_an_object_is_named(tmp_path):
    train = read_with_line(tmp_path, CLASSES, 2, '["images/img01.png", "can"]')
    assert problems_of(train)[0].startswith("train.jsonl:2: expected a JSON object")


def test_missing_image_url_is_named(tmp_path):
    train = read_with_line(tmp_path, CLASSES, 3, {"label": "can"})
    assert problems_of(train) == ["train.jsonl:3: image_url: missing or not a string"]


def test_missing_label_is_named(tmp_path):
    train = read_with_line(tmp_path, CLASSES, 5, {"image_url": "images/img04.png"})
    assert problems_of(train) == ["train.jsonl:5: label: missing"]


@pytest.mark.parametrize("task, label", [
    (CLASSES, ""), (CLASSES, 3), (MULTILABEL, [1, 2]), (DETECTION, "can"), (DETECTION, [{"topX": 0.1}]),
])
def test_label_of_the_wrong_shape_for_the_task_is_named(tmp_path, task, label):
    train = read_with_line(tmp_path, task, 2, {"image_url": "images/img01.png", "label": label})
    assert problems_of(train)[0].startswith("train.jsonl:2: label")


def test_several_problems_in_one_file_are_all_reported_in_one_error(tmp_path):
    lines = dataset_lines(tmp_path, DETECTION, n=12)
    lines[1] = {"image_url": "images/img01.png", "label": [{**DOC_BOX, "topX": 1.5}]}
    lines[3] = "{broken"
    lines[4] = {"label": [DOC_BOX]}
    lines[6] = {"image_url": "images/img06.png", "label": [{**DOC_BOX, "topY": 0.9, "bottomY": 0.1}]}
    lines[8] = {"image_url": "images/img08.png"}
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", lines), DETECTION)
    with pytest.raises(DataError) as info:
        check_training_set(train, None)
    problems = info.value.problems
    assert [p.split(": ")[0] for p in problems] == [f"train.jsonl:{n}" for n in (2, 4, 5, 7, 9)]
    assert "5 problem(s)" in str(info.value)
    for line in (2, 4, 5, 7, 9):
        assert f"train.jsonl:{line}:" in str(info.value)


def test_image_problems_are_reported_together_with_line_problems(tmp_path):
    lines = dataset_lines(tmp_path, CLASSES, n=12)
    lines[0] = "{broken"
    lines[5] = {"image_url": "images/gone.png", "label": "can"}
    write_image(tmp_path / "images" / "tiny.png", (20, 20))
    lines[10] = {"image_url": "images/tiny.png", "label": "carton"}
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", lines), CLASSES)
    problems = problems_of(train)
    assert [p.split(": ")[0] for p in problems] == ["train.jsonl:1", "train.jsonl:6", "train.jsonl:11"]


def test_problems_in_training_and_validation_files_are_reported_together(tmp_path):
    train_lines = dataset_lines(tmp_path, CLASSES)
    train_lines[2] = {"image_url": "images/img02.png"}
    val_lines = dataset_lines(tmp_path, CLASSES, 3, "v")
    val_lines[0] = "nope"
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", train_lines), CLASSES)
    validation = read_dataset(write_jsonl(tmp_path / "val.jsonl", val_lines), CLASSES)
    problems = problems_of(train, validation)
    assert [p.split(": ")[0] for p in problems] == ["train.jsonl:3", "val.jsonl:1"]


def test_multiclass_dataset_with_one_class_is_rejected(tmp_path):
    lines = dataset_lines(tmp_path, CLASSES)
    for line in lines:
        line["label"] = "can"
    train = read_dataset(write_jsonl(tmp_path / "train.jsonl", lines), CLASSES)
    (problem,) = problems_of(train)
    assert "only one class (can)" in problem and "at least 2" in problem


def test_data_error_lists_every_problem_in_its_message(tmp_path):
    error = DataError(["a.jsonl:1: label: x", "a.jsonl:2: label: y"], "the training data")
    assert str(error).splitlines() == ["2 problem(s) in the training data:", "  - a.jsonl:1: label: x",
                                       "  - a.jsonl:2: label: y"]
    assert isinstance(error, ValueError)


def test_synthetic_dataset_passes_the_checks(synth):
    data = synth(DETECTION, images=16)
    train = read_dataset(data.train_jsonl, DETECTION)
    validation = read_dataset(data.validation_jsonl, DETECTION)
    check_training_set(train, validation)
    assert set(train.labels()) <= set(data.labels)
