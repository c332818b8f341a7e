"""Settings: the spec's names, defaults and ranges; every problem reported with its allowed range."""

from __future__ import annotations

import json

import pytest

from models.export import ModelSettings, read_settings
from models.errors import SettingsError
from models.tasks.fields import as_dict
from models.tasks.registry import TASKS, get_task, inference_settings, training_settings
from models.tasks.tiling import parse_tile_grid_size, tile_grid


def _train(task: str, **raw):
    return training_settings(get_task(task), raw)[0]


def _problems(task: str, **raw) -> list[str]:
    with pytest.raises(SettingsError) as info:
        training_settings(get_task(task), raw)
    return info.value.problems


def test_spec_defaults_for_model_agnostic_hyperparameters():
    s = _train("image_classification", model_name="resnet18")
    assert (s.number_of_epochs, s.grad_accumulation_step, s.early_stopping) == (15, 1, True)
    assert (s.early_stopping_patience, s.early_stopping_delay) == (5, 5)
    assert (s.lr_scheduler, s.step_lr_gamma, s.step_lr_step_size) == ("warmup_cosine", 0.5, 5)
    assert (s.warmup_cosine_lr_cycles, s.warmup_cosine_lr_warmup_epochs) == (0.45, 2)
    assert (s.optimizer, s.momentum, s.weight_decay, s.nesterov) == ("sgd", 0.9, 1e-4, True)
    assert (s.beta1, s.beta2, s.amsgrad) == (0.9, 0.999, False)
    assert (s.evaluation_frequency, s.validation_data_size, s.checkpoint_frequency) == (1, 0.2, None)
    assert (s.weighted_loss, s.valid_resize_size, s.valid_crop_size, s.train_crop_size) == (0, 256, 224, 224)
    assert s.advanced_settings.apply_automl_train_augmentations is True


def test_detection_defaults_follow_the_spec():
    s = _train("image_object_detection")
    assert s.model_name == "fasterrcnn_resnet50_fpn"
    assert (s.training_batch_size, s.validation_batch_size, s.learning_rate) == (2, 1, 0.005)
    assert (s.validation_metric_type, s.validation_iou_threshold) == ("voc", 0.5)
    assert (s.min_size, s.max_size, s.box_score_thresh, s.nms_iou_thresh, s.box_detections_per_img) == (
        600, 1333, 0.3, 0.5, 100)
    assert (s.tile_grid_size, s.tile_overlap_ratio, s.tile_predictions_nms_thresh) == (None, 0.25, 0.25)
    seg = _train("image_instance_segmentation")
    assert seg.model_name == "maskrcnn_resnet50_fpn"
    assert (seg.mask_pixel_score_threshold, seg.max_number_of_polygon_points, seg.export_as_image,
            seg.image_type) == (0.5, 100, False, "JPG")


def test_default_models_per_task():
    assert {name: t.default_model for name, t in TASKS.items()} == {
        "image_classification": "vitb16r224", "image_classification_multilabel": "vitb16r224",
        "image_object_detection": "fasterrcnn_resnet50_fpn", "image_instance_segmentation": "maskrcnn_resnet50_fpn"}


def test_command_line_strings_are_coerced_to_the_declared_types():
    s = _train("image_classification", model_name="resnet18", number_of_epochs="3", learning_rate="0.02",
               early_stopping="0", nesterov="false", optimizer="AdamW", checkpoint_frequency="2")
    assert (s.number_of_epochs, s.learning_rate, s.early_stopping, s.nesterov) == (3, 0.02, False, False)
    assert (s.optimizer, s.checkpoint_frequency) == ("adamw", 2)


def test_every_out_of_range_value_is_reported_with_its_allowed_range():
    problems = _problems("image_classification", model_name="resnet18", learning_rate=2, momentum=-0.1,
                         number_of_epochs=0, optimizer="rmsprop", weighted_loss=3, split_ratio=1.0)
    text = "\n".join(problems)
    assert len(problems) == 6
    assert "learning_rate=2 is out of range: must be a float in [0, 1]" in text
    assert "momentum=-0.1 is out of range: must be a float in [0, 1]" in text
    assert "number_of_epochs=0 is out of range: must be an integer >= 1" in text
    assert "optimizer=rmsprop is out of range: must be one of 'sgd', 'adam', 'adamw'" in text
    assert "weighted_loss=3" in text and "one of 0, 1, 2" in text
    assert "split_ratio=1.0 is out of range: must be a float in (0, 1)" in text


