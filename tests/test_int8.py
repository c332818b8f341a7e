"""artifacts/model.int8.onnx: a trained classifier's folder carries one that ONNX Runtime alone scores, agreeing
with the FP32 file as settings.json's `int8` record says; `visionserve quantize` adds one to a folder exported
without it (a detector's too) and refuses bad input in words naming the argument."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.onnx_export import INPUT, ONNX_FILE, OUTPUT
from models.int8_record import INT8_FILE, TOLERANCE
from models.onnx_int8 import CALIBRATION_IMAGES, VALIDATION_IMAGES
from serving.cli import main

CLASSIFIERS = ("image_classification", "image_classification_multilabel")


def _artifacts(result) -> Path:
    return Path(result.model_dir) / "artifacts"


def _scores(path: Path, batch: np.ndarray, multilabel: bool) -> np.ndarray:
    """Probabilities of the ONNX file at `path`, on ONNX Runtime alone."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run([OUTPUT], {INPUT: batch})[0].astype(np.float64)
    if multilabel:
        return 1 / (1 + np.exp(-logits))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _validation_batch(data, settings) -> tuple[np.ndarray, list]:
    """The trained fixture's validation images (its training images) through the evaluation preprocessing."""
    from models.data.images import decode
    from models.data.jsonl import read_dataset
    from models.tasks.classification import eval_transform

    records = read_dataset(data.train_jsonl, data.task).records
    preprocess = eval_transform(settings)
    return np.stack([preprocess(decode(r.image)).numpy() for r in records]), records


@pytest.mark.parametrize("task", CLASSIFIERS)
def test_a_trained_classifier_folder_carries_an_int8_file_onnx_runtime_alone_loads(trained, task):
    import onnx
    import onnxruntime as ort

    result, _ = trained(task)
    path = _artifacts(result) / INT8_FILE
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT] and [o.name for o in session.get_outputs()] == [OUTPUT]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == result.labels and meta["task"] == task
    assert json.loads(meta["quantization"])["format"] == "QDQ"
    graph = onnx.load(str(path)).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # resnet18's 20 convolutions
    record = json.loads((_artifacts(result) / "settings.json").read_text())["int8"]
    assert record["file"] == INT8_FILE and record["quantized"]["Conv"] == 20 and record["calibrated_on"] == "training"


@pytest.mark.parametrize("task", CLASSIFIERS)
def test_int8_answers_agree_with_fp32_as_recorded_on_the_validation_set(trained, task):
    from models.export import read_settings

    result, data = trained(task)
    spec = read_settings(_artifacts(result) / "settings.json")
    batch, records = _validation_batch(data, spec.settings)
    multilabel = task.endswith("multilabel")
    fp32 = _scores(_artifacts(result) / ONNX_FILE, batch, multilabel)
    int8 = _scores(_artifacts(result) / INT8_FILE, batch, multilabel)
    record = spec.int8
    assert record.images == len(records) <= VALIDATION_IMAGES["classification"]
    assert np.abs(fp32 - int8).max() <= record.largest_score_difference + 1e-6
    if multilabel:
        assert ((fp32 >= 0.5) == (int8 >= 0.5)).mean() == pytest.approx(record.agreement)
    else:
        assert (fp32.argmax(1) == int8.argmax(1)).mean() == pytest.approx(record.agreement)
    assert record.difference == pytest.approx(record.int8 - record.fp32)
    # 12 memorised images: one flipped decision moves the metric by several points, so no tolerance is asserted
    # here (bench/inference_throughput.py measures it on a real validation set); most decisions must hold
    assert record.agreement >= 0.9, record


def test_a_loaders_tolerance_counts_only_what_int8_loses():
    from models.int8_record import Int8Record

    def record(difference: float) -> Int8Record:
        return Int8Record("accuracy", 0.9, 0.9 + difference, difference, 1.0, 0.0, 100, 32)

    assert record(-0.005).within_tolerance() and record(0.03).within_tolerance()
    assert record(-TOLERANCE).within_tolerance() and not record(-0.02).within_tolerance()
    assert record(-0.02).within_tolerance(0.05) and record(-0.02).loss == pytest.approx(0.02)


