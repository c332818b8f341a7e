"""Every training parameter at both ends of its range, and each of its choices, through a short real
training per task family: a declared bound (or a cross check) that lets through a value the code cannot
run with fails here. The runs are generated from the settings classes, so a new ranged parameter is
walked without editing this file; four runs per family cover every parameter at once."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt

from models.errors import SettingsError
from models.export import read_settings
from models.job import build_job
from models.tasks.architectures import get_architecture
from models.tasks.fields import SettingsModel, kind_of
from models.tasks.registry import get_task, training_settings
from models.train.loop import train

# Not ranges or choices: covered by their own tests.
NOT_WALKED = {
    "model_name": "one architecture per family here; tests/test_architectures.py builds every one",
    "weights": "tests/test_weights.py", "checkpoint_path": "tests/test_training.py (continuing a run)",
    "checkpoint_run_id": "tests/test_training.py (continuing a run)",
    "tile_grid_size": "a text: set to 2x1 in two detection runs below",
    "image_mean": "three numbers taken from the weights: tests/test_training.py (normalisation)",
    "image_std": "three numbers taken from the weights: tests/test_training.py (normalisation)",
}
# Which end of every range each run takes, with the choices that make the most ranged parameters count.
PROFILES: tuple[tuple[str, dict[str, str]], ...] = (
    ("low", {"optimizer": "sgd", "lr_scheduler": "warmup_cosine", "validation_metric_type": "voc"}),
    ("high", {"optimizer": "sgd", "lr_scheduler": "warmup_cosine", "validation_metric_type": "coco_voc"}),
    ("low", {"optimizer": "adam", "lr_scheduler": "step", "validation_metric_type": "none"}),
    ("high", {"optimizer": "adamw", "lr_scheduler": "step", "validation_metric_type": "coco"}),
)
_SGD: Callable[[dict], bool] = lambda run: run["optimizer"] == "sgd"
_ADAM: Callable[[dict], bool] = lambda run: run["optimizer"] != "sgd"
_STEP: Callable[[dict], bool] = lambda run: run["lr_scheduler"] == "step"
_COSINE: Callable[[dict], bool] = lambda run: run["lr_scheduler"] == "warmup_cosine"
_TILED: Callable[[dict], bool] = lambda run: run.get("tile_grid_size") is not None
# A value only counts as walked in a run where the code reads it.
USED_WHEN: dict[str, Callable[[dict], bool]] = {
    "momentum": _SGD, "nesterov": _SGD, "beta1": _ADAM, "beta2": _ADAM, "amsgrad": _ADAM,
    "step_lr_gamma": _STEP, "step_lr_step_size": _STEP,
    "warmup_cosine_lr_cycles": _COSINE, "warmup_cosine_lr_warmup_epochs": _COSINE,
    "validation_iou_threshold": lambda run: run.get("validation_metric_type") in ("voc", "coco_voc"),
    "tile_overlap_ratio": _TILED, "tile_predictions_nms_thresh": _TILED, "tile_merge": _TILED,
}
_TILE_PARAMETERS = ("tile_overlap_ratio", "tile_predictions_nms_thresh", "tile_merge")

# Values for what has no upper bound (small, so that the runs are fast). The high runs take batches
# that hold the whole epoch: learning_rate=1 diverges on a detector within a few SGD steps (the loop
# stops with "lower learning_rate"), so each epoch makes one update.
_DETECTION = {"min_size": 64, "max_size": 96, "box_batch_size_per_image": 16, "rpn_batch_size_per_image": 16,
              "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20, "box_detections_per_img": 20,
              "training_batch_size": 16, "validation_batch_size": 4, "batch_size": 4}
# The upper ends of min_size / max_size (2667) are a per-request memory cap for scoring, walked there
# (bench/memory.py, tests/test_hostile.py); a training step on 16 images of 2667 px does not fit a small
# machine, so the high runs train detectors at these sides.
_SIDES_HIGH = {"min_size": 256, "max_size": 320}
FAMILIES: dict[str, dict[str, Any]] = {
    "classification": {
        "tasks": ("image_classification", "image_classification", "image_classification_multilabel",
                  "image_classification_multilabel"),
        "model": "resnet18",
        "base": {"valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64, "training_batch_size": 16,
                 "validation_batch_size": 12, "batch_size": 4},
        # the cross checks' lower ends: training_batch_size=1 needs train_crop_size > 32 (BatchNorm)
        "low": {"train_crop_size": 33},
        "tiled": (),
        "untiled": (),
    },
    "detection": {
        "tasks": ("image_object_detection",) * 4, "model": "fasterrcnn_resnet18_fpn", "base": _DETECTION,
        # a detector trained from scratch (the low runs) needs min_size > 32 (BatchNorm); max_size >= min_size
        "low": {"min_size": 33, "max_size": 33},
        "high": _SIDES_HIGH,
        "tiled": (0, 1),
        "untiled": (),
    },
    "segmentation": {
        "tasks": ("image_instance_segmentation",) * 4, "model": "maskrcnn_resnet18_fpn", "base": _DETECTION,
        "low": {"min_size": 33, "max_size": 33},
        "high": _SIDES_HIGH,
        "tiled": (),
        "untiled": _TILE_PARAMETERS,  # tiling is refused for instance segmentation: nothing reads them
    },
}
COMMON = {"number_of_epochs": 1, "num_workers": 0, "checkpoint_frequency": None, "layers_to_freeze": None}
_OPEN = {int: 1, float: 1e-3}  # how far inside an open bound the walk goes


def _ends(field) -> tuple[Any, Any]:
    """(lowest, highest) value a numeric field accepts; None for a side without a bound."""
    kind = kind_of(field)[0]
    low = high = None
    for m in field.metadata:
        if isinstance(m, Ge):
            low = m.ge
        elif isinstance(m, Gt):
            low = m.gt + _OPEN[kind]
        elif isinstance(m, Le):
            high = m.le
        elif isinstance(m, Lt):
            high = m.lt - _OPEN[kind]
    return low, high


def _nested_ends(cls: type[SettingsModel], end: str) -> dict[str, bool]:
    return {name: end == "high" for name in cls.model_fields}


def _runs(family: str) -> tuple[list[dict[str, Any]], dict[str, set]]:
    """The family's runs, and what each parameter was walked at (ends, choices) where the code reads it."""
    spec = FAMILIES[family]
    task = get_task(spec["tasks"][0])
    arch = get_architecture(spec["model"], task.family)
    fields = task.settings_cls.model_fields
    runs = []
    for i, (end, choices) in enumerate(PROFILES):
        run: dict[str, Any] = {**COMMON, **spec["base"], "model_name": spec["model"],
                               **{k: v for k, v in choices.items() if k in fields}}
        if i in spec["tiled"]:
            run["tile_grid_size"] = "2x1"
        for name, field in fields.items():
            kind, options, _ = kind_of(field)
            if name in NOT_WALKED or name in choices:
                continue
            if isinstance(kind, type) and issubclass(kind, SettingsModel):
                run[name] = _nested_ends(kind, end)
            elif options is None and kind is bool:
                run[name] = end == "high"
            elif options is None and kind in (int, float):
                low, high = _ends(field)
                value = low if end == "low" else high
                if value is not None:
                    run[name] = value
        # the low runs train from scratch (the smallest sizes BatchNorm can learn on), the high runs from the
        # session cache's pretrained weights, every layer group frozen
        run.update({**spec["low"], "weights": "none"} if end == "low" else
                   {**spec.get("high", {}), "layers_to_freeze": len(arch.freeze_groups)})
        runs.append(run)
    for name, field in fields.items():  # choices not set by the profiles go round the runs that read them
        options = kind_of(field)[1]
        if options is None or name in PROFILES[0][1]:
            continue
        eligible = [run for run in runs if USED_WHEN.get(name, lambda _: True)(run)] or runs
        for k, run in enumerate(eligible):
            run[name] = options[k % len(options)]
    walked: dict[str, set] = {}
    for run in runs:
        for name, value in run.items():
            if USED_WHEN.get(name, lambda _: True)(run):
                walked.setdefault(name, set()).add(repr(value))
    return runs, walked