def test_wrong_types_name_the_parameter_and_what_it_accepts():
    problems = _problems("image_classification", model_name="resnet18", number_of_epochs="2.5", nesterov="maybe",
                         learning_rate="fast")
    assert any(p.startswith("number_of_epochs=2.5: expected an integer") for p in problems)
    assert any(p.startswith("nesterov=maybe: expected 0 or 1") for p in problems)
    assert any(p.startswith("learning_rate=fast: expected a number") for p in problems)


def test_unknown_parameter_suggests_the_close_spec_name():
    [problem] = _problems("image_classification", model_name="resnet18", learning_rat=0.1)
    assert "learning_rat: unknown parameter; did you mean 'learning_rate'" in problem


def test_aliases_from_the_cloud_documents_are_accepted():
    assert _train("image_classification", model_name="resnet18", split_ratio=0.3).validation_data_size == 0.3
    assert _train("image_object_detection", box_nms_thresh=0.4).nms_iou_thresh == 0.4
    assert _train("image_object_detection", box_iou_thresh=0.45).nms_iou_thresh == 0.45
    problems = _problems("image_object_detection", box_nms_thresh=0.4, nms_iou_thresh=0.3)
    assert any("given twice" in p for p in problems)


def test_yolov5_and_its_parameters_are_rejected_with_alternatives():
    [problem] = _problems("image_object_detection", model_name="yolov5")
    assert "yolov5 is not available" in problem and "fasterrcnn_resnet50_fpn" in problem
    [problem] = _problems("image_object_detection", img_size=640)
    assert problem.startswith("img_size: applies only to yolov5")


def test_advanced_settings_accepts_the_cloud_json_string():
    s = _train("image_object_detection",
               advanced_settings='{"apply_automl_train_augmentations": false, "stream_image_files": true}')
    assert s.advanced_settings.apply_automl_train_augmentations is False
    assert s.advanced_settings.stream_image_files is True
    [problem] = _problems("image_object_detection", advanced_settings="{not json")
    assert problem.startswith("advanced_settings={not json: not valid JSON")
    [problem] = _problems("image_object_detection", advanced_settings={"apply_automl_train_augmentation": 0})
    assert "apply_automl_train_augmentation: unknown parameter" in problem


def test_cross_field_rules_are_checked():
    assert any("min_size=900 is larger than max_size=800" in p
               for p in _problems("image_object_detection", min_size=900, max_size=800))
    assert any("valid_crop_size=300 is larger than valid_resize_size=256" in p
               for p in _problems("image_classification", model_name="resnet18", valid_crop_size=300))
    assert any("layers_to_freeze=6 is out of range for resnet18: it has 5 layer groups" in p
               for p in _problems("image_classification", model_name="resnet18", layers_to_freeze=6))


def test_values_the_training_code_cannot_run_with_are_refused_with_their_range():
    problems = _problems("image_object_detection", validation_iou_threshold=0, beta1=1, beta2=1, seed=2**32,
                         box_batch_size_per_image=3, rpn_batch_size_per_image=1)
    assert problems == [
        "validation_iou_threshold=0 is out of range: must be a float in (0, 1]",
        "beta1=1 is out of range: must be a float in [0, 1)",
        "beta2=1 is out of range: must be a float in [0, 1)",
        "seed=4294967296 is out of range: must be an integer in [0, 4294967295]",
        "box_batch_size_per_image=3 is out of range: must be an integer >= 4",
        "rpn_batch_size_per_image=1 is out of range: must be an integer >= 2",
    ]
    s = _train("image_object_detection", validation_iou_threshold=1, beta1=0.99, seed=2**32 - 1,
               box_batch_size_per_image=4, rpn_batch_size_per_image=2)
    assert (s.validation_iou_threshold, s.seed, s.box_batch_size_per_image) == (1, 2**32 - 1, 4)


