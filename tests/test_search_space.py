"""Sweep settings without training: distributions, conditional spaces, grid, limits, termination decisions."""

from __future__ import annotations

import math

import pytest

from models.errors import SettingsError
from models.sweep.search_space import auto_search_space, grid_configs, parse_search_space, random_configs, tune_space
from models.sweep.settings import EarlyTermination, parse_early_termination, parse_limits, parse_sweep
from models.tasks.registry import get_task

CLS = get_task("image_classification")
DET = get_task("image_object_detection")


def _problems(fn, *args) -> str:
    with pytest.raises(SettingsError) as info:
        fn(*args)
    return "\n".join(info.value.problems)


def test_every_distribution_parses_and_samples_within_its_support():
    raw = {"learning_rate": {"type": "uniform", "min_value": 0.001, "max_value": 0.01},
           "weight_decay": {"type": "loguniform", "min_value": math.log(1e-5), "max_value": math.log(1e-3)},
           "momentum": {"type": "quniform", "min_value": 0.8, "max_value": 0.95, "q": 0.05},
           "early_stopping_delay": {"type": "randint", "upper": 4},
           "beta1": {"type": "qloguniform", "min_value": math.log(0.5), "max_value": math.log(0.9), "q": 0.1},
           "warmup_cosine_lr_cycles": {"type": "normal", "mu": 0.45, "sigma": 0.01},
           "step_lr_gamma": {"type": "lognormal", "mu": math.log(0.5), "sigma": 0.01},
           "beta2": {"type": "qnormal", "mu": 0.99, "sigma": 0.001, "q": 0.001},
           "weighted_loss": {"type": "choice", "values": [0, 1, 2]},
           "early_stopping_patience": {"type": "qlognormal", "mu": math.log(5), "sigma": 0.1, "q": 1}}
    space = parse_search_space([raw], CLS)
    for config in random_configs(space, 50, seed=1):
        assert 0.001 <= config["learning_rate"] <= 0.01
        assert 1e-5 <= config["weight_decay"] <= 1e-3
        assert round(config["momentum"] / 0.05, 6).is_integer() and 0.8 <= config["momentum"] <= 0.95
        assert config["early_stopping_delay"] in range(4)
        assert round(config["beta1"] / 0.1, 6).is_integer() and 0.5 <= config["beta1"] <= 0.9
        assert config["weighted_loss"] in (0, 1, 2)
        assert 0.3 < config["step_lr_gamma"] < 0.7
        assert abs(config["warmup_cosine_lr_cycles"] - 0.45) < 0.1  # normal(0.45, 0.01): ten sigmas
        assert round(config["beta2"] / 0.001, 6).is_integer() and abs(config["beta2"] - 0.99) < 0.01
        assert float(config["early_stopping_patience"]).is_integer()


def test_errors_name_the_yaml_key_path():
    raw = [{"learning_rate": {"type": "uniform", "min_value": 0.01, "max_value": 0.001}},
           {"model_name": {"type": "choice", "values": ["resnet18", "yolo9"]},
            "learing_rate": {"type": "uniform", "min_value": 0.1, "max_value": 0.2},
            "momentum": {"type": "uniform", "min_value": 0.5, "max_value": 2},
            "optimizer": {"type": "beta", "a": 1}}]
    text = _problems(parse_search_space, raw, CLS)
    assert "search_space[0].learning_rate: uniform(0.01, 0.001): low must be < high" in text
    assert "search_space[1].model_name: choice('resnet18', 'yolo9')" in text
    assert "search_space[1].learing_rate: unknown parameter; did you mean 'learning_rate'" in text
    assert "search_space[1].momentum: uniform(0.5, 2): 2.0 is out of range" in text
    assert "search_space[1].optimizer.type: 'beta' is not a distribution" in text


