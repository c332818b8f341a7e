"""Sweeps on Ray Tune with tiny trials: random + bandit, grid, bayesian, timeout; nested MLflow runs
and the best trial exported as the MLflow model."""

from __future__ import annotations

import json
from dataclasses import replace

import mlflow
import pytest
import yaml

from models.job import build_job
from models.sweep.run import run_job

FAST = {"model_name": "mobilenetv2", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
        "training_batch_size": 4, "validation_batch_size": 8, "number_of_epochs": 2, "num_workers": 0,
        "warmup_cosine_lr_warmup_epochs": 0, "early_stopping": 0}


@pytest.fixture
def sweep_job(synth, tracking, ray_session, tmp_path):
    """`sweep_job(**doc)` → a TrainingJob built from a job YAML with the given keys."""

    def make(**doc):
        data = synth("image_classification", images=16)
        body = {"task": "image_classification", "training_data": {"path": str(data.train_jsonl), "type": "mltable"},
                "validation_data": {"path": str(data.validation_jsonl)}, "experiment_name": "tests",
                "training_parameters": {**FAST, **doc.pop("training_parameters", {})}, **doc}
        path = tmp_path / "job.yml"
        path.write_text(yaml.safe_dump(body))
        return build_job(path, output_dir=tmp_path / "out")

    return make


def _children(parent_run_id: str):
    return mlflow.search_runs(experiment_names=["tests"], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              output_format="list")


def test_random_sweep_with_bandit_exports_the_best_trial(sweep_job):
    job = sweep_job(limits={"max_trials": 3, "max_concurrent_trials": 1},
                    search_space=[{"learning_rate": {"type": "loguniform", "min_value": -6, "max_value": -3}},
                                  {"optimizer": {"type": "choice", "values": ["adamw"]},
                                   "learning_rate": {"type": "choice", "values": [0.001]}}],
                    sweep={"sampling_algorithm": "random",
                           "early_termination": {"type": "bandit", "slack_factor": 0.5, "evaluation_interval": 1,
                                                 "delay_evaluation": 1}})
    messages = []
    result = run_job(job, report=messages.append)
    assert len(result.trials) == 3
    assert all(t["status"] in ("completed", "early terminated") for t in result.trials)
    finished = [t for t in result.trials if t["status"] == "completed"]
    assert result.best["metric"] == max(t["metric"] for t in finished)
    assert (result.model_dir / "MLmodel").is_file() and (result.model_dir / "artifacts" / "model.pt").is_file()
    settings = json.loads((result.model_dir / "artifacts" / "settings.json").read_text())
    assert settings["model_name"] == "mobilenetv2"
    assert json.loads(mlflow.get_run(result.best["run_id"]).data.params["learning_rate"]) == pytest.approx(
        result.best["params"]["learning_rate"])
    children = _children(result.run_id)
    assert len(children) == 3
    for child in children:
        assert "learning_rate" in child.data.params and "accuracy" in child.data.metrics
    parent = mlflow.get_run(result.run_id)
    assert parent.data.tags["best_trial_run_id"] == result.best["run_id"]
    assert "best_accuracy" in parent.data.metrics
    summary = mlflow.artifacts.load_text(f"runs:/{result.run_id}/sweep_summary.txt")
    assert summary.splitlines()[0].split()[:2] == ["trial", "status"] and "learning_rate" in summary
    assert any("trial" in m and "status" in m for m in messages)


@pytest.mark.slow
def test_grid_runs_exactly_its_points(sweep_job):
    job = sweep_job(limits={"max_trials": 10, "max_concurrent_trials": 2},
                    training_parameters={"number_of_epochs": 1},
                    search_space=[{"learning_rate": {"type": "choice", "values": [0.001, 0.02]}}],
                    sweep={"sampling_algorithm": "grid"})
    result = run_job(job, report=lambda _: None)
    assert sorted(t["params"]["learning_rate"] for t in result.trials) == [0.001, 0.02]
    assert [t["status"] for t in result.trials] == ["completed", "completed"]


@pytest.mark.slow
def test_bayesian_sweep_runs_with_tune_searcher(sweep_job):
    job = sweep_job(limits={"max_trials": 2},
                    training_parameters={"number_of_epochs": 1},
                    search_space=[{"learning_rate": {"type": "uniform", "min_value": 0.001, "max_value": 0.05},
                                   "optimizer": {"type": "choice", "values": ["sgd", "adamw"]}}],
                    sweep={"sampling_algorithm": "bayesian"})
    result = run_job(job, report=lambda _: None)
    assert len(result.trials) == 2
    for trial in result.trials:
        assert 0.001 <= trial["params"]["learning_rate"] <= 0.05 and trial["params"]["optimizer"] in ("sgd", "adamw")
    assert (result.model_dir / "MLmodel").is_file()


