"""The training loop: data → model → epochs with validation, early stopping, checkpoints,
MLflow tracking → the MLflow model folder at `<output>/mlflow-model`.

Everything is validated (settings, then every line and image of the data) before the first
batch; the loop itself is task-agnostic and calls `task.ops` for data, loss and metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.train import checkpoints
from models.data import streaming
from models.tasks.architectures import Architecture, build_model, freeze_layers, trains_batchnorm
from models.data.checks import MIN_TRAINING_IMAGES, check_training_set
from models.data.jsonl import read_dataset
from models.data.records import Dataset, Record
from models.errors import DataError
from models.export import SETTINGS_FILE, export_model, model_settings_from_training, read_settings
from models.onnx_int8 import QuantizationData, quantized_at_export
from models.train.optim import EarlyStopping, make_optimizer, make_scheduler
from models.tasks.fields import as_dict
from models.tasks.registry import Task, training_settings
from models.train import weights
from models.train.weights import Source, load_weights

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]  # (epoch, that epoch's metrics row) after it is logged


@dataclass
class TrainingJob:
    """What to train: the task, where the data is, the raw parameters, where outputs go."""

    task: Task
    training_data: str | Path
    validation_data: str | Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    output_dir: Path = Path("outputs")
    image_root: str | Path | None = None
    experiment_name: str = "visionserve"
    run_name: str | None = None
    timeout_minutes: float | None = None
    sweep: Any = None  # models.sweep.settings.SweepSettings when the job is a sweep
    parent_run_id: str | None = None  # a sweep trial's MLflow run is nested under its sweep's run
    node_count: int = 1  # properties.node_count_per_trial
    workers_per_node: int | None = None  # Ray Train workers per node (default: its GPUs, else 1)
    min_images: int = MIN_TRAINING_IMAGES  # training images needed (the hub's few-shot service asks fewer)


@dataclass
class Prepared:
    settings: Any
    arch: Architecture
    train: list[Record]
    validation: list[Record]
    labels: list[str]
    weights: Source | None = None  # where the starting weights come from (None: random initialisation)


@dataclass
class TrainingResult:
    model_dir: Path
    run_id: str
    labels: list[str]
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    history: list[dict[str, float]]
    seconds: float
    workers: list[dict[str, int]] = field(default_factory=list)  # what each rank trained on (`_Loop.work`)


def split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Random train/validation split keeping at least one image on each side."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(max(1, round(len(records) * fraction)), len(records) - 1)
    val = set(order[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def prepare(job: TrainingJob) -> Prepared:
    """Validate the settings, then every line and image; raise before any training work."""
    settings, arch = training_settings(job.task, job.parameters)
    stream = settings.advanced_settings.stream_image_files and streaming.is_remote(job.image_root)
    root = streaming.PLACEHOLDER if stream else job.image_root
    train = read_dataset(job.training_data, job.task.name, image_root=root)
    validation: Dataset | None = None
    if job.validation_data is not None:
        validation = read_dataset(job.validation_data, job.task.name, image_root=root)
    if stream:  # images are fetched through the bounded cache when first opened (validation below)
        for dataset in (train, validation) if validation is not None else (train,):
            dataset.records = streaming.stream_records(dataset.records, str(job.image_root))
    for warning in train.warnings + (validation.warnings if validation else []):
        log.warning("skipped (MLTable invalid_lines: drop): %s", warning)
    check_training_set(train, validation, job.min_images)
    source = None if settings.checkpoint_path or settings.checkpoint_run_id else weights.resolve(arch, settings.weights)
    if source is not None:
        weights.available(source)  # downloaded now, or stop before training with what to put where
        if job.task.is_classification and source.mean and "image_mean" not in job.parameters:
            normalisation = {"image_mean": source.mean, "image_std": source.std or settings.image_std}
            settings = settings.model_copy(update=normalisation)  # what the pretrained network expects
    labels = train.labels()
    if validation is None:
        train_records, val_records = split(train.records, settings.validation_data_size, settings.seed)
    else:
        train_records, val_records = train.records, validation.records
    return Prepared(settings, arch, train_records, val_records, labels, source)


def _workers(settings) -> int:
    if settings.num_workers is not None:
        return settings.num_workers
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def _loader(dataset, batch_size: int, *, train: bool, collate, workers: int, seed: int, classification: bool):
    return DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=train, collate_fn=collate,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        # BatchNorm cannot train on a last batch of one image
        drop_last=train and classification and len(dataset) > batch_size,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _flat_params(settings, extra: dict[str, Any]) -> dict[str, Any]:
    values = as_dict(settings)
    values["advanced_settings"] = json.dumps(values["advanced_settings"])
    return {**values, **extra}


def _build(prepared: Prepared, task: Task, report: Callable[[str], None]) -> torch.nn.Module:
    s, arch = prepared.settings, prepared.arch
    resume = s.checkpoint_path or s.checkpoint_run_id
    model = build_model(arch, len(prepared.labels), s, trainable_bn=trains_batchnorm(s))
    if prepared.weights is not None and not resume:
        report(str(load_weights(model, arch, s.weights)))
    elif not resume:
        report(f"{arch.name}: random initialisation (weights=none); weights=DEFAULT starts from its pretrained weights")
    if resume:
        path = s.checkpoint_path or checkpoints.download_run_checkpoint(s.checkpoint_run_id)
        ckpt = checkpoints.read_checkpoint(path)
        checkpoints.load_into(model, ckpt, task=task.name, labels=prepared.labels, model_name=arch.name)
        report(f"continuing from {path} (epoch {ckpt['epoch']}, {json.dumps(ckpt['metrics'])})")
    if s.layers_to_freeze:
        freeze_layers(model, arch, s.layers_to_freeze)
    return model


class _Loop:
    """One run's mutable state; `run` walks the epochs."""

    def __init__(self, job: TrainingJob, prepared: Prepared, device: torch.device, report: Callable[[str], None],
                 progress: bool, distribute: Any = None):
        self.job, self.p, self.device, self.report, self.progress = job, prepared, device, report, progress
        self.dist = distribute  # models.train.distributed.RayTrainDistribute on a Ray Train worker
        self.lead = distribute is None or distribute.rank == 0  # logs, evaluates, checkpoints
        self.task, self.s = job.task, prepared.settings
        ops = self.task.ops
        workers = _workers(self.s)
        train_ds = ops.dataset(prepared.train, prepared.labels, self.s, train=True)
        val_ds = ops.dataset(prepared.validation, prepared.labels, self.s, train=False)
        common = dict(collate=ops.collate, workers=workers, seed=self.s.seed, classification=self.task.is_classification)
        self.train_loader = _loader(train_ds, self.s.training_batch_size, train=True, **common)
        self.val_loader = _loader(val_ds, self.s.validation_batch_size, train=False, **common)
        self.loss_context = ops.loss_context(prepared.train, prepared.labels, self.s)
        self.model = _build(prepared, self.task, report).to(device)
        if distribute is not None:
            self.train_loader = distribute.loader(self.train_loader)
            self.model = distribute.model(self.model)
        self.optimizer = make_optimizer(self.model, self.s)
        steps = math.ceil(len(self.train_loader) / self.s.grad_accumulation_step)
        self.scheduler = make_scheduler(self.optimizer, steps, self.s)
        self.stopper = EarlyStopping(self.s.early_stopping_patience, self.s.early_stopping_delay, self.s.early_stopping)
        self.ckpt_dir = job.output_dir / "checkpoints"
        self.history: list[dict[str, float]] = []
        self.updates = 0
        self.batches = self.images = 0  # trained on by this rank, all epochs
        self.best_epoch, self.best_metrics = 0, {}
        self.best_path: Path | None = None  # this run's own best checkpoint, never one an earlier run left here
        self.evaluated: tuple[int, dict[str, float]] = (0, {})  # the latest evaluation: (epoch, metrics)

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        accumulate = self.s.grad_accumulation_step
        total, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.s.number_of_epochs}", unit="batch",
                   disable=None if self.progress else True, leave=False, dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar, start=1):
            loss = self.task.ops.loss(self.model, batch, self.device, self.loss_context)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: the loss became {loss.item()}; lower learning_rate "
                                         f"(now {self.s.learning_rate})")
            (loss / accumulate).backward()
            if i % accumulate == 0 or i == len(self.train_loader):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.updates += 1
            total += loss.item()
            count += 1
            self.batches, self.images = self.batches + 1, self.images + len(batch[0])
            bar.set_postfix(loss=f"{total / count:.4f}")
        return total / max(count, 1)

    def work(self) -> dict[str, int]:
        """What this rank trained on: its rank, batches, images and optimizer steps over all epochs."""
        rank = self.dist.rank if self.dist is not None else 0
        return {"rank": rank, "batches": self.batches, "images": self.images, "optimizer_steps": self.updates}

    @property
    def net(self) -> torch.nn.Module:
        """The model itself (unwrapped from DistributedDataParallel)."""
        return getattr(self.model, "module", self.model)

    def evaluate(self) -> dict[str, float]:
        metrics = None
        if self.lead:
            self.net.eval()
            with torch.inference_mode():
                metrics = self.task.ops.evaluate(self.net, self.val_loader, self.p.labels, self.s)
        return self.dist.share(metrics) if self.dist is not None else metrics

    def checkpoint(self, name: str, epoch: int, metrics: dict[str, float]) -> Path:
        return checkpoints.save_checkpoint(
            self.ckpt_dir / name, model=self.net, task=self.task.name, model_name=self.p.arch.name,
            labels=self.p.labels, settings=_flat_params(self.s, {}), epoch=epoch, metrics=metrics)

    def run(self, deadline: float | None, on_epoch: EpochHook | None = None) -> int:
        """Train until the last epoch, early stopping or the deadline; → the epochs run. Every rank ends with
        this run's best epoch settled (and rank 0 with its checkpoint in `best_path`)."""
        epochs_run = self._epochs(deadline, on_epoch)
        if self.best_epoch == 0:
            self._settle_best(epochs_run)
        return epochs_run

    def _settle_best(self, epoch: int) -> None:
        """No evaluation of this run became its best (the deadline came before the first one, or the primary
        metric was never a number): the model as it is now is the best, evaluated first if it was not."""
        at, metrics = self.evaluated
        if at != epoch:
            if self.lead:
                self.report(f"no evaluation yet: evaluating epoch {epoch} before exporting")
            metrics = self.evaluate()
            self.evaluated = (epoch, metrics)
            self.history[-1].update(metrics)
            if self.lead:
                mlflow.log_metrics(metrics, step=epoch)
        self.best_epoch, self.best_metrics = epoch, metrics
        if self.lead:
            self.best_path = self.checkpoint("best.pt", epoch, metrics)

    def _epochs(self, deadline: float | None, on_epoch: EpochHook | None) -> int:
        primary = self.task.primary_metric
        epochs = self.s.number_of_epochs
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            row = {"train_loss": train_loss, "learning_rate": self.optimizer.param_groups[0]["lr"],
                   "optimizer_steps": float(self.updates)}
            note = ""
            if epoch % self.s.evaluation_frequency == 0 or epoch == epochs:
                metrics = self.evaluate()
                self.evaluated = (epoch, metrics)
                row.update(metrics)
                value = metrics.get(primary, float(epoch))  # no metric (validation_metric_type none): latest wins
                if self.stopper.update(value):
                    self.best_epoch, self.best_metrics = epoch, metrics
                    if self.lead:
                        self.best_path = self.checkpoint("best.pt", epoch, metrics)
                    note = " (best)"
            row["epoch_seconds"] = time.perf_counter() - start
            self.history.append(row)
            if not self.lead:
                if on_epoch is not None:
                    on_epoch(epoch, row)
                if self.stopper.should_stop or (deadline is not None and self.dist.share(time.time() > deadline)):
                    return epoch
                continue
            mlflow.log_metrics(row, step=epoch)
            if self.s.checkpoint_frequency and epoch % self.s.checkpoint_frequency == 0:
                mlflow.log_artifact(str(self.checkpoint(f"epoch_{epoch:03d}.pt", epoch, row)), "checkpoints")
            shown = f"  {primary} {row[primary]:.4f}" if primary in row else ""
            self.report(f"epoch {epoch}/{epochs}  loss {train_loss:.4f}{shown}{note}  {row['epoch_seconds']:.1f}s")
            if on_epoch is not None:
                on_epoch(epoch, row)
            if self.stopper.should_stop:
                self.report(f"early stopping: no {primary} improvement in {self.stopper.patience} evaluations")
                return epoch
            late = deadline is not None and time.time() > deadline
            if deadline is not None and self.dist is not None:
                late = self.dist.share(late)  # every worker stops at the same epoch
            if late:
                self.report("timeout_minutes reached: stopping with the best epoch so far")
                return epoch
        return epochs


