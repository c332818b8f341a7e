"""Data-parallel training on Ray Train with 2 CPU workers (gloo) on the local Ray instance."""

from __future__ import annotations

import base64
import json
import math

import mlflow
import pytest
import yaml
from conftest import run_pyfunc_in_new_process

from models.export import signature
from models.job import build_job
from models.sweep.run import run_job

FAST = {"model_name": "resnet18", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
        "training_batch_size": 4, "validation_batch_size": 8, "number_of_epochs": 2, "num_workers": 0,
        "warmup_cosine_lr_warmup_epochs": 0}


@pytest.mark.slow
def test_two_worker_ray_train_run_exports_a_model_with_the_same_schema(synth, tracking, ray_session, tmp_path):
    data = synth("image_classification", images=16)
    job_file = tmp_path / "job.yml"
    job_file.write_text(yaml.safe_dump({
        "task": "image_classification", "training_data": {"path": str(data.train_jsonl)},
        "validation_data": {"path": str(data.validation_jsonl)}, "experiment_name": "tests",
        "training_parameters": FAST, "properties": {"node_count_per_trial": "2"}}))
    job = build_job(job_file, output_dir=tmp_path / "out")
    assert job.node_count == 2
    messages = []
    result = run_job(job, report=messages.append)
    assert result.epochs_run == 2 and "accuracy" in result.best_metrics
    # two workers really trained, each on its half of the training images (what each rank reported): one
    # worker alone would have run all 12 images, 3 batches of 4 per epoch
    per_rank = math.ceil(data.n_train / 2) // FAST["training_batch_size"]  # DistributedSampler, drop_last
    assert per_rank == 1 and any("Ray Train: 2 workers" in m for m in messages)
    assert result.workers == [{"rank": rank, "batches": 2 * per_rank, "images": 2 * per_rank * 4,
                               "optimizer_steps": 2 * per_rank} for rank in (0, 1)]
    assert result.history[-1]["optimizer_steps"] == 2 * per_rank
    logged = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/workers.json")
    assert logged == {"workers": result.workers}
    model = mlflow.models.Model.load(str(result.model_dir / "MLmodel"))
    assert model.signature == signature(job.task)
    settings = json.loads((result.model_dir / "artifacts" / "settings.json").read_text())
    assert settings["model_name"] == "resnet18" and settings["labels"] == result.labels
    run = mlflow.get_run(result.run_id)
    assert run.data.params["model_name"] == "resnet18" and "train_loss" in run.data.metrics
    image = base64.b64encode(min(data.images_dir.iterdir()).read_bytes()).decode()
    [answer] = run_pyfunc_in_new_process(result.model_dir, [image], tmp_path)
    assert set(answer) == {"probs", "labels"} and answer["labels"] == result.labels