def test_architecture_limits_on_sizes_and_batches_are_checked_before_training():
    [problem] = _problems("image_classification", model_name="vits16r224", valid_crop_size=200, train_crop_size=200)
    assert problem.startswith("valid_crop_size=200 is out of range for vits16r224: must be a multiple of 16")
    assert _train("image_classification", model_name="vits16r224", valid_crop_size=192,
                  train_crop_size=192).valid_crop_size == 192
    [problem] = _problems("image_classification", model_name="resnest50", training_batch_size=1)
    assert problem.startswith("training_batch_size=1 is out of range for resnest50") and ">= 2" in problem
    [problem] = _problems("image_classification", model_name="resnet18", training_batch_size=1, train_crop_size=32)
    assert problem.startswith("train_crop_size=32 with training_batch_size=1 is too small for resnet18")
    assert "must be an integer >= 33" in problem
    for fine in ({"training_batch_size": 1, "train_crop_size": 33}, {"training_batch_size": 2, "train_crop_size": 16}):
        _train("image_classification", model_name="resnet18", **fine)
    [problem] = _problems("image_instance_segmentation", min_size=32, max_size=64, weights="none")
    assert problem.startswith("min_size=32 is too small to train maskrcnn_resnet50_fpn from random initialisation")
    assert "must be an integer >= 33 (or start from pretrained weights: weights=DEFAULT)" in problem
    assert _train("image_object_detection", min_size=32, max_size=64).min_size == 32  # pretrained: BatchNorm frozen


@pytest.mark.parametrize("grid, message", [
    ("1x1", "single tile"), ("0x2", "positive"), ("3-2", "malformed"), ("(3, -2)", "positive"), ("three", "malformed"),
])
def test_bad_tile_grid_sizes_are_rejected(grid, message):
    problems = _problems("image_object_detection", tile_grid_size=grid)
    assert any(message in p and "tile_grid_size" in p for p in problems)


def test_tiling_with_instance_segmentation_is_rejected():
    problems = _problems("image_instance_segmentation", tile_grid_size="2x2")
    assert any("tiling is not supported for image_instance_segmentation" in p for p in problems)


@pytest.mark.parametrize("text", ["3x2", "3X2", "(3, 2)", "3,2", " ( 3 , 2 ) "])
def test_tile_grid_size_spellings(text):
    assert parse_tile_grid_size(text) == (3, 2)


def test_tile_overlap_ratio_must_be_below_one():
    assert any("tile_overlap_ratio=1 is out of range: must be a float in [0, 1)" in p
               for p in _problems("image_object_detection", tile_overlap_ratio=1))


@pytest.mark.parametrize("width, height, grid, overlap", [(1600, 1200, (3, 2), 0.25), (641, 479, (2, 3), 0.1),
                                                          (100, 100, (4, 4), 0.0)])
def test_tile_grid_covers_the_image_exactly_with_the_set_overlap(width, height, grid, overlap):
    tiles = tile_grid(width, height, grid, overlap)
    cols, rows = grid
    assert len(tiles) == cols * rows
    assert min(t.x0 for t in tiles) == 0 and min(t.y0 for t in tiles) == 0
    assert max(t.x1 for t in tiles) == pytest.approx(width) and max(t.y1 for t in tiles) == pytest.approx(height)
    first, second = tiles[0], tiles[1]
    assert first.width == pytest.approx(second.width)
    assert (first.x1 - second.x0) == pytest.approx(overlap * first.width)
    below = tiles[cols]
    assert (first.y1 - below.y0) == pytest.approx(overlap * first.height)


def test_inference_settings_round_trip_through_settings_json(tmp_path):
    task = get_task("image_object_detection")
    spec = ModelSettings(task, "fasterrcnn_resnet18_fpn", ["a", "b"],
                         inference_settings(task, {"box_score_thresh": 0.4, "tile_grid_size": "3x2"}))
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(spec.document()))
    again = read_settings(path)
    assert again.labels == ["a", "b"] and again.settings == spec.settings
    assert as_dict(again.settings)["tile_grid_size"] == "3x2"
    assert read_settings(path, {"box_score_thresh": "0.7"}).settings.box_score_thresh == 0.7


def test_edited_settings_json_is_validated_naming_the_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"task": "image_object_detection", "model_name": "fasterrcnn_resnet18_fpn",
                                "labels": ["a"], "box_score_thresh": 3, "tile_grid_size": "1x1", "colour": 1}))
    with pytest.raises(SettingsError) as info:
        read_settings(path)
    assert str(path) in str(info.value)
    assert any("box_score_thresh=3 is out of range" in p for p in info.value.problems)
    assert any("colour: unknown parameter" in p for p in info.value.problems)
