"""The one confinement rule (models.data.locations): real paths, links followed, any scheme; used by JSONL data,
COCO registration and training, the hub's analyze URLs and batch scoring's --image-root alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from models.data.locations import Refused, candidates, inside, locate


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An image root with one image inside, a secret outside, and a link inside the root that leads to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "in.png")
    Image.new("RGB", (64, 64), (10, 10, 200)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "door")
    return {"root": root, "outside": outside}


@pytest.mark.parametrize("url", ["link.png", "door/secret.png", "file://{root}/link.png",
                                 "https://acct.blob.core.windows.net/c/link.png", "azureml://ws/paths/door/secret.png",
                                 "../outside/secret.png", "{outside}/secret.png"])
def test_a_confined_read_refuses_anything_whose_real_path_leaves_the_root(tree, url):
    url = url.format(**tree)
    with pytest.raises(Refused, match="outside"):
        locate(url, tree["root"], tree["root"], confined=True)


def test_a_cloud_url_through_a_link_inside_the_root_is_refused_even_unconfined(tree):
    """JSONL training data and batch scoring: a user's own paths are theirs, but a cloud URL always stays inside."""
    assert locate("in.png", tree["root"], tree["root"]) == str(tree["root"] / "in.png")
    with pytest.raises(Refused, match="lies outside the image root"):
        locate("https://acct.blob.core.windows.net/c/door/secret.png", tree["root"], tree["root"])


@pytest.mark.parametrize("url", ["foo://host/../../etc/passwd", "gopher://x/in.png", "javascript:alert(1)"])
def test_a_url_of_an_unknown_scheme_is_refused_not_read_as_a_path(tree, url):
    with pytest.raises(Refused, match="unknown URL scheme"):
        candidates(url, tree["root"], tree["root"])


@pytest.mark.parametrize("url", ["", "   ", "in\x00.png"])
def test_an_empty_url_or_one_with_a_nul_byte_is_refused(tree, url):
    with pytest.raises(Refused):
        locate(url, tree["root"], tree["root"], confined=True)


def test_a_blob_url_maps_the_same_wherever_it_is_read(tree):
    """`;` parameters, a SAS query and a fragment: one parser, one answer (the query never part of the path)."""
    url = "https://acct.blob.core.windows.net/c/in.png?sv=2020&sig=SECRET#frag"
    assert locate(url, tree["root"], tree["root"], confined=True) == str(tree["root"] / "in.png")
    odd = "https://acct.blob.core.windows.net/c/in.png;v=1"
    assert candidates(odd, tree["root"], tree["root"])[0] == str(tree["root"] / "in.png;v=1")


def test_inside_follows_links_on_both_sides(tree, tmp_path):
    os.symlink(tree["root"], tmp_path / "root-link")
    assert inside(tmp_path / "root-link", tree["root"] / "in.png")
    assert not inside(tree["root"], tree["root"] / "link.png")


def test_coco_registration_refuses_an_image_linked_from_outside_the_root(tree):
    from models.data.coco_files import CocoProblems, read_coco_files

    coco = {"images": [{"id": 1, "file_name": "in.png", "width": 64, "height": 64},
                       {"id": 2, "file_name": "link.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 2, "category_id": 2}],
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}
    (tree["root"] / "train.json").write_text(json.dumps(coco))
    with pytest.raises(CocoProblems, match="image 2: link.png lies outside the image root"):
        read_coco_files([str(tree["root"] / "train.json")], "imageClassification", image_root=tree["root"],
                        confined=True)


def test_batch_scoring_inputs_refuse_a_cloud_url_that_leaves_the_image_root(tree, tmp_path):
    from models.errors import DataError
    from serving.batch.inputs import list_inputs

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image_url": u}) for u in (
        "azureml://ws/paths/in.png", "azureml://ws/paths/door/secret.png")) + "\n")
    with pytest.raises(DataError, match="in.jsonl:2: image_url: .* lies outside the image root"):
        list_inputs(jsonl, tree["root"])
