"""The training loop's features on tiny real runs: schedules, early stopping, freezing, accumulation,
checkpoints, continuing a run, MLflow tracking, validation before any work, tiling and augmentation."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import IMAGE_SIZE
from models.train import optim
from models.data.jsonl import read_dataset
from models.data.records import Record
from models.errors import DataError
from models.job import build_job
from models.errors import SettingsError
from models.tasks.registry import get_task, training_settings
from models.train.loop import prepare, split, train

FAST = {"model_name": "resnet18", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
        "training_batch_size": 3, "validation_batch_size": 8, "number_of_epochs": 1}


@pytest.fixture
def run(synth, tracking, tmp_path):
    """`run(**params)` trains a tiny classifier on 12 synthetic images and returns the result."""

    def go(task: str = "image_classification", **params):
        data = synth(task, images=16)
        job = build_job(task=task, training_data=data.train_jsonl, validation_data=data.validation_jsonl,
                        params={**FAST, **params}, output_dir=tmp_path / "out", experiment_name="tests")
        return train(job, progress=False, report=lambda _: None)

    return go


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _settings(**raw):
    return training_settings(get_task("image_classification"), {"model_name": "resnet18", **raw})[0]


def test_warmup_cosine_rises_linearly_then_follows_the_cosine_cycles():
    s = _settings(number_of_epochs=10, warmup_cosine_lr_warmup_epochs=2, warmup_cosine_lr_cycles=0.45)
    steps = 5
    assert optim.lr_factor(0, steps, s) == pytest.approx(1 / 10)
    assert optim.lr_factor(9, steps, s) == pytest.approx(1.0)
    assert optim.lr_factor(10, steps, s) == pytest.approx(1.0)
    assert optim.lr_factor(50, steps, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    values = [optim.lr_factor(i, steps, s) for i in range(10, 50)]
    assert values == sorted(values, reverse=True)


def test_step_schedule_decays_by_gamma_every_step_size_epochs():
    s = _settings(lr_scheduler="step", step_lr_gamma=0.5, step_lr_step_size=2)
    assert [optim.lr_factor(epoch * 4, 4, s) for epoch in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_early_stopping_counts_patience_only_after_the_delay():
    stopper = optim.EarlyStopping(patience=2, delay=3)
    decisions = []
    for value in [0.5, 0.4, 0.4, 0.4, 0.4, 0.6, 0.6, 0.6]:
        stopper.update(value)
        decisions.append(stopper.should_stop)
    # evaluations 2-3 are inside the delay; 4 and 5 are stale → stop at the 5th
    assert decisions == [False, False, False, False, True, False, False, True]


def test_sgd_and_adam_get_the_spec_hyperparameters():
    model = torch.nn.Linear(2, 2)
    sgd = optim.make_optimizer(model, _settings(momentum=0.8, nesterov=1, weight_decay=0.01)).param_groups[0]
    assert (sgd["momentum"], sgd["nesterov"], sgd["weight_decay"]) == (0.8, True, 0.01)
    adam = optim.make_optimizer(model, _settings(optimizer="adamw", beta1=0.8, beta2=0.99, amsgrad=1))
    assert isinstance(adam, torch.optim.AdamW)
    assert (adam.param_groups[0]["betas"], adam.param_groups[0]["amsgrad"]) == ((0.8, 0.99), True)


def test_mlflow_run_holds_parameters_epoch_metrics_checkpoint_and_model(run):
    result = run(number_of_epochs=2, learning_rate=0.02)
    client = mlflow.MlflowClient()
    data = client.get_run(result.run_id).data
    assert data.params["learning_rate"] == "0.02" and data.params["model_name"] == "resnet18"
    assert json.loads(data.params["advanced_settings"])["apply_automl_train_augmentations"] is True
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [1, 2]
    assert len(client.get_metric_history(result.run_id, "accuracy")) == 2
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoints", "mlflow-model"} <= artifacts
    assert "mlflow-model/MLmodel" in {a.path for a in client.list_artifacts(result.run_id, "mlflow-model")}
    assert result.model_dir == Path(result.model_dir.parent) / "mlflow-model" and result.model_dir.is_dir()


def test_gradient_accumulation_updates_weights_every_n_batches(run):
    # 12 training images in batches of 3 → 4 batches per epoch; accumulating 3 → updates after batch 3 and 4
    once = run(grad_accumulation_step=1)
    thrice = run(grad_accumulation_step=3)
    assert once.history[0]["optimizer_steps"] == 4
    assert thrice.history[0]["optimizer_steps"] == 2


def test_training_stops_early_when_the_metric_stalls(run):
    # lr 0: only BatchNorm statistics move, so accuracy soon stops improving
    result = run(number_of_epochs=10, learning_rate=0.0, early_stopping_patience=2, early_stopping_delay=0)
    assert result.epochs_run == result.best_epoch + 2 < 10
    assert len(result.history) == result.epochs_run


def test_evaluation_and_checkpoint_frequency(run, tmp_path):
    result = run(number_of_epochs=4, evaluation_frequency=2, checkpoint_frequency=2)
    evaluated = [i + 1 for i, row in enumerate(result.history) if "accuracy" in row]
    assert evaluated == [2, 4]
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "epoch_002.pt", "epoch_004.pt"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "checkpoints")}
    assert logged == {"checkpoints/best.pt", "checkpoints/epoch_002.pt", "checkpoints/epoch_004.pt"}


def test_a_run_cut_before_its_first_evaluation_exports_its_own_model_not_a_stale_best_pt(synth, tracking, tmp_path):
    """An earlier run left checkpoints/best.pt in the same output folder; this run's deadline passes before
    its first evaluation (evaluation_frequency 5): it evaluates once and exports its own weights."""
    data = synth("image_classification", images=16)

    def job(**params):
        return build_job(task="image_classification", training_data=data.train_jsonl,
                         validation_data=data.validation_jsonl, params={**FAST, **params},
                         output_dir=tmp_path / "out", experiment_name="tests")

    train(job(seed=1, learning_rate=0.05), progress=False, report=lambda _: None)
    best = tmp_path / "out" / "checkpoints" / "best.pt"
    stale = torch.load(best, weights_only=True)
    assert stale["settings"]["seed"] == 1
    seen, messages = [], []
    cut = replace(job(seed=2, number_of_epochs=5, evaluation_frequency=5), timeout_minutes=1e-9)  # due at once
    result = train(cut, progress=False, report=messages.append, on_epoch=lambda epoch, row: seen.append(dict(row)))
    # what the loop observed: the deadline after epoch 1, whose row had no validation in it
    assert result.epochs_run == 1 and len(seen) == 1 and "accuracy" not in seen[0]
    assert "timeout_minutes reached: stopping with the best epoch so far" in messages
    assert "no evaluation yet: evaluating epoch 1 before exporting" in messages
    assert result.best_epoch == 1 and "accuracy" in result.best_metrics and "accuracy" in result.history[0]
    own = torch.load(best, weights_only=True)
    assert own["settings"]["seed"] == 2 and own["epoch"] == 1 and own["metrics"] == result.best_metrics
    exported = torch.load(result.model_dir / "artifacts" / "model.pt", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in own["model"].items())
    assert any(not torch.equal(exported[k], v) for k, v in stale["model"].items())
    logged = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="checkpoints/best.pt",
                                                 dst_path=str(tmp_path / "logged"))
    assert torch.load(logged, weights_only=True)["settings"]["seed"] == 2
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(result.run_id, "accuracy")] == [1]


def _parameters(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix) and "running_" not in k
            and not k.endswith("num_batches_tracked")}


def test_frozen_layers_keep_their_starting_weights(run, tmp_path):
    import torchvision

    start = torchvision.models.resnet18(num_classes=4)
    torch.save(start.state_dict(), tmp_path / "start.pth")
    result = run(weights=str(tmp_path / "start.pth"), layers_to_freeze=2, learning_rate=0.05, number_of_epochs=2)
    trained = torch.load(result.model_dir / "artifacts" / "model.pt", weights_only=True)
    for name, value in _parameters(start.state_dict()).items():
        frozen = name.startswith(("conv1.", "bn1.", "layer1."))
        assert torch.equal(trained[name], value) == frozen, name


def test_by_default_training_starts_from_the_cached_pretrained_weights_and_freezes_them(run):
    """The session's cache holds torchvision's resnet18 file (random values): with no `weights` given it is
    loaded, the head is new, and layers_to_freeze keeps the frozen groups exactly as the file has them."""
    from models.train.weights import cached_file
    import torchvision

    cached = torch.load(cached_file(torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")), weights_only=True)
    result = run(layers_to_freeze=4, learning_rate=0.05, number_of_epochs=2)
    trained = torch.load(result.model_dir / "artifacts" / "model.pt", weights_only=True)
    for name, value in _parameters(cached).items():
        if name.startswith("fc."):
            assert trained[name].shape[0] == len(result.labels)  # the new head for this dataset's labels
        else:
            frozen = not name.startswith("layer4.")
            assert torch.equal(trained[name], value) == frozen, name


def test_random_layers_cannot_be_frozen():
    with pytest.raises(SettingsError, match=r"layers_to_freeze=2 would freeze randomly initialised layers "
                                            r"\(weights=none\)"):
        _settings(weights="none", layers_to_freeze=2)


def test_missing_pretrained_weights_stop_before_training_and_name_the_file(synth, tmp_path):
    data = synth("image_classification", images=16)
    job = build_job(task="image_classification", training_data=data.train_jsonl,
                    params={**FAST, "model_name": "resnet34"}, output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"ResNet34_Weights.IMAGENET1K_V1: not in the torch cache.*"
                                         r"resnet34-b627a593.pth.*weights=none"):
        prepare(job)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_input_normalisation_comes_from_the_pretrained_weights_into_settings_json(synth, tmp_path):
    """timm's ViT-S/16 weights were trained on inputs scaled to [-1, 1]: the training transforms and the
    exported settings.json say so; ImageNet statistics stay for torchvision's weights and from scratch."""
    from weights_cache import put_timm

    put_timm("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", compact=True)
    data = synth("image_classification", images=16)
    common = {"valid_resize_size": 32, "valid_crop_size": 32, "train_crop_size": 32}
    vit = prepare(build_job(task="image_classification", training_data=data.train_jsonl,
                            params={"model_name": "vits16r224", **common}, output_dir=tmp_path / "vit"))
    assert vit.weights.name == "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"
    assert vit.settings.image_mean == (0.5, 0.5, 0.5) and vit.settings.image_std == (0.5, 0.5, 0.5)
    for weights in ("DEFAULT", "none"):
        resnet = prepare(build_job(task="image_classification", training_data=data.train_jsonl,
                                   params={**FAST, "weights": weights}, output_dir=tmp_path / weights))
        assert resnet.settings.image_mean == (0.485, 0.456, 0.406)


