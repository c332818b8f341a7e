"""The onnx-int8 backend: `--backend onnx-int8` scores a folder's artifacts/model.int8.onnx (and refuses a folder
without one, naming the file and `visionserve quantize`); `auto` picks it for a classifier on the CPU only when
settings.json's `int8` record says it loses at most models.int8_record.TOLERANCE; its answers agree with the FP32
file's as the record says; /metadata says which file scores and what INT8 cost. (Over HTTP: tests/test_serve.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.int8_record import INT8_FILE, TOLERANCE, Int8Record
from models.onnx_export import ONNX_FILE
from serving.cli import main

CLASSIFIERS = ("image_classification", "image_classification_multilabel")


def _copy(result, tmp_path: Path) -> Path:
    folder = tmp_path / "mlflow-model"
    shutil.copytree(result.model_dir, folder)
    return folder


def _with_loss(result, tmp_path: Path, difference: float) -> Path:
    """A copy of a trained classifier's folder whose int8 record says INT8 scored `difference` (int8 - fp32)."""
    folder = _copy(result, tmp_path)
    settings = folder / "artifacts" / "settings.json"
    doc = json.loads(settings.read_text())
    doc["int8"] = {**doc["int8"], "int8": doc["int8"]["fp32"] + difference, "difference": difference}
    settings.write_text(json.dumps(doc, indent=2))
    return folder


def _record(difference: float) -> Int8Record:
    return Int8Record("accuracy", 0.9, 0.9 + difference, difference, 0.99, 0.05, 500, 32)


def test_the_rule_scores_on_int8_only_a_cpu_classifier_whose_record_allows_it():
    from serving.backends import ONNX_REPLICA_ENV, plan

    def auto(family="classification", device="cpu", *, int8=_record(-0.005), has_int8=True, **kw):
        return plan("auto", family, device, True, has_int8=has_int8, int8=int8, **kw)

    assert auto().backend == "onnx-int8" and "loses 0.5 points of accuracy" in auto().why
    assert auto(int8=_record(-TOLERANCE)).backend == "onnx-int8"  # exactly one point: within
    assert auto(int8=_record(0.02)).backend == "onnx-int8"  # a gain is no loss
    over = auto(int8=_record(-0.025))
    assert over.backend == "onnx" and over.why == ("auto: ONNX Runtime for a classifier on CPUs; not model.int8.onnx: "
                                                   "it loses 2.5 points of accuracy on the validation set, over the "
                                                   "tolerance of 1 point")
    assert auto(int8=None).backend == "onnx" and "records no loss" in auto(int8=None).why  # a file, no record
    assert auto(has_int8=False).backend == "onnx" and auto(has_int8=False).why.endswith("classifier on CPUs")
    assert auto(device="cuda").backend == auto(family="detection").backend == "torch"
    assert auto(compile=True).backend == "torch"
    # asked for by name, it scores whatever it lost; its replicas' torch threads wait as ONNX Runtime's do
    forced = plan("onnx-int8", "classification", "cpu", True, has_int8=True, int8=_record(-0.3))
    assert (forced.backend, forced.why, forced.engine) == ("onnx-int8", "", "ONNX Runtime, INT8")
    assert forced.replica_env() == ONNX_REPLICA_ENV and forced.on_onnx


@pytest.mark.parametrize("difference, expected", [(-0.005, "onnx-int8"), (-TOLERANCE, "onnx-int8"),
                                                  (-0.025, "onnx")])
def test_auto_scores_a_trained_classifier_on_its_int8_file_only_when_the_recorded_loss_is_within_tolerance(
        trained, tmp_path, difference, expected):
    from serving.loading import ModelFolder
    from serving.predictor import Predictor

    result, _ = trained("image_classification")
    folder = _with_loss(result, tmp_path, difference)
    predictor = Predictor.load(folder, device="cpu")
    assert predictor.backend == expected
    described = predictor.description()
    assert described["scoring_file"] == (INT8_FILE if expected == "onnx-int8" else ONNX_FILE)
    assert described["int8"]["difference"] == difference and described["int8"]["tolerance"] == TOLERANCE
    why = ModelFolder.open(folder).plan("auto", "cpu").why
    assert ("within the tolerance" in why) if expected == "onnx-int8" else ("over the tolerance" in why)
    # by name, the INT8 file scores whatever its record says
    assert Predictor.load(folder, backend="onnx-int8").description()["scoring_file"] == INT8_FILE


@pytest.mark.parametrize("task", CLASSIFIERS)
def test_the_int8_backend_answers_agree_with_fp32_as_recorded_on_the_validation_set(trained, task):
    from models.data.jsonl import read_dataset
    from models.export import read_settings
    from serving.predictor import Predictor
    from serving.scoring import Scoring

    result, data = trained(task)
    record = read_settings(Path(result.model_dir) / "artifacts" / "settings.json").int8
    paths = [r.image for r in read_dataset(data.train_jsonl, data.task).records]  # its validation set
    int8 = Scoring(Predictor.load(result.model_dir, backend="onnx-int8")).score_files(paths)
    fp32 = Scoring(Predictor.load(result.model_dir, backend="onnx")).score_files(paths)
    assert len(paths) == record.images
    probs = {name: np.array([a["probs"] for a in answers]) for name, answers in (("int8", int8), ("fp32", fp32))}
    assert not np.allclose(probs["int8"], probs["fp32"], atol=1e-6)  # another network did score
    # scored through the serving path's decoding (not the export's), within a hair of what the record says
    assert np.abs(probs["int8"] - probs["fp32"]).max() <= record.largest_score_difference + 0.01
    if task.endswith("multilabel"):
        agreement = ((probs["int8"] >= 0.5) == (probs["fp32"] >= 0.5)).mean()
    else:
        agreement = (probs["int8"].argmax(1) == probs["fp32"].argmax(1)).mean()
    assert agreement >= record.agreement - 1 / len(paths)


def test_the_onnx_int8_backend_on_a_folder_without_the_file_is_refused_naming_it_and_quantize(trained, tmp_path,
                                                                                              capsys):
    from serving.backends import NoPlan
    from serving.predictor import Predictor

    result, data = trained("image_classification")
    folder = _copy(result, tmp_path)
    (folder / "artifacts" / INT8_FILE).unlink()
    with pytest.raises(NoPlan) as caught:
        Predictor.load(folder, backend="onnx-int8")
    message = str(caught.value)
    assert f"backend onnx-int8: {folder / 'artifacts' / INT8_FILE} not found" in message
    assert "visionserve quantize MODEL_DIR" in message
    image = json.loads(Path(data.train_jsonl).read_text().splitlines()[0])["image_url"]
    code = main(["predict", str(folder), str(Path(data.train_jsonl).parent / image), "--backend", "onnx-int8"])
    err = capsys.readouterr().err
    assert code == 2 and INT8_FILE in err and "visionserve quantize MODEL_DIR" in err and "Traceback" not in err
    # auto, without the file, scores on model.onnx as before INT8 files existed
    assert Predictor.load(folder).backend == "onnx"


def test_an_unknown_backend_is_refused_naming_the_flag_and_the_choices(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["predict", "model", "a.png", "--backend", "onnx-int4"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "--backend" in err and "'onnx-int8'" in err and "Traceback" not in err