def test_timeout_stops_the_sweep_and_exports_the_best_finished_trial(sweep_job):
    job = sweep_job(limits={"max_trials": 3, "timeout_minutes": 0.25},
                    training_parameters={"number_of_epochs": 200},
                    search_space=[{"learning_rate": {"type": "choice", "values": [0.01, 0.02, 0.03]}}],
                    sweep={"sampling_algorithm": "grid"})
    result = run_job(job, report=lambda _: None)
    statuses = [t["status"] for t in result.trials]
    assert statuses[0] == "completed" and result.trials[0]["epochs"] < 200  # cut at the deadline, still exported
    assert all(s == "skipped (timeout)" for s in statuses[1:])
    assert result.best["trial"] == 0 and (result.model_dir / "MLmodel").is_file()
    assert result.seconds < 120


def test_exit_score_stops_the_sweep_and_exports_the_trial_that_reached_it(sweep_job):
    job = sweep_job(limits={"max_trials": 3, "exit_score": 0.0},
                    training_parameters={"number_of_epochs": 50},
                    search_space=[{"learning_rate": {"type": "choice", "values": [0.01, 0.02, 0.03]}}],
                    sweep={"sampling_algorithm": "grid"})
    messages = []
    result = run_job(job, report=messages.append)
    statuses = [t["status"] for t in result.trials]
    assert statuses == ["stopped (exit_score reached)", "not started", "not started"]
    assert result.trials[0]["epochs"] < 50
    assert result.best["trial"] == 0 and (result.model_dir / "MLmodel").is_file()
    assert any("limits.exit_score 0.0 reached by trial" in m for m in messages)


@pytest.mark.slow
def test_a_trial_with_node_count_per_trial_2_trains_data_parallel(sweep_job):
    job = sweep_job(limits={"max_trials": 1}, properties={"node_count_per_trial": "2"},
                    training_parameters={"number_of_epochs": 1},
                    search_space=[{"learning_rate": {"type": "choice", "values": [0.01]}}],
                    sweep={"sampling_algorithm": "grid"})
    messages = []
    result = run_job(job, report=messages.append)
    assert any("2 Ray Train workers each, 0.995 CPU" in m for m in messages)  # 2 CPUs less the trial actor's
    [trial] = result.trials
    assert trial["status"] == "completed" and trial["metric"] is not None and trial["curve"]
    assert (result.model_dir / "MLmodel").is_file()
    [child] = _children(result.run_id)
    assert "accuracy" in child.data.metrics and child.data.params["learning_rate"] == "0.01"


def test_a_trial_trains_on_one_thread_and_stops_at_the_epoch_its_report_is_refused(synth, tracking, tmp_path):
    """What a reused Tune trial actor runs: every trial on the same training thread; a refused report
    (Tune stopping the trial) ends training at that epoch and reaches the caller."""
    import threading

    from models.train.remote import train_on_one_thread

    data = synth("image_classification", images=16)
    job = build_job(task="image_classification", training_data=data.train_jsonl,
                    validation_data=data.validation_jsonl, params={**FAST, "number_of_epochs": 4},
                    output_dir=tmp_path / "a", experiment_name="tests")
    seen: list[tuple[int, str]] = []

    class Stop(Exception):
        pass

    def refuse_second(metrics):
        seen.append((metrics["epoch"], threading.current_thread().name))
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        train_on_one_thread(job, refuse_second, threads=1, report=lambda _: None)
    assert [epoch for epoch, _ in seen] == [1, 2] and {name for _, name in seen} == {threading.current_thread().name}
    run_id = mlflow.search_runs(experiment_names=["tests"], output_format="list", max_results=1,
                                order_by=["start_time DESC"])[0].info.run_id
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "accuracy")) == 2  # no epoch after the refusal

    result = train_on_one_thread(replace(job, output_dir=tmp_path / "b"), lambda metrics: None, threads=1,
                                 report=lambda _: None)  # the training thread is free again
    assert result.epochs_run == 4 and (result.model_dir / "MLmodel").is_file()