def test_conditional_space_samples_only_valid_combinations():
    space = parse_search_space([
        {"model_name": {"type": "choice", "values": ["fasterrcnn_resnet18_fpn"]},
         "min_size": {"type": "choice", "values": [600, 800]}},
        {"model_name": {"type": "choice", "values": ["retinanet_resnet50_fpn"]},
         "optimizer": {"type": "choice", "values": ["adam", "adamw"]}}], DET)
    configs = random_configs(space, 40, seed=0)
    assert {c["model_name"] for c in configs} == {"fasterrcnn_resnet18_fpn", "retinanet_resnet50_fpn"}
    for c in configs:
        assert set(c) == ({"model_name", "min_size"} if c["model_name"].startswith("faster") else
                          {"model_name", "optimizer"})


def test_grid_enumerates_exactly_its_points_and_refuses_continuous_distributions():
    space = parse_search_space([{"learning_rate": {"type": "choice", "values": [0.01, 0.02]},
                                 "optimizer": {"type": "choice", "values": ["sgd", "adam"]}},
                                {"model_name": {"type": "choice", "values": ["mobilenetv2"]}}], CLS)
    assert grid_configs(space) == [{"learning_rate": 0.01, "optimizer": "sgd"}, {"learning_rate": 0.01, "optimizer": "adam"},
                                   {"learning_rate": 0.02, "optimizer": "sgd"}, {"learning_rate": 0.02, "optimizer": "adam"},
                                   {"model_name": "mobilenetv2"}]
    uniform = parse_search_space([{"learning_rate": {"type": "uniform", "min_value": 0.01, "max_value": 0.02}}], CLS)
    assert "grid sampling takes only choice" in _problems(grid_configs, uniform)


def test_bayesian_refuses_a_conditional_space_and_maps_to_tune_domains():
    doc = {"limits": {"max_trials": 4}, "sweep": {"sampling_algorithm": "bayesian"},
           "search_space": [{"learning_rate": {"type": "uniform", "min_value": 0.001, "max_value": 0.01}},
                            {"model_name": {"type": "choice", "values": ["resnet18"]}}]}
    assert "does not support a conditional search space" in _problems(parse_sweep, doc, CLS)
    space = parse_search_space([{"learning_rate": {"type": "loguniform", "min_value": -7, "max_value": -3}}], CLS)
    domain = tune_space(space)["learning_rate"]
    assert (domain.lower, domain.upper) == pytest.approx((math.exp(-7), math.exp(-3)))
    normal = parse_search_space([{"momentum": {"type": "normal", "mu": 0.9, "sigma": 0.01}}], CLS)
    assert "bayesian sampling takes only" in _problems(tune_space, normal)


def test_limits_defaults_and_concurrency_capped_at_max_trials():
    limits = parse_limits({"max_trials": 3, "max_concurrent_trials": 8})
    assert (limits.max_trials, limits.max_concurrent_trials, limits.timeout_minutes) == (3, 3, 7 * 24 * 60)
    text = _problems(parse_limits, {"max_trials": 0, "max_concurrent_trials": 101, "timeout_minutes": -1, "foo": 1})
    for needle in ("limits.max_trials=0", "limits.max_concurrent_trials=101", "limits.timeout_minutes=-1",
                   "limits.foo: unknown key"):
        assert needle in text


def test_exit_score_max_nodes_and_enable_early_termination_limits():
    from models.sweep.run import _concurrency

    limits = parse_limits({"max_trials": 6, "max_concurrent_trials": 4, "exit_score": 0.9, "max_nodes": 4})
    assert (limits.exit_score, limits.max_nodes, limits.enable_early_termination) == (0.9, 4, True)
    messages = []
    assert _concurrency(limits, nodes=1, report=messages.append) == 4 and not messages
    assert _concurrency(limits, nodes=2, report=messages.append) == 2  # 2 trials x 2 nodes = max_nodes
    assert _concurrency(limits, nodes=8, report=messages.append) == 1  # always at least one trial
    assert "limits.max_nodes=4 with node_count_per_trial=8: 1 trial(s) at a time" in messages
    text = _problems(parse_limits, {"exit_score": "high", "max_nodes": 0, "enable_early_termination": "no"})
    for needle in ("limits.exit_score='high'", "limits.max_nodes=0", "limits.enable_early_termination='no'"):
        assert needle in text
    off = {"limits": {"max_trials": 3, "enable_early_termination": False},
           "search_space": [{"learning_rate": {"type": "choice", "values": [0.01, 0.02]}}],
           "sweep": {"early_termination": {"type": "bandit", "slack_factor": 0.1}}}
    assert parse_sweep(off, CLS).early_termination is None
    assert parse_sweep({"limits": {"max_trials": 3, "enable_early_termination": False}}, CLS).early_termination is None


