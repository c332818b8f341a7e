"""Batch scoring on Ray Data (`serving.batch`): inputs, output schema and order, bad images and
special files, `--set` overrides, stale results of another model or settings, resuming after a
`kill -9`, and a second run on the same output."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import DataError
from models.errors import SettingsError
from serving.batch import run as batch
from serving.batch.files import OutputBusy, OutputLock, atomic_write, fsync_dir, remove_temps
from serving.batch.inputs import list_inputs, read_image
from serving.batch.parts import fingerprint, output_manifest
from serving.batch.run import score
from serving.cli import main
from serving.loading import ModelFolder


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


def test_cloud_urls_that_escape_the_image_root_are_refused_with_file_and_line(tmp_path):
    jsonl = tmp_path / "data" / "score.jsonl"
    jsonl.parent.mkdir()
    root = tmp_path / "root"
    urls = ["azureml://x/paths/ok/a.png", "azureml://x/paths//etc/shadow", "AmlDatastore://../../etc/passwd",
            "s3://bucket/a/../../secret.png", "relative/../b.png", "/abs/c.png"]
    jsonl.write_text("".join(json.dumps({"image_url": u}) + "\n" for u in urls))
    with pytest.raises(DataError) as caught:
        list_inputs(jsonl, image_root=root)
    assert caught.value.problems == [
        f"score.jsonl:{line}: image_url: {urls[line - 1]} maps to {mapped}, outside the image root {root}; refused"
        for line, mapped in ((2, "/etc/shadow"), (3, tmp_path.parent / "etc" / "passwd"), (4, tmp_path / "secret.png"))]
    jsonl.write_text("".join(json.dumps({"image_url": u}) + "\n" for u in (urls[0], urls[4], urls[5])))
    assert [item.path for item in list_inputs(jsonl, image_root=root)] == [  # inside the root, relative, absolute
        str(root / "ok" / "a.png"), str(jsonl.parent / "relative/../b.png"), "/abs/c.png"]


@pytest.mark.timeout(60)  # opening the FIFO would block: this fails by timing out
def test_read_image_opens_only_regular_files_within_the_limit(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(50 * 2**30)  # 50 GB, sparse: reading it would exhaust memory
    (tmp_path / "ten.png").write_bytes(b"0123456789")
    for name, kind in (("/dev/zero", "a character device"), ("zero.png", "a character device"),
                       ("fifo.png", "a FIFO"), ("folder.png", "a folder")):
        path = str(tmp_path / name)
        assert read_image(path, 20 * 2**20) == ("unreadable", f"cannot read {path}: it is {kind}, not an image file",
                                                b"")
    code, message, raw = read_image(str(tmp_path / "huge.png"), 20 * 2**20)
    assert (code, raw) == ("too_large", b"") and message.startswith(f"{tmp_path / 'huge.png'} is 51200.0 MB")
    assert "at most 20 MB per image" in message
    assert read_image(str(tmp_path / "ten.png"), 10) == ("", "", b"0123456789")
    assert read_image(str(tmp_path / "ten.png"), 9)[:1] == ("too_large",)
    assert read_image(str(tmp_path / "none.png"), 10) == ("missing", f"file not found: {tmp_path / 'none.png'}", b"")


# ---------------------------------------------------------------- output files (no Ray, no model)


def test_a_lock_held_by_another_process_refuses_the_output_until_that_process_is_killed(tmp_path):
    out = tmp_path / "predictions.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path\n"
                               "from serving.batch.files import OutputLock\n"
                               "with OutputLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputBusy, match=rf"{re.escape(str(out))} is being written by another run "
                                             rf"\(pid {holder.pid} on .*choose another --output"):
            OutputLock(out).__enter__()
    finally:
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    with OutputLock(out):  # the killed run's lock file is still there, but no longer locked
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()} "):  # and a second lock in this process is refused
            OutputLock(out).__enter__()
    assert list(tmp_path.iterdir()) == []  # a finished run leaves no lock file


def test_a_killed_runs_temp_files_are_removed_and_nothing_else(tmp_path):
    names = [".predictions.jsonl.123.tmp", ".predictions.jsonl.manifest.json.9.tmp", ".other.jsonl.5.tmp",
             "predictions.jsonl", ".predictions.jsonl.lock", ".predictions.jsonl.tmp"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert remove_temps(tmp_path, ["predictions.jsonl", "predictions.jsonl.manifest.json"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_temps(tmp_path) == 1 and ".other.jsonl.5.tmp" not in {p.name for p in tmp_path.iterdir()}


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "part.jsonl"
    atomic_write(path, ["old"])

    def lines():
        yield "new"
        raise KeyboardInterrupt  # stopped half way through the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lines())
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["part.jsonl"]
    atomic_write(path, ["new"])
    fsync_dir(tmp_path)
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["part.jsonl"]


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
def test_a_model_without_its_onnx_file_on_the_onnx_backend_is_refused_before_ray_starts(trained, tmp_path,
                                                                                        monkeypatch, capsys):
    result, data = trained("image_instance_segmentation")
    folder = tmp_path / "old-model"  # exported before visionserve wrote ONNX files for its task
    shutil.copytree(result.model_dir, folder)
    (folder / "artifacts" / "model.onnx").unlink()
    monkeypatch.setattr(batch, "ensure_ray", _no_ray)
    out = tmp_path / "predictions.jsonl"
    code = main(["score", str(folder), "--input", str(data.images_dir), "--output", str(out), "--backend", "onnx"])
    assert code == 2
    assert f"backend onnx: {folder / 'artifacts' / 'model.onnx'} not found" in capsys.readouterr().err
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


@pytest.mark.slow
def test_an_escaping_image_url_stops_the_command_naming_file_and_line(trained, tmp_path, monkeypatch, capsys):
    result, _ = trained("image_classification")
    monkeypatch.setattr(batch, "ensure_ray", _no_ray)
    jsonl = tmp_path / "score.jsonl"
    jsonl.write_text(json.dumps({"image_url": "images/a.png"}) + "\n" +
                     json.dumps({"image_url": "azureml://x/paths//etc/shadow"}) + "\n")
    out = tmp_path / "out" / "predictions.jsonl"
    assert main(["score", str(result.model_dir), "--input", str(jsonl), "--output", str(out),
                 "--image-root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert f"score.jsonl:2: image_url: azureml://x/paths//etc/shadow maps to /etc/shadow, outside the image root " \
           f"{tmp_path / 'root'}" in err
    assert not out.parent.exists()  # refused before anything was written


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
def test_actors_on_the_onnx_backend_score_the_lines_torch_scores(ray_session, trained, tmp_path):
    from models.onnx_export import TOLERANCE

    result, data = trained("image_classification")
    runs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.jsonl"
        score(result.model_dir, data.images_dir, out, progress=False, backend=backend, concurrency=1)
        runs[backend] = _lines(out)
    assert [x["image"] for x in runs["onnx"]] == [x["image"] for x in runs["torch"]]
    assert np.allclose([x["probs"] for x in runs["onnx"]], [x["probs"] for x in runs["torch"]], atol=TOLERANCE)


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
@pytest.mark.timeout(900)  # a read that blocks on the FIFO fails here instead of hanging
def test_special_files_and_oversized_images_get_their_own_error_lines(ray_session, trained, tmp_path):
    result, data = trained("image_classification")
    shutil.copytree(data.images_dir, tmp_path / "images")
    good = [x["image_url"] for x in _lines(data.train_jsonl)][:3]
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(21 * 2**20)  # over the 20 MB batch limit (sparse: nothing is written)
    big = tmp_path / "big.png"  # over a synchronous request's 6 MB, under batch scoring's 20 MB: scored
    Image.frombytes("RGB", (1500, 1500), random.Random(3).randbytes(1500 * 1500 * 3)).save(big, compress_level=0)
    assert 6 * 2**20 < big.stat().st_size < 20 * 2**20
    urls = [good[0], "/dev/zero", "fifo.png", good[1], "folder.png", "huge.png", "big.png", good[2]]
    jsonl = tmp_path / "score.jsonl"
    jsonl.write_text("".join(json.dumps({"image_url": u}) + "\n" for u in urls))
    out = tmp_path / "out" / "predictions.jsonl"
    summary = score(result.model_dir, jsonl, out, batch_size=4, progress=False)
    lines = _lines(out)
    assert [line["image"] for line in lines] == urls  # nothing lost, in input order
    refused = {1: ("unreadable", "cannot read /dev/zero: it is a character device"),
               2: ("unreadable", f"cannot read {tmp_path / 'fifo.png'}: it is a FIFO"),
               4: ("unreadable", f"cannot read {tmp_path / 'folder.png'}: it is a folder"),
               5: ("too_large", f"{tmp_path / 'huge.png'} is 21.0 MB")}
    for row, (code, message) in refused.items():
        assert lines[row]["error"]["code"] == code and lines[row]["error"]["row"] == row, lines[row]
        assert message in lines[row]["error"]["message"], lines[row]
    for row in (0, 3, 6, 7):
        _check_classification(lines[row], data.labels)
    assert summary.errors == 4 and summary.images == len(urls)


@pytest.mark.slow
def test_rerun_with_another_model_does_not_keep_stale_results(ray_session, trained, tmp_path, capsys):
    classifier, data = trained("image_classification")
    detector, boxes = trained("image_object_detection")
    out = tmp_path / "predictions.jsonl"
    run = ["score", "--input", str(data.images_dir), "--output", str(out), "--no-progress"]
    assert main(run[:1] + [str(classifier.model_dir)] + run[1:]) == 0
    first = out.read_bytes()
    copy = shutil.copytree(classifier.model_dir, tmp_path / "copy")  # the same files elsewhere: the same model
    capsys.readouterr()
    assert main(run[:1] + [str(copy)] + run[1:]) == 0
    assert "nothing to do" in capsys.readouterr().err

    assert main(run[:1] + [str(detector.model_dir)] + run[1:]) == 2
    err = capsys.readouterr().err
    old, new = (fingerprint(ModelFolder.open(m.model_dir))["model_sha256"] for m in (classifier, detector))
    assert f"{out} holds results of another model or other settings" in err
    assert f"the model: sha256 {old} (from {classifier.model_dir}), this run's {new} (from {detector.model_dir})" in err
    assert "--overwrite" in err and out.read_bytes() == first  # refused, the old results untouched
    assert main(run[:1] + [str(detector.model_dir)] + run[1:] + ["--overwrite"]) == 0
    lines = _lines(out)
    assert [line["image"] for line in lines] == [line["image"] for line in _lines_of(first)]
    for line in lines:
        _check_detection(line, boxes.labels)
    assert json.loads(output_manifest(out).read_text())["model_sha256"] == new


def _lines_of(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode().splitlines()]


@pytest.mark.slow
def test_rerun_with_other_set_values_does_not_keep_stale_results(ray_session, trained, tmp_path, capsys):
    result, data = trained("image_classification")
    out = tmp_path / "predictions.jsonl"
    run = ["score", str(result.model_dir), "--input", str(data.images_dir), "--output", str(out), "--no-progress"]
    assert main(run) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert main(run + ["--set", "valid_resize_size=72"]) == 2
    err = capsys.readouterr().err
    assert "setting valid_resize_size: 64 then, 72 in this run" in err and "--overwrite" in err
    assert "the model" not in err and "setting valid_crop_size" not in err  # only what differs is named
    assert out.read_bytes() == first
    assert main(run + ["--set", "valid_resize_size=72", "--overwrite"]) == 0
    assert f"scored {len(list(data.images_dir.iterdir()))} " in capsys.readouterr().err
    assert out.read_bytes() != first  # other pixels went in: other probabilities came out
    assert json.loads(output_manifest(out).read_text())["settings"]["valid_resize_size"] == 72
    assert main(run) == 2  # and back again: the default is not what the last run used
    assert "setting valid_resize_size: 72 then, 64 in this run" in capsys.readouterr().err


@pytest.mark.slow
def test_an_output_that_does_not_say_what_made_it_is_not_kept(trained, tmp_path, monkeypatch):
    result, data = trained("image_classification")
    monkeypatch.setattr(batch, "ensure_ray", _no_ray)
    out = tmp_path / "predictions.jsonl"  # complete, but from an older version or another tool
    out.write_text("".join(json.dumps({"image": str(p), "probs": [1.0], "labels": ["x"]}) + "\n"
                           for p in sorted(data.images_dir.iterdir())))
    with pytest.raises(ValueError, match=r"(?s)unknown model and settings.*manifest.json, which names them, is missing"
                                         r".*--overwrite"):
        score(result.model_dir, data.images_dir, out, progress=False)
    output_manifest(out).write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        score(result.model_dir, data.images_dir, out, progress=False)


def _start_run(model_dir: Path, source: Path, out: Path, address: str, log) -> subprocess.Popen:
    """`visionserve score` in a process (and process group) of its own, joining the session's Ray."""
    command = [sys.executable, "-m", "serving.batch", "score", str(model_dir), "--input", str(source),
               "--output", str(out), "--part-size", "4", "--batch-size", "2", "--concurrency", "1",
               "--address", address, "--no-progress"]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _shuffled_jsonl(data, path: Path) -> list[str]:
    """A JSONL listing the dataset's images in a shuffled order (absolute paths); the order."""
    urls = sorted(str(p) for p in data.images_dir.iterdir())
    random.Random(7).shuffle(urls)
    path.write_text("".join(json.dumps({"image_url": u}) + "\n" for u in urls))
    return urls


