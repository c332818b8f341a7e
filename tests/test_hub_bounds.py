"""The hub's bounds, on its own parts with real files (no Ray): a big dataset is indexed once and paged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from PIL import Image


def _big_dataset(folder: Path, images: int) -> Path:
    """A classification COCO file of `images` PNGs of the smallest size training takes (two categories)."""
    folder.mkdir()
    entries, annotations = [], []
    for i in range(images):
        path = folder / f"{i}.png"
        Image.new("RGB", (50, 50), (i % 256, 0, 0)).save(path)
        entries.append({"id": i + 1, "width": 50, "height": 50, "file_name": path.name, "absolute_url": str(path)})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": i % 2 + 1})
    coco = folder / "coco.json"
    coco.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return coco


def test_a_big_dataset_is_indexed_once_and_a_page_reads_only_its_rows(tmp_path):
    from serving.hub.browse import DatasetViews

    coco = _big_dataset(tmp_path / "big", 2000)
    record = {"name": "big", "annotationKind": "imageClassification", "annotationFileUris": [str(coco)],
              "eTag": '"1"'}
    views = DatasetViews(str(tmp_path))
    first = views.contents(record, 0, 60)
    assert first["valid"] and first["images"]["total"] == 2000 and first["counts"] == {"a": 1000, "b": 1000}

    Image.new("RGB", (51, 51)).save(tmp_path / "big" / "1500.png")  # an image off the next page changes alone
    started = time.perf_counter()
    page = views.contents(record, 1000, 60)
    assert time.perf_counter() - started < 0.5
    assert [row["name"] for row in page["images"]["value"]] == [f"{i}.png" for i in range(1000, 1060)]
    assert page["valid"]  # the index was not made again: no image header off the page was opened

    os.utime(coco)  # a COCO file changed: indexed again, every header checked
    again = views.contents(record, 1000, 60)
    assert not again["valid"] and again["problems"][0]["imageId"] == 1501


def test_the_dataset_views_keep_the_indexes_of_a_few_datasets_only(tmp_path):
    from serving.hub.browse import DatasetViews

    coco = _big_dataset(tmp_path / "small", 4)
    views = DatasetViews(str(tmp_path), keep=2)
    for n in range(5):
        views.contents({"name": f"d{n}", "annotationKind": "imageClassification",
                        "annotationFileUris": [str(coco)], "eTag": '"1"'}, 0, 4)
    assert list(views._indexes) == ["d3", "d4"]
