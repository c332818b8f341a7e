"""Sweeps on Ray Tune with tiny trials: random + bandit, median stopping, grid, bayesian, timeout; nested MLflow
runs and the best trial exported as the MLflow model."""

from __future__ import annotations

import json
from dataclasses import replace

import mlflow
import pytest
import yaml

from conftest import NO_AUGMENT
from models.job import build_job
from models.sweep.run import run_job
from models.sweep.search_space import random_configs
from models.sweep.termination import BanditPolicy

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


@pytest.fixture
def policy_sweep(trained, tracking, ray_session, tmp_path):
    """`policy_sweep(early_termination, search_space, **doc)` → (TrainingJob, good weights, bad weights): a sweep
    whose trials continue at (almost) no learning rate from known weights, validated on their training
    images, so each trial's accuracy curve is known in advance: ~1.0 from the memorised model's weights,
    chance from random ones. A policy then has a clear case to stop and a clear case to keep."""
    import torch
    import torchvision

    result, data = trained("image_classification")
    good = result.model_dir / "artifacts" / "model.pt"
    bad = tmp_path / "random.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(num_classes=len(result.labels)).state_dict(), bad)

    def make(early_termination: dict, search_space: list, sampling: str = "grid", **doc):
        body = {"task": "image_classification", "training_data": {"path": str(data.train_jsonl)},
                "validation_data": {"path": str(data.train_jsonl)}, "experiment_name": "tests",
                "training_parameters": {**FAST, "model_name": "resnet18", "number_of_epochs": 3,
                                        "learning_rate": 0.0, "advanced_settings": NO_AUGMENT, "seed": 1},
                "search_space": search_space,
                "sweep": {"sampling_algorithm": sampling, "early_termination": early_termination}, **doc}
        path = tmp_path / "job.yml"
        path.write_text(yaml.safe_dump(body))
        return build_job(path, output_dir=tmp_path / "out")

    return make, str(good), str(bad)


def _in_order(trials):
    """The trials in the order they ran (one at a time): the order their results reached the scheduler."""
    return sorted(trials, key=lambda t: t["started"])


def test_random_sweep_with_bandit_exports_the_best_trial(policy_sweep):
    make, good, bad = policy_sweep
    policy = {"type": "bandit", "slack_factor": 0.2, "evaluation_interval": 1, "delay_evaluation": 2}
    space = [{"weights": {"type": "choice", "values": [good]},
              "learning_rate": {"type": "loguniform", "min_value": -14, "max_value": -12}},
             {"weights": {"type": "choice", "values": [bad]}, "optimizer": {"type": "choice", "values": ["adamw"]},
              "learning_rate": {"type": "choice", "values": [0.0]}}]
    job = make(policy, space, "random", limits={"max_trials": 3, "max_concurrent_trials": 1})
    # seed 1 draws the memorised weights first, then random ones, then the memorised ones again
    assert [c["weights"] for c in random_configs(job.sweep.search_space, 3, 1)] == [good, bad, good]
    messages = []
    result = run_job(job, report=messages.append)
    assert len(result.trials) == 3
    assert all(t["status"] in ("completed", "early terminated") for t in result.trials)
    # the policy in force: replaying the reported curves through it gives exactly what happened to each trial
    replay = BanditPolicy(job.sweep.early_termination)
    for trial in _in_order(result.trials):
        stopped_at = next((i for i, v in enumerate(trial["curve"], start=1) if replay.decide(trial["trial_id"], i, v)),
                          None)
        if stopped_at is None:
            assert trial["status"] == "completed" and len(trial["curve"]) == trial["epochs"] == 3, trial
        else:
            assert trial["status"] == "early terminated" and len(trial["curve"]) == stopped_at, trial
    statuses = [t["status"] for t in _in_order(result.trials)]
    # the random weights (chance accuracy) were stopped at the first interval after the delay; the memorised
    # weights that followed were compared with both and kept
    assert statuses == ["completed", "early terminated", "completed"]
    [stopped] = [t for t in result.trials if t["status"] == "early terminated"]
    assert stopped["params"]["weights"] == bad and len(stopped["curve"]) == 2
    assert len(mlflow.MlflowClient().get_metric_history(stopped["run_id"], "accuracy")) == 2
    finished = [t for t in result.trials if t["status"] == "completed"]
    assert result.best["metric"] == max(t["metric"] for t in finished)
    assert (result.model_dir / "MLmodel").is_file() and (result.model_dir / "artifacts" / "model.pt").is_file()
    settings = json.loads((result.model_dir / "artifacts" / "settings.json").read_text())
    assert settings["model_name"] == "resnet18"
    assert json.loads(mlflow.get_run(result.best["run_id"]).data.params["learning_rate"]) == pytest.approx(
        result.best["params"]["learning_rate"])
    children = _children(result.run_id)
    assert len(children) == 3
    for child in children:
        assert "learning_rate" in child.data.params and "accuracy" in child.data.metrics
    parent = mlflow.get_run(result.run_id)
    assert parent.data.tags["best_trial_run_id"] == result.best["run_id"]
    assert parent.data.params["early_termination"] == "bandit"
    assert "best_accuracy" in parent.data.metrics
    summary = mlflow.artifacts.load_text(f"runs:/{result.run_id}/sweep_summary.txt")
    assert summary.splitlines()[0].split()[:2] == ["trial", "status"] and "learning_rate" in summary
    assert any("trial" in m and "status" in m for m in messages)