def _expected(family: str) -> dict[str, set]:
    """What every walked parameter must have been run with: each end of its range, each choice, both flags."""
    spec = FAMILIES[family]
    task = get_task(spec["tasks"][0])
    arch = get_architecture(spec["model"], task.family)
    expected: dict[str, set] = {}
    for name, field in task.settings_cls.model_fields.items():
        kind, options, _ = kind_of(field)
        if name in NOT_WALKED or name in spec["untiled"]:
            continue
        if options is not None:
            expected[name] = {repr(o) for o in options}
        elif isinstance(kind, type) and issubclass(kind, SettingsModel):
            expected[name] = {repr(_nested_ends(kind, end)) for end in ("low", "high")}
        elif kind is bool:
            expected[name] = {"False", "True"}
        elif kind in (int, float):
            low, high = _ends(field)
            low, high = spec["low"].get(name, low), spec.get("high", {}).get(name, high)
            high = len(arch.freeze_groups) if name == "layers_to_freeze" else high
            expected[name] = {repr(v) for v in (low, high) if v is not None}
    return expected


@pytest.mark.parametrize("family", FAMILIES)
def test_every_range_end_and_choice_is_walked_where_the_code_reads_it(family):
    _, walked = _runs(family)
    for name, values in _expected(family).items():
        assert values <= walked.get(name, set()), (name, values, walked.get(name))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_ends_the_walk_raises_are_refused_by_the_cross_checks_naming_the_parameter(family):
    """Where the walk starts above a declared lower bound, the settings refuse that bound themselves."""
    spec = FAMILIES[family]
    runs, _ = _runs(family)
    task = get_task(spec["tasks"][0])
    for name in spec["low"]:
        declared = _ends(task.settings_cls.model_fields[name])[0]
        raw = {k: v for k, v in runs[0].items() if v is not None}
        with pytest.raises(SettingsError) as info:
            training_settings(task, {**raw, name: declared})
        assert any(re.search(rf"\b{name}={declared}\b", p) for p in info.value.problems), info.value.problems
        training_settings(task, raw)  # and the walk's own values pass


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_training_parameter_at_its_bounds_trains_and_exports(family, synth, tracking, tmp_path):
    spec = FAMILIES[family]
    runs, _ = _runs(family)
    for i, (task, params) in enumerate(zip(spec["tasks"], runs)):
        data = synth(task, images=10, validation_fraction=0.0)  # validation_data_size splits it
        job = build_job(task=task, training_data=data.train_jsonl, params=params, output_dir=tmp_path / str(i),
                        experiment_name="tests")
        result = train(job, progress=False, report=lambda _: None)
        assert result.epochs_run == 1 and (result.model_dir / "MLmodel").is_file(), (i, params)
        exported = read_settings(result.model_dir / "artifacts" / "settings.json")  # validated as it loads
        for name in type(exported.settings).model_fields:
            if name in params:
                assert getattr(exported.settings, name) == params[name], (i, name)
