"""Batch scoring on Ray Data (`serving.batch`): inputs, output schema and order, bad images,
`--set` overrides, and resuming after a `kill -9`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from models.errors import DataError
from models.errors import SettingsError
from serving.batch import run as batch
from serving.batch.inputs import list_inputs
from serving.batch.run import score
from serving.cli import main


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _png(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)
    return path


def _check_classification(line: dict, labels: list[str]) -> None:
    assert set(line) == {"image", "probs", "labels"}, line
    assert line["labels"] == labels and len(line["probs"]) == len(labels)
    assert abs(sum(line["probs"]) - 1) < 1e-3


def _check_detection(line: dict, labels: list[str]) -> None:
    assert set(line) == {"image", "boxes"}, line
    for box in line["boxes"]:
        assert box["label"] in labels and 0 <= box["score"] <= 1
        b = box["box"]
        assert 0 <= b["topX"] < b["bottomX"] <= 1 and 0 <= b["topY"] < b["bottomY"] <= 1


def _no_ray(*_args, **_kwargs):
    raise AssertionError("Ray must not be needed here")


# ---------------------------------------------------------------- listing (no Ray, no model)


def test_list_folder_recursive_images_only(tmp_path):
    for name in ("b/2.JPG", "a.png", "b/1.webp", "c/d/3.jfif"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"listing does not read the files")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "labels.jsonl").write_text("{}\n")
    keys = [item.key for item in list_inputs(tmp_path / "in")]
    assert keys == [str(tmp_path / "in" / n) for n in ("a.png", "b/1.webp", "b/2.JPG", "c/d/3.jfif")]


@pytest.mark.parametrize("fmt, suffix", [("ICO", ".ico"), ("MPO", ".mpo"), ("GIF", ".gif"), ("TIFF", ".tif"),
                                          ("BMP", ".bmp"), ("WEBP", ".webp"), ("JPEG", ".jpe")])
def test_every_format_the_spec_lists_is_found_in_a_folder_and_decodes(tmp_path, fmt, suffix):
    from models.data.images import decode

    path = tmp_path / "in" / f"image{suffix}"
    path.parent.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, format=fmt)
    [item] = list_inputs(tmp_path / "in")
    assert item.path == str(path)
    assert decode(path.read_bytes()).size == (64, 64)


def test_list_jsonl_and_mltable_keep_order_and_dedupe(tmp_path):
    urls = ["images/b.png", "images/a.png", "images/b.png", "/abs/c.png"]
    jsonl = tmp_path / "data" / "score.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"image_url": u}) + "\n" for u in urls))  # no labels needed
    items = list_inputs(jsonl)
    assert [i.key for i in items] == ["images/b.png", "images/a.png", "/abs/c.png"]
    assert items[0].path == str(tmp_path / "data" / "images/b.png") and items[2].path == "/abs/c.png"
    (tmp_path / "data" / "MLTable").write_text("paths:\n  - file: ./score.jsonl\n")
    assert list_inputs(tmp_path / "data") == items
    jsonl.write_text(json.dumps({"image_url": "azureml://datastores/d/paths/x/y.png", "label": "anything"}) + "\n")
    assert list_inputs(jsonl, image_root=tmp_path / "root")[0].path == str(tmp_path / "root" / "x" / "y.png")


def test_bad_inputs_fail_with_clear_messages(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"image_url": "a.png"}\n{"label": "cat"}\nnot json\n')
    with pytest.raises(DataError, match=r"(?s)bad.jsonl:2: image_url.*bad.jsonl:3: not valid JSON"):
        list_inputs(jsonl)
    with pytest.raises(FileNotFoundError):
        list_inputs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_inputs(tmp_path / "empty")


# ---------------------------------------------------------------- scoring


@pytest.mark.slow
def test_unknown_set_name_fails_fast(trained, tmp_path, monkeypatch, capsys):
    result, data = trained("image_classification")
    monkeypatch.setattr(batch, "ensure_ray", _no_ray)
    out = tmp_path / "predictions.jsonl"
    code = main(["score", str(result.model_dir), "--input", str(data.images_dir), "--output", str(out),
                 "--set", "valid_crop_sise=64"])
    assert code == 2
    err = capsys.readouterr().err
    assert "valid_crop_sise" in err and "--set" in err and "valid_crop_size" in err  # named, with a suggestion
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()
    with pytest.raises(SettingsError, match="box_score_thresh"):  # a detector setting on a classifier
        score(result.model_dir, data.images_dir, out, params={"box_score_thresh": "0.5"})


@pytest.mark.slow
def test_classifier_folder_corrupt_image_and_rerun(ray_session, trained, tmp_path, capsys):
    result, data = trained("image_classification")
    folder = tmp_path / "in"
    shutil.copytree(data.images_dir, folder / "nested")
    (folder / "corrupt.png").write_bytes(b"not a png at all")
    _png(folder / "tiny.png", (8, 8))
    out = tmp_path / "predictions.jsonl"
    summary = score(result.model_dir, folder, out, progress=False)
    lines = _lines(out)
    expected = [str(folder / "corrupt.png")] + sorted(str(p) for p in (folder / "nested").iterdir()) + \
               [str(folder / "tiny.png")]
    assert [line["image"] for line in lines] == expected
    assert lines[0]["error"]["row"] == 0 and lines[0]["error"]["code"]
    assert lines[-1]["error"]["row"] == len(expected) - 1 and "image" in lines[-1]["error"]["message"]
    truth = {Path(x["image_url"]).name: x["label"] for x in _lines(data.train_jsonl)}
    for line in lines[1:-1]:
        _check_classification(line, data.labels)
        best = line["labels"][line["probs"].index(max(line["probs"]))]
        assert best == truth[Path(line["image"]).name]  # the model memorised its training images
    assert (summary.images, summary.errors, summary.scored, summary.skipped) == (len(expected), 2, len(expected), 0)
    assert summary.output == out and summary.seconds > 0 and summary.images_per_s > 0
    assert not out.with_name(out.name + ".parts").exists()

    before = out.read_bytes(), out.stat().st_mtime_ns
    capsys.readouterr()
    again = score(result.model_dir, folder, out, progress=False)  # a finished run: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before and again.scored == 0 and again.errors == 2
    _png(folder / "new.png")
    with pytest.raises(ValueError, match="lacks 1 of the"):  # a different input needs --overwrite
        score(result.model_dir, folder, out, progress=False)


@pytest.mark.slow
def test_classifier_jsonl_then_mltable_overwrite(ray_session, trained, tmp_path, capsys):
    result, data = trained("image_classification")
    source = _lines(data.train_jsonl)[::-1]  # not sorted: the output must follow the input
    source.insert(3, {"image_url": "images/missing.png"})
    source.insert(5, {"image_url": "corrupt.jpg"})
    source.append(source[0])  # listed twice: scored once
    shutil.copytree(data.images_dir, tmp_path / "images")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    jsonl = tmp_path / "score.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in source))
    out = tmp_path / "out" / "predictions.jsonl"
    out.parent.mkdir()
    code = main(["score", str(result.model_dir), "--input", str(jsonl), "--output", str(out), "--batch-size", "4",
                 "--concurrency", "1", "--no-progress"])
    assert code == 0
    lines = _lines(out)
    assert [line["image"] for line in lines] == [x["image_url"] for x in source[:-1]]
    assert lines[3]["error"]["code"] == "missing" and "missing.png" in lines[3]["error"]["message"]
    assert lines[3]["error"]["row"] == 3 and lines[5]["error"]["row"] == 5
    for i, line in enumerate(lines):
        if i not in (3, 5):
            _check_classification(line, data.labels)
    first = out.read_text()

    (tmp_path / "MLTable").write_text("paths:\n  - file: ./score.jsonl\n")
    capsys.readouterr()
    assert main(["score", str(result.model_dir), "--input", str(tmp_path), "--output", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().err  # the same images: already complete
    assert main(["score", str(result.model_dir), "--input", str(tmp_path), "--output", str(out), "--overwrite",
                 "--no-progress"]) == 0
    assert f"scored {len(source) - 1} " in capsys.readouterr().err
    assert out.read_text() == first


@pytest.mark.slow
def test_detector_boxes_and_set_threshold(ray_session, trained, tmp_path):
    result, data = trained("image_object_detection")
    default, strict = tmp_path / "default.jsonl", tmp_path / "strict.jsonl"
    score(result.model_dir, data.train_jsonl, default, progress=False)
    assert main(["score", str(result.model_dir), "--input", str(data.train_jsonl), "--output", str(strict),
                 "--set", "box_score_thresh=0.99", "--no-progress"]) == 0
    loose, tight = _lines(default), _lines(strict)
    assert [x["image"] for x in loose] == [x["image"] for x in tight] == \
           [x["image_url"] for x in _lines(data.train_jsonl)]
    for line in loose + tight:
        _check_detection(line, data.labels)
    assert all(box["score"] >= 0.99 for line in tight for box in line["boxes"])
    assert sum(len(x["boxes"]) for x in tight) < sum(len(x["boxes"]) for x in loose)
    assert all(line["boxes"] for line in loose)  # it memorised its training images


@pytest.mark.slow
def test_gpu_actors_without_gpus_fail_clearly(ray_session, trained, tmp_path):
    result, data = trained("image_classification")
    with pytest.raises(ValueError, match="has 0 GPUs"):
        score(result.model_dir, data.images_dir, tmp_path / "p.jsonl", num_gpus_per_actor=1, progress=False)


@pytest.mark.slow
def test_resume_after_kill_9(ray_session, trained, synth, tmp_path, capsys):
    result, _ = trained("image_classification")
    data = synth("image_classification", images=60, size=(640, 480), seed=1, validation_fraction=0.0)
    out = tmp_path / "predictions.jsonl"
    parts = out.with_name(out.name + ".parts")
    address = ray_session.get_runtime_context().gcs_address  # join the session's Ray: no second start-up
    command = [sys.executable, "-m", "serving.batch", "score", str(result.model_dir), "--input", str(data.images_dir),
               "--output", str(out), "--part-size", "4", "--batch-size", "2", "--concurrency", "1",
               "--address", address, "--no-progress"]
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while not list(parts.glob("part-*.jsonl")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    done = list(parts.glob("part-*.jsonl"))
    assert done and not out.exists()  # killed mid-run: some parts, no output yet
    assert all(json.loads(line) for part in done for line in part.read_text().splitlines())  # whole lines only

    with pytest.raises(ValueError, match="other settings"):  # parts of other settings are never mixed in
        score(result.model_dir, data.images_dir, out, params={"valid_resize_size": "72"}, progress=False)
    capsys.readouterr()
    summary = score(result.model_dir, data.images_dir, out, batch_size=8, part_size=4, progress=False)
    assert f"resuming: {summary.skipped} of 60" in capsys.readouterr().err
    assert summary.skipped == 4 * len(done) and summary.skipped + summary.scored == 60
    lines = _lines(out)
    assert [line["image"] for line in lines] == sorted(str(p) for p in data.images_dir.iterdir())
    for line in lines:
        _check_classification(line, data.labels)
    assert summary.images == 60 and summary.errors == 0 and not parts.exists()