def test_exported_settings_carry_the_normalisation_the_model_was_trained_with(run):
    result = run(number_of_epochs=1, image_mean=[0.5, 0.4, 0.3], image_std="0.2, 0.2, 0.2")
    settings_file = result.model_dir / "artifacts" / "settings.json"
    settings = json.loads(settings_file.read_text())
    assert settings["image_mean"] == [0.5, 0.4, 0.3] and settings["image_std"] == [0.2, 0.2, 0.2]
    import base64

    import mlflow.pyfunc
    import pandas as pd

    rows = pd.DataFrame({"image": [base64.b64encode(_tiny_png()).decode()]})
    trained_with = mlflow.pyfunc.load_model(str(result.model_dir)).predict(rows)[0]["probs"]
    settings_file.write_text(json.dumps({**settings, "image_mean": [0.0, 0.0, 0.0]}))
    other = mlflow.pyfunc.load_model(str(result.model_dir)).predict(rows)[0]["probs"]
    assert not np.allclose(trained_with, other)  # scoring normalises with what settings.json says


def test_continuing_from_a_checkpoint_path_or_run_id_starts_from_its_weights(run, tmp_path):
    first = run(number_of_epochs=1, learning_rate=0.05)
    best = tmp_path / "out" / "checkpoints" / "best.pt"
    saved = _parameters(torch.load(best, weights_only=True)["model"])
    for how in ({"checkpoint_path": str(best)}, {"checkpoint_run_id": first.run_id}):
        again = run(learning_rate=0.0, **how)  # lr 0: the parameters stay exactly where the checkpoint left them
        exported = torch.load(again.model_dir / "artifacts" / "model.pt", weights_only=True)
        assert all(torch.equal(exported[k], v) for k, v in saved.items()), how