@pytest.mark.slow
def test_median_stopping_decides_only_at_its_evaluation_interval(policy_sweep):
    """median_stopping with evaluation_interval 2 and delay_evaluation 1: Tune's rule alone would stop the
    random weights at their first report (best 0.25 below the median 1.0 of the trial before); at an
    interval of 2 they report twice and are stopped then, while the memorised weights run to the end."""
    make, good, bad = policy_sweep
    policy = {"type": "median_stopping", "evaluation_interval": 2, "delay_evaluation": 1}
    job = make(policy, [{"weights": {"type": "choice", "values": [good, bad, good]}}],
               limits={"max_trials": 3, "max_concurrent_trials": 1})
    result = run_job(job, report=lambda _: None)
    trials = _in_order(result.trials)
    assert [t["params"]["weights"] for t in trials] == [good, bad, good]
    assert [t["status"] for t in trials] == ["completed", "early terminated", "completed"]
    assert [len(t["curve"]) for t in trials] == [3, 2, 3]
    assert trials[1]["curve"][0] < 0.5 < min(trials[0]["curve"])  # the first report already lost to the median
    assert len(mlflow.MlflowClient().get_metric_history(trials[1]["run_id"], "accuracy")) == 2
    assert result.best["params"]["weights"] == good


@pytest.mark.slow
def test_grid_runs_exactly_its_points(sweep_job):
    job = sweep_job(limits={"max_trials": 10, "max_concurrent_trials": 2},
                    training_parameters={"number_of_epochs": 1},
                    search_space=[{"learning_rate": {"type": "choice", "values": [0.001, 0.02]}}],
                    sweep={"sampling_algorithm": "grid"})
    result = run_job(job, report=lambda _: None)
    assert sorted(t["params"]["learning_rate"] for t in result.trials) == [0.001, 0.02]
    assert [t["status"] for t in result.trials] == ["completed", "completed"]


def test_automode_with_few_images_per_class_trains_a_head_on_the_cached_pretrained_backbone(sweep_job):
    """AutoMode (only max_trials given) on 12 training images of 4 classes: the trials start from the
    session cache's mobilenetv2 file and freeze all 19 feature groups, so only the new head learns."""
    import torch
    import torchvision

    from models.train.weights import cached_file

    job = sweep_job(limits={"max_trials": 2}, training_parameters={"number_of_epochs": 1})
    assert job.sweep.auto_mode
    result = run_job(job, report=lambda _: None)
    assert [t["status"] for t in result.trials] == ["completed", "completed"]
    assert all(t["params"]["layers_to_freeze"] == 19 for t in result.trials)
    cached = torch.load(cached_file(torchvision.models.get_weight("MobileNet_V2_Weights.IMAGENET1K_V2")),
                        weights_only=True)
    exported = torch.load(result.model_dir / "artifacts" / "model.pt", weights_only=True)
    features = [k for k in cached if k.startswith("features.") and k.endswith((".weight", ".bias"))]
    assert features and all(torch.equal(exported[k], cached[k]) for k in features)
    assert not torch.equal(exported["classifier.1.bias"], torch.zeros_like(exported["classifier.1.bias"]))


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
    # what the cut trial recorded: one validation per epoch it ran, none after the one the deadline stopped
    history = mlflow.MlflowClient().get_metric_history(result.trials[0]["run_id"], "accuracy")
    assert [m.step for m in history] == list(range(1, result.trials[0]["epochs"] + 1))


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