def test_a_settings_json_without_int8_reads_as_before_and_a_bad_record_is_named(trained, tmp_path):
    from models.errors import SettingsError
    from models.export import read_settings

    result, _ = trained("image_classification")
    doc = json.loads((_artifacts(result) / "settings.json").read_text())
    old = {k: v for k, v in doc.items() if k != "int8"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_settings(tmp_path / "old.json").int8 is None
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "int8": {**doc["int8"], "fp32": "high", "extra": 1}}))
    with pytest.raises(SettingsError) as caught:
        read_settings(tmp_path / "bad.json")
    assert "int8.fp32: expected a number" in str(caught.value) and "int8.extra: unknown field" in str(caught.value)
    missing = {k: v for k, v in doc["int8"].items() if k not in ("images", "largest_score_difference")}
    wrong = {**doc["int8"], "quantized": {"Conv": -1}, "calibrated_on": "guesswork", "agreement": float("nan")}
    for record, named in ((missing, ("int8.images", "int8.largest_score_difference")),
                          (wrong, ("int8.quantized", "int8.calibrated_on", "int8.agreement")), ([1], ("int8:",))):
        (tmp_path / "bad.json").write_text(json.dumps({**doc, "int8": record}))
        with pytest.raises(SettingsError) as caught:
            read_settings(tmp_path / "bad.json")
        assert all(name in str(caught.value) for name in named) and "bad.json" in str(caught.value)


def _folder_without_int8(result, tmp_path: Path) -> Path:
    """A copy of a trained folder as export wrote it before INT8 files (no model.int8.onnx, no `int8`)."""
    folder = tmp_path / "mlflow-model"
    shutil.copytree(result.model_dir, folder)
    (folder / "artifacts" / INT8_FILE).unlink(missing_ok=True)
    settings = folder / "artifacts" / "settings.json"
    doc = json.loads(settings.read_text())
    doc.pop("int8", None)
    settings.write_text(json.dumps(doc, indent=2))
    return folder


