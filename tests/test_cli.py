"""`visionserve` as users script it: train from flags or the cloud's job YAML, predict, demo, and
clear one-line errors (exit code 2, no traceback) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from serving.cli import main

VISIONSERVE = str(Path(sys.executable).parent / "visionserve")
TINY = ["--param", "number_of_epochs=1", "--param", "valid_resize_size=64", "--param", "valid_crop_size=64",
        "--param", "train_crop_size=64", "--param", "training_batch_size=4"]


def _mltable(folder: Path, jsonl: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "MLTable").write_text(yaml.safe_dump({
        "paths": [{"file": os.path.relpath(jsonl, folder)}],
        "transformations": [{"read_json_lines": {"encoding": "utf8", "invalid_lines": "error",
                                                 "include_path_column": False}},
                            {"convert_column_types": [{"columns": "image_url", "column_type": "stream_info"}]}],
    }))
    return folder


@pytest.mark.slow
def test_train_with_flags_writes_the_model_to_output_mlflow_model(synth, tracking, tmp_path):
    data = synth("image_classification", images=16)
    done = subprocess.run(
        [VISIONSERVE, "train", "--task", "image_classification", "--training-data", str(data.train_jsonl),
         "--validation-data", str(data.validation_jsonl), "--model-name", "resnet18", *TINY,
         "--output", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["model_dir"] == str(tmp_path / "out" / "mlflow-model")
    assert (tmp_path / "out" / "mlflow-model" / "MLmodel").is_file()
    assert "epoch 1/1" in done.stderr and "accuracy" in summary["metrics"]


@pytest.mark.slow
def test_train_with_the_clouds_job_yaml_and_mltable_folders(synth, tracking, tmp_path, capsys):
    data = synth("image_object_detection", images=16)
    jobdir = tmp_path / "job"
    _mltable(jobdir / "data" / "training-mltable-folder", Path(data.train_jsonl))
    _mltable(jobdir / "data" / "validation-mltable-folder", Path(data.validation_jsonl))
    (jobdir / "job.yml").write_text("""
$schema: https://azuremlschemas.azureedge.net/latest/autoMLJob.schema.json
type: automl
experiment_name: tests
task: image_object_detection
primary_metric: mean_average_precision
target_column_name: label
compute: azureml:gpu-cluster
training_data: {path: data/training-mltable-folder, type: mltable}
validation_data: {path: data/validation-mltable-folder, type: mltable}
limits: {timeout_minutes: 60, max_trials: 1, max_concurrent_trials: 1}
training_parameters:
  model_name: fasterrcnn_resnet18_fpn
  number_of_epochs: 1
  min_size: 96
  max_size: 128
  box_batch_size_per_image: 64
  rpn_post_nms_top_n_train: 200
  early_stopping: True
  evaluation_frequency: 1
  advanced_settings: >
    {"apply_automl_train_augmentations": false, "stream_image_files": true}
""")
    assert main(["train", str(jobdir / "job.yml"), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    settings = json.loads((tmp_path / "out" / "mlflow-model" / "artifacts" / "settings.json").read_text())
    assert settings["model_name"] == "fasterrcnn_resnet18_fpn" and settings["min_size"] == 96
    assert "mean_average_precision" in summary["metrics"]


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_invalid_param_is_a_clear_error_naming_it_and_its_range(synth, capsys):
    data = synth("image_classification")
    err = _error(["train", "--task", "image_classification", "--training-data", str(data.train_jsonl),
                  "--model-name", "resnet18", "--param", "learning_rate=3", "--param", "optimiser=sgd"], capsys)
    assert "learning_rate=3 is out of range: must be a float in [0, 1]" in err
    assert "optimiser: unknown parameter; did you mean 'optimizer'?" in err


def test_param_without_equals_sign_is_rejected(synth, capsys):
    data = synth("image_classification")
    err = _error(["train", "--task", "image_classification", "--training-data", str(data.train_jsonl),
                  "--param", "learning_rate"], capsys)
    assert "--param 'learning_rate': expected name=value" in err


def test_yolov5_is_a_clear_error(synth, capsys):
    data = synth("image_object_detection")
    err = _error(["train", "--task", "image_object_detection", "--training-data", str(data.train_jsonl),
                  "--model-name", "yolov5"], capsys)
    assert "yolov5 is not available" in err and "fasterrcnn_resnet50_fpn" in err


def test_bad_sweep_settings_name_their_yaml_key(synth, tmp_path, capsys):
    data = synth("image_classification")
    job = tmp_path / "job.yml"
    job.write_text(yaml.safe_dump({"task": "image_classification", "training_data": {"path": str(data.train_jsonl)},
                                   "limits": {"max_trials": 4},
                                   "search_space": [{"learning_rate": {"type": "uniform", "min_value": 0.1,
                                                                       "max_value": 0.01}}],
                                   "sweep": {"sampling_algorithm": "bayesian"}}))
    err = _error(["train", str(job)], capsys)
    assert "search_space[0].learning_rate: uniform(0.1, 0.01): low must be < high" in err


def test_unknown_job_key_is_named_with_a_suggestion(tmp_path, capsys):
    job = tmp_path / "job.yml"
    job.write_text("task: image_classification\ntraning_data: {path: x}\n")
    err = _error(["train", str(job)], capsys)
    assert "traning_data: unknown job key; did you mean 'training_data'?" in err


def test_unknown_task_lists_the_four_tasks(capsys):
    err = _error(["train", "--task", "image_segmentation", "--training-data", "x.jsonl"], capsys)
    for task in ("image_classification", "image_classification_multilabel", "image_object_detection",
                 "image_instance_segmentation"):
        assert task in err


def test_validate_reports_every_data_problem_with_file_and_line(synth, tmp_path, capsys):
    data = synth("image_classification")
    lines = Path(data.train_jsonl).read_text().splitlines()
    lines[0] = lines[0].replace('"label": "', '"label": 7, "x": "')
    lines[2] = "{broken"
    bad = Path(data.train_jsonl).parent / "broken.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    err = _error(["validate", "--task", "image_classification", "--training-data", str(bad)], capsys)
    assert "broken.jsonl:1: label:" in err and "broken.jsonl:3: not valid JSON" in err


def test_predict_prints_one_response_per_image_in_order(trained, capsys, tmp_path):
    result, data = trained("image_classification")
    images = sorted(Path(data.images_dir).iterdir())[:2]
    small = tmp_path / "small.png"
    Image.new("RGB", (10, 10)).save(small)
    assert main(["predict", str(result.model_dir), str(images[0]), str(small), str(images[1]), "--compact"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o.get("image") for o in out] == [str(images[0]), str(small), str(images[1])]
    assert "probs" in out[0] and "probs" in out[2] and out[1]["error"]["code"] == "too_small"


@pytest.mark.slow
def test_demo_trains_then_serves_scores_and_explains_over_http(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([VISIONSERVE, "demo", "--out", str(tmp_path / "demo"), "--images", "16", "--epochs", "1"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sample response" in done.stdout and '"probs"' in done.stdout
    assert "POST http://127.0.0.1:" in done.stdout and "/studio" in done.stdout and "curl -s -X POST" in done.stdout
    with Image.open(tmp_path / "demo" / "explanation.png") as picture:  # explained over HTTP
        assert picture.format == "PNG" and min(picture.size) > 200
    assert (tmp_path / "demo" / "outputs" / "mlflow-model" / "MLmodel").is_file()
    assert (tmp_path / "demo" / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()


def test_the_docker_image_copies_every_package_of_the_wheel():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    packages = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    copied = {line.split()[1] for line in (root / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert set(packages["packages"]) <= copied