@pytest.mark.slow
def test_resume_after_kill_9(ray_session, trained, synth, tmp_path, capsys):
    result, _ = trained("image_classification")
    data = synth("image_classification", images=60, size=(640, 480), seed=1, validation_fraction=0.0)
    urls = _shuffled_jsonl(data, tmp_path / "score.jsonl")  # not sorted: the output must follow the input
    out = tmp_path / "out" / "predictions.jsonl"
    parts = out.with_name(out.name + ".parts")
    with open(tmp_path / "log.txt", "wb") as log:
        proc = _start_run(result.model_dir, tmp_path / "score.jsonl", out,
                          ray_session.get_runtime_context().gcs_address, log)  # no second Ray start-up
        _wait_for(lambda: list(parts.glob("part-*.jsonl")), proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    done = list(parts.glob("part-*.jsonl"))
    kept = [line for part in done for line in part.read_text().splitlines()]
    assert done and not out.exists() and len(kept) == 4 * len(done) < 60  # killed mid-run: some parts, no output
    assert all(json.loads(line) for line in kept)  # whole lines only

    with pytest.raises(ValueError, match="other settings"):  # parts of other settings are never mixed in
        score(result.model_dir, tmp_path / "score.jsonl", out, params={"valid_resize_size": "72"}, progress=False)
    # what a crash between writing and renaming leaves: temp names of the output, its manifest and a part
    for path in (out.with_name(f".{out.name}.999999.tmp"), parts / f".{done[0].name}.999999.tmp",
                 output_manifest(out).with_name(f".{output_manifest(out).name}.999999.tmp")):
        path.write_text('{"image": "half a li')
    capsys.readouterr()
    summary = score(result.model_dir, tmp_path / "score.jsonl", out, batch_size=8, part_size=4, progress=False)
    assert f"resuming: {summary.skipped} of 60" in capsys.readouterr().err
    assert summary.skipped == len(kept) and summary.skipped + summary.scored == 60
    lines = _lines(out)
    images = [line["image"] for line in lines]
    assert len(images) == 60 and len(set(images)) == 60 and set(images) == set(urls)  # none lost, none twice
    assert images == urls  # in input order
    assert set(kept) <= set(out.read_text().splitlines())  # the killed run's lines, as they were
    for line in lines:
        _check_classification(line, data.labels)
    assert summary.images == 60 and summary.errors == 0
    # nothing left over: no part folder, no temp file, no lock; the manifest names the model
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.jsonl", "predictions.jsonl.manifest.json"]
    assert json.loads(output_manifest(out).read_text())["model_sha256"] == \
           fingerprint(ModelFolder.open(result.model_dir))["model_sha256"]


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused(ray_session, trained, synth, tmp_path):
    result, _ = trained("image_classification")
    data = synth("image_classification", images=60, size=(640, 480), seed=1, validation_fraction=0.0)
    urls = _shuffled_jsonl(data, tmp_path / "score.jsonl")
    out = tmp_path / "out" / "predictions.jsonl"
    lock = out.with_name(f".{out.name}.lock")
    with open(tmp_path / "log.txt", "wb") as log:
        proc = _start_run(result.model_dir, tmp_path / "score.jsonl", out,
                          ray_session.get_runtime_context().gcs_address, log)
        try:
            _wait_for(lambda: lock.is_file() and lock.read_text().startswith(f"{proc.pid} "), proc)
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            with pytest.raises(ValueError, match=rf"{re.escape(str(out))} is being written by another run "
                                                 rf"\(pid {proc.pid} on "):
                score(result.model_dir, tmp_path / "score.jsonl", out, progress=False)
            assert proc.poll() is None  # it was refused while the first one ran
            assert proc.wait(timeout=400) == 0, (tmp_path / "log.txt").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert [line["image"] for line in _lines(out)] == urls  # the first run's output, whole and in order
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.jsonl", "predictions.jsonl.manifest.json"]