def test_continuing_with_a_different_architecture_is_refused(run, tmp_path):
    run(number_of_epochs=1)
    best = tmp_path / "out" / "checkpoints" / "best.pt"
    with pytest.raises(ValueError, match="the checkpoint is a resnet18, not a resnet34"):
        run(model_name="resnet34", checkpoint_path=str(best))


def test_invalid_parameters_are_rejected_before_any_run_or_file(synth, tracking, tmp_path):
    data = synth("image_classification")
    before = len(mlflow.search_runs(experiment_names=["tests"]))
    job = build_job(task="image_classification", training_data=data.train_jsonl, output_dir=tmp_path / "out",
                    params={**FAST, "learning_rate": 5, "optimizer": "lbfgs"}, experiment_name="tests")
    with pytest.raises(SettingsError) as info:
        train(job, progress=False)
    assert len(info.value.problems) == 2
    assert len(mlflow.search_runs(experiment_names=["tests"])) == before
    assert not (tmp_path / "out").exists()


def test_bad_data_is_rejected_before_training_with_every_problem(synth, tracking, tmp_path):
    data = synth("image_object_detection")
    lines = Path(data.train_jsonl).read_text().splitlines()
    broken = json.loads(lines[1])
    broken["label"][0]["topX"] = 1.5
    lines[1] = json.dumps(broken)
    lines[4] = '{"image_url": "images/missing.png", "label": []}'
    bad = Path(data.train_jsonl).parent / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    job = build_job(task="image_object_detection", training_data=bad, output_dir=tmp_path / "out",
                    params={"number_of_epochs": 1}, experiment_name="tests")
    with pytest.raises(DataError) as info:
        train(job, progress=False)
    problems = info.value.problems
    assert any(p.startswith("bad.jsonl:2: label[0].topX: 1.5 is outside [0, 1]") for p in problems)
    assert any(p.startswith("bad.jsonl:5: image_url: image not found") for p in problems)
    assert any("at least 10 are needed" in p for p in problems) is False