def train(job: TrainingJob, *, progress: bool = True, report: Callable[[str], None] | None = None,
          on_epoch: EpochHook | None = None, distribute: Any = None) -> TrainingResult | None:
    """Run one training job end to end; returns where the MLflow model folder is (None on a Ray Train
    worker other than rank 0, which only trains)."""
    report = report or (lambda message: tqdm.write(message, file=sys.stderr))
    started = time.time()
    prepared = prepare(job)
    _seed_everything(prepared.settings.seed)
    device = distribute.device if distribute is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if distribute is not None and distribute.rank != 0:
        deadline = started + job.timeout_minutes * 60 if job.timeout_minutes else None
        loop = _Loop(job, prepared, device, lambda _: None, False, distribute)
        loop.run(deadline, on_epoch)
        distribute.gather(loop.work())  # collective: rank 0 records every rank's work
        return None
    job.output_dir.mkdir(parents=True, exist_ok=True)
    report(f"{job.task.name}: {prepared.arch.name}, {len(prepared.train)} training / {len(prepared.validation)} "
           f"validation images, {len(prepared.labels)} labels, on {device}")
    mlflow.set_experiment(job.experiment_name)
    with mlflow.start_run(run_name=job.run_name, parent_run_id=job.parent_run_id) as run:
        mlflow.set_tags({"task": job.task.name, "model_name": prepared.arch.name})
        mlflow.log_params(_flat_params(prepared.settings, {"task": job.task.name, "n_labels": len(prepared.labels),
                                                           "n_train": len(prepared.train),
                                                           "n_validation": len(prepared.validation)}))
        mlflow.log_dict({"labels": prepared.labels}, "labels.json")
        loop = _Loop(job, prepared, device, report, progress, distribute)
        deadline = started + job.timeout_minutes * 60 if job.timeout_minutes else None
        epochs_run = loop.run(deadline, on_epoch)
        workers = distribute.gather(loop.work()) if distribute is not None else [loop.work()]
        if distribute is not None:
            mlflow.log_dict({"workers": workers}, "workers.json")
            report("Ray Train workers: " + ", ".join(f"rank {w['rank']} trained on {w['images']} images in "
                                                     f"{w['batches']} batches" for w in workers))
        best = checkpoints.read_checkpoint(loop.best_path)  # this run's own: run() always settles one
        mlflow.log_artifact(str(loop.best_path), "checkpoints")
        spec = model_settings_from_training(job.task, prepared.arch.name, prepared.labels, prepared.settings)
        int8 = QuantizationData(prepared.train, prepared.validation) if quantized_at_export(job.task) else None
        model_dir = export_model(job.output_dir / "mlflow-model", spec, best["model"], quantization=int8)
        mlflow.log_artifacts(str(model_dir), "mlflow-model")
        _log_int8(model_dir, report)
        mlflow.log_metrics({f"best_{k}": v for k, v in loop.best_metrics.items()})
        report(f"best epoch {loop.best_epoch}: {json.dumps({k: round(v, 4) for k, v in loop.best_metrics.items()})}")
        report(f"MLflow model: {model_dir}  (run {run.info.run_id})")
    return TrainingResult(model_dir, run.info.run_id, prepared.labels, loop.best_epoch, loop.best_metrics,
                          epochs_run, loop.history, time.time() - started, workers)


def _log_int8(model_dir: Path, report: Callable[[str], None]) -> None:
    """What the folder's model.int8.onnx costs (settings.json's `int8`), on the run and in the log."""
    record = read_settings(model_dir / "artifacts" / SETTINGS_FILE).int8
    if record is not None:
        mlflow.log_metrics({f"int8_{record.metric}": record.int8, f"int8_fp32_{record.metric}": record.fp32,
                            "int8_agreement": record.agreement})
        report(f"INT8 model: {record.metric} {record.int8:.4f} (FP32 {record.fp32:.4f}) on {record.images} "
               f"validation images, same top answer for {record.agreement:.1%}")


__all__ = ["TrainingJob", "TrainingResult", "train", "prepare", "split", "DataError"]