def test_exit_score_stopper_stops_every_trial_once_one_reaches_the_score():
    from models.sweep.termination import ExitScoreStopper

    stopper = ExitScoreStopper("accuracy", 0.8)
    assert stopper("a", {"accuracy": 0.5}) is False and not stopper.stop_all()
    assert stopper("b", {"train_loss": 0.1}) is False and not stopper.stop_all()  # no metric: no decision
    assert stopper("b", {"accuracy": 0.8}) is False and stopper.stop_all() and stopper.reached_by == "b"
    stopper("a", {"accuracy": 0.95})
    assert stopper.reached_by == "b"  # the first to reach it


def test_early_termination_settings_are_checked():
    bandit = parse_early_termination({"type": "bandit", "evaluation_interval": 2, "slack_factor": 0.2,
                                      "delay_evaluation": 6})
    assert bandit == EarlyTermination("bandit", 2, 6, slack_factor=0.2)
    assert "exactly one of slack_factor or slack_amount" in _problems(parse_early_termination, {"type": "bandit"})
    assert "truncation_percentage" in _problems(parse_early_termination, {"type": "truncation_selection"})
    assert "must be one of" in _problems(parse_early_termination, {"type": "hyperband"})


def test_automode_picks_a_space_when_only_max_trials_is_given():
    sweep = parse_sweep({"limits": {"max_trials": 4}}, CLS)
    assert sweep.auto_mode and sweep.early_termination.type == "bandit"
    space = auto_search_space(CLS, n_images=100, gpus=0, fixed={})
    assert set(space[0]["model_name"].values) == {"mobilenetv2", "resnet18", "resnet34"}
    assert space[0]["learning_rate"].type == "loguniform"
    assert "vitb16r224" in auto_search_space(CLS, 100, gpus=1, fixed={})[0]["model_name"].values
    fixed = auto_search_space(CLS, 100, gpus=0, fixed={"model_name": "resnet18", "learning_rate": 0.01})
    assert fixed[0]["model_name"].values == ("resnet18",) and "learning_rate" not in fixed[0]
    assert not parse_sweep({"limits": {"max_trials": 1}}, CLS).is_sweep


def test_automode_trains_a_head_on_frozen_pretrained_backbones_for_few_images_per_class():
    from models.tasks.architectures import get_architecture

    space = auto_search_space(CLS, n_images=10, gpus=0, fixed={}, per_class=5)
    assert [s["model_name"].values for s in space] == [("mobilenetv2",), ("resnet18",), ("resnet34",)]
    for subspace in space:  # every layer group of that model frozen: only the new head learns
        name = subspace["model_name"].values[0]
        assert subspace["layers_to_freeze"].values == (len(get_architecture(name, "classification").freeze_groups),)
        assert subspace["learning_rate"].type == "loguniform"
    detection = auto_search_space(DET, n_images=10, gpus=0, fixed={}, per_class=2)
    assert all(s["layers_to_freeze"].values == (5,) for s in detection)  # conv1/bn1 and layer1..4 of the backbone
    # enough images, weights=none (nothing pretrained to keep) or a fixed layers_to_freeze: the plain space
    for kwargs in ({"fixed": {}, "per_class": 50}, {"fixed": {"weights": "none"}, "per_class": 5},
                   {"fixed": {"layers_to_freeze": 2}, "per_class": 5}):
        plain = auto_search_space(CLS, n_images=10, gpus=0, **kwargs)
        assert len(plain) == 1 and "layers_to_freeze" not in plain[0], kwargs