def test_without_validation_data_the_training_set_is_split_by_validation_data_size(synth):
    data = synth("image_classification", images=20, validation_fraction=0.0)
    job = build_job(task="image_classification", training_data=data.train_jsonl,
                    params={**FAST, "validation_data_size": 0.25})
    prepared = prepare(job)
    assert (len(prepared.train), len(prepared.validation)) == (15, 5)
    assert not {r.image for r in prepared.train} & {r.image for r in prepared.validation}


def test_split_is_reproducible_by_seed():
    records = [Record(f"{i}.png", "a", "x.jsonl", i) for i in range(30)]
    assert split(records, 0.2, 1) == split(records, 0.2, 1)
    assert split(records, 0.2, 1) != split(records, 0.2, 2)


def test_weighted_loss_gives_rare_classes_more_weight():
    from models.tasks.classification import class_weights

    records = [Record("x", "a", "f", i) for i in range(9)] + [Record("y", "b", "f", 9)]
    none = class_weights(records, ["a", "b"], 0, multilabel=False)
    full = class_weights(records, ["a", "b"], 2, multilabel=False)
    root = class_weights(records, ["a", "b"], 1, multilabel=False)
    assert none is None
    assert full[1] / full[0] == pytest.approx(9.0)
    assert root[1] / root[0] == pytest.approx(3.0)


def test_training_tiles_hold_the_objects_they_cut_shifted_into_tile_coordinates(synth):
    data = synth("image_object_detection", images=12)
    task = get_task("image_object_detection")
    settings, _ = training_settings(task, {"tile_grid_size": "2x2", "tile_overlap_ratio": 0.25,
                                           "advanced_settings": '{"apply_automl_train_augmentations": false}'})
    records = read_dataset(data.train_jsonl, task.name).records
    dataset = task.ops.dataset(records, data.labels, settings, train=True)
    tiles = dataset.items[len(records):]
    assert tiles and len(dataset) == len(records) + len(tiles)
    width, height = IMAGE_SIZE
    tile_w, tile_h = width / (2 - 0.25), height / (2 - 0.25)
    for i in range(len(records), len(dataset)):
        image, target = dataset[i]
        record, tile = dataset.items[i]
        assert image.shape[1:] == (round(tile.y1) - int(tile.y0), round(tile.x1) - int(tile.x0))
        assert abs(image.shape[2] - tile_w) <= 1 and abs(image.shape[1] - tile_h) <= 1
        assert len(target["boxes"]) >= 1
        left, top = tile.pixel_box()[:2]
        originals = [[b.x0 * width - left, b.y0 * height - top] for b in record.label]
        for box in target["boxes"].tolist():
            assert 0 <= box[0] < box[2] <= image.shape[2] + 1e-3 and 0 <= box[1] < box[3] <= image.shape[1] + 1e-3
            # a box that starts inside the tile keeps its exact shifted corner
            if box[0] > 0 and box[1] > 0:
                assert any(np.allclose(box[:2], o, atol=1e-3) for o in originals)


def test_segmentation_augmentations_keep_masks_and_boxes_together(synth):
    data = synth("image_instance_segmentation", images=12)
    task = get_task("image_instance_segmentation")
    settings, _ = training_settings(task, {})
    records = read_dataset(data.train_jsonl, task.name).records
    dataset = task.ops.dataset(records, data.labels, settings, train=True)
    torch.manual_seed(0)
    checked = 0
    for _ in range(3):
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
            masks = target["masks"]
            assert masks.shape[0] == len(target["boxes"]) == len(target["labels"])
            for mask, box in zip(masks, target["boxes"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert len(xs) > 0
                # boxes are re-fitted to what is left of each mask after a crop has cut it
                assert (xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()) == tuple(box.tolist())
                checked += 1
    assert checked > 20