def test_visionserve_quantize_adds_the_int8_file_to_a_folder_exported_without_it(trained, tmp_path, capsys):
    result, data = trained("image_classification")
    folder = _folder_without_int8(result, tmp_path)
    before = json.loads((folder / "artifacts" / "settings.json").read_text())
    assert main(["quantize", str(folder), "--validation-data", str(data.train_jsonl),
                 "--training-data", str(data.train_jsonl), "--calibration-images", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    after = json.loads((folder / "artifacts" / "settings.json").read_text())
    assert after.pop("int8") == printed and before == after  # every other field kept as it was
    assert printed["calibrated_on"] == "training" and printed["calibration_images"] == 4
    assert (folder / "artifacts" / INT8_FILE).is_file()
    assert not list((folder / "artifacts").glob(".int8-*"))  # no work folder left behind
    # without --training-data the validation images calibrate too, and the record says so
    assert main(["quantize", str(folder / "artifacts"), "--validation-data", str(data.train_jsonl)]) == 0
    assert json.loads(capsys.readouterr().out)["calibrated_on"] == "validation"


@pytest.mark.slow
def test_visionserve_quantize_makes_a_detectors_int8_file_with_its_rpn_and_roi_ops_in_float(trained, tmp_path,
                                                                                             capsys):
    result, data = trained("image_object_detection")
    assert not (_artifacts(result) / INT8_FILE).exists()  # detectors are quantized on request only
    folder = _folder_without_int8(result, tmp_path)
    assert main(["quantize", str(folder), "--validation-data", str(data.train_jsonl)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["metric"] == "mean_average_precision" and record["images"] == 12
    assert record["calibration_images"] == CALIBRATION_IMAGES["detection"]
    assert record["quantized"]["Conv"] >= 20 and record["float_ops"]["RoiAlign"] >= 1
    assert record["int8"] >= record["fp32"] - 0.1  # a tiny model's mAP on 12 images


def _refusal(argv: list[str], capsys) -> str:
    """stderr of a `visionserve` run that must be refused as the user's mistake: exit code 2, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flag", ["--calibration-images", "--validation-images"])
@pytest.mark.parametrize("value", ["0", "-3", "abc", "1e3", "100000000000000000000"])
def test_visionserve_quantize_refuses_image_counts_out_of_range_naming_the_flag(flag, value, tmp_path, capsys):
    err = _refusal(["quantize", str(tmp_path), "--validation-data", "v.jsonl", flag, value], capsys)
    assert f"argument {flag}" in err and value in err


def test_visionserve_quantize_refuses_a_missing_folder_or_one_that_is_no_model_naming_model_dir(tmp_path, capsys):
    err = _refusal(["quantize", str(tmp_path / "nowhere"), "--validation-data", "v.jsonl"], capsys)
    assert "MODEL_DIR" in err and "no such folder" in err
    (tmp_path / "some-folder").mkdir()
    err = _refusal(["quantize", str(tmp_path / "some-folder"), "--validation-data", "v.jsonl"], capsys)
    assert "MODEL_DIR" in err and "not a visionserve model folder" in err
    (tmp_path / "a-file").write_text("x")
    assert "MODEL_DIR" in _refusal(["quantize", str(tmp_path / "a-file"), "--validation-data", "v.jsonl"], capsys)


def test_visionserve_quantize_refuses_a_folder_without_validation_data_naming_the_flag(trained, tmp_path, capsys):
    result, _ = trained("image_classification")
    folder = _folder_without_int8(result, tmp_path)
    err = _refusal(["quantize", str(folder)], capsys)
    assert "--validation-data is needed" in err
    err = _refusal(["quantize", str(folder), "--validation-data", str(tmp_path / "missing.jsonl")], capsys)
    assert "--validation-data" in err and "no such file" in err
    assert not (folder / "artifacts" / INT8_FILE).exists()


def test_visionserve_quantize_refuses_unusable_data_naming_the_flag_file_and_line(trained, tmp_path, capsys):
    result, data = trained("image_classification")
    folder = _folder_without_int8(result, tmp_path)
    first = json.loads(Path(data.train_jsonl).read_text().splitlines()[0])
    image = str(Path(data.train_jsonl).parent / first["image_url"])
    unknown = tmp_path / "unknown-label.jsonl"
    unknown.write_text(json.dumps({**first, "image_url": image}) + "\n"
                       + json.dumps({"image_url": image, "label": "zebra"}) + "\n")
    err = _refusal(["quantize", str(folder), "--validation-data", str(unknown)], capsys)
    assert "--validation-data" in err and "unknown-label.jsonl:2: label: 'zebra' is not a label" in err
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    err = _refusal(["quantize", str(folder), "--validation-data", str(data.train_jsonl),
                    "--training-data", str(garbage)], capsys)
    assert "--training-data" in err and "garbage.jsonl:1" in err
    missing_image = tmp_path / "missing-image.jsonl"
    missing_image.write_text(json.dumps({"image_url": str(tmp_path / "gone.png"), "label": result.labels[0]}) + "\n")
    err = _refusal(["quantize", str(folder), "--validation-data", str(missing_image)], capsys)
    assert "--validation-data" in err and "image not found" in err
    assert not (folder / "artifacts" / INT8_FILE).exists()


def test_visionserve_quantize_leaves_the_folder_as_it_was_when_its_files_are_broken(trained, tmp_path, capsys):
    result, data = trained("image_classification")
    folder = _folder_without_int8(result, tmp_path)
    settings = folder / "artifacts" / "settings.json"
    good = settings.read_text()
    settings.write_text("{broken")
    err = _refusal(["quantize", str(folder), "--validation-data", str(data.train_jsonl)], capsys)
    assert "settings.json" in err and "not valid JSON" in err
    settings.write_text(good)
    (folder / "artifacts" / ONNX_FILE).write_bytes(b"not an onnx graph")
    assert main(["quantize", str(folder), "--validation-data", str(data.train_jsonl)]) == 1
    err = capsys.readouterr().err
    assert "could not be quantized" in err and "Traceback" not in err
    assert settings.read_text() == good and not (folder / "artifacts" / INT8_FILE).exists()
    assert not list((folder / "artifacts").glob(".int8-*"))


def test_the_quantize_commands_help_states_the_defaults_quantization_uses():
    from serving.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["quantize"]
    text = sub.format_help().replace("\n", " ")
    for family, name in (("classification", "a classifier"), ("detection", "a detector")):
        assert f"{CALIBRATION_IMAGES[family]} for {name}" in " ".join(text.split())
        assert f"{VALIDATION_IMAGES[family]} for {name}" in " ".join(text.split())
