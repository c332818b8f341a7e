"""A training job handed to another process (a Ray Tune trial, a Ray Train worker): plain fields with
absolute paths and an absolute MLflow tracking URI, since that process has its own working directory;
the per-validation report such a process sends back to Tune; and a trial's training on the torch thread."""

from __future__ import annotations

import queue
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch

from models.data.streaming import is_remote
from models.tasks.registry import get_task
from models.runtime import absolute_tracking_uri, torch_thread
from models.train.loop import EpochHook, TrainingJob, TrainingResult, train


def tracking_uri() -> str:
    """The current MLflow tracking URI, made absolute."""
    return absolute_tracking_uri(mlflow.get_tracking_uri())


def _absolute(path: Any) -> str | None:
    return None if path is None else str(path) if is_remote(path) else str(Path(path).resolve())


def portable_job(job: TrainingJob) -> dict[str, Any]:
    """`job` as plain fields another process can rebuild with `job_from` (a sweep's settings stay behind)."""
    return {"task": job.task.name, "training_data": _absolute(job.training_data),
            "validation_data": _absolute(job.validation_data), "image_root": _absolute(job.image_root),
            "parameters": dict(job.parameters), "output_dir": str(Path(job.output_dir).resolve()),
            "experiment_name": job.experiment_name, "run_name": job.run_name,
            "timeout_minutes": job.timeout_minutes, "parent_run_id": job.parent_run_id,
            "node_count": job.node_count, "workers_per_node": job.workers_per_node, "min_images": job.min_images,
            "tracking_uri": tracking_uri()}


def job_from(fields: dict[str, Any]) -> TrainingJob:
    """The TrainingJob `portable_job` described, in this process (its MLflow tracking URI set)."""
    fields = dict(fields)
    mlflow.set_tracking_uri(fields.pop("tracking_uri"))
    return TrainingJob(**{**fields, "task": get_task(fields["task"]), "output_dir": Path(fields["output_dir"])})


class Board:
    """Small records by key in a Ray actor: what the processes of a sweep or a Ray Train run (on any node) tell
    the process that started them (a trial's outcome, rank 0's result), instead of files on their own node's
    disk, which the starting process on another node could not read."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.records[key] = record

    def update(self, key: str, fields: dict[str, Any]) -> None:
        self.records[key] = {**self.records.get(key, {}), **fields}

    def all(self) -> dict[str, dict[str, Any]]:
        return dict(self.records)


def model_from_run(run_id: str, target: Path) -> Path:
    """The MLflow model folder run `run_id` logged (`mlflow-model`), downloaded into `target` in place of what is
    there: a model trained on another node reaches this one through the tracking server, never its disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="mlflow-model",
                                                       dst_path=str(staging)))
        shutil.rmtree(target, ignore_errors=True)
        got.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def open_board():
    """A new Board actor (no CPU; it goes when the caller drops its handle) and the name by which other
    processes of this job find it (`board`): a name travels in a trial's or worker's config as a string does."""
    name = f"visionserve-board-{uuid.uuid4().hex}"
    return ray.remote(num_cpus=0, max_restarts=0)(Board).options(name=name).remote(), name


def board(name: str):
    """The Board `open_board` named `name`."""
    return ray.get_actor(name)


def metric_reporter(primary: str, send: Callable[[dict[str, Any]], None]) -> EpochHook:
    """An `on_epoch` hook that sends each validation of the primary metric (`tune.report`, `ray.train.report`)."""

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if primary in row:
            run = mlflow.active_run()
            send({**row, "epoch": epoch, "mlflow_run_id": run.info.run_id if run else ""})

    return on_epoch


class _Stopped(Exception):
    """The caller's `send` raised: the training thread stops at the epoch end it is waiting at."""


def train_on_one_thread(job: TrainingJob, send: Callable[[dict[str, Any]], None], *, threads: int,
                        report: Callable[[str], None]) -> TrainingResult:
    """`train(job)` on this process's torch thread (`models.runtime`), each validation of the primary metric
    handed to `send` on the calling thread, training paused meanwhile (as if `send` were called in place).
    If `send` raises (Tune stopping the trial), training ends at that epoch and the same exception is raised
    here."""
    handed: queue.Queue = queue.Queue(maxsize=1)
    answers: queue.Queue = queue.Queue(maxsize=1)

    def hand_over(metrics: dict[str, Any]) -> None:
        handed.put(metrics)
        if not answers.get():
            raise _Stopped

    def run() -> TrainingResult:
        torch.set_num_threads(threads)  # a per-thread OpenMP setting
        try:
            return train(job, progress=False, report=report,
                         on_epoch=metric_reporter(job.task.primary_metric, hand_over))
        finally:
            handed.put(None)

    training = torch_thread().submit(run)
    while (metrics := handed.get()) is not None:
        try:
            send(metrics)
        except BaseException:
            answers.put(False)
            training.exception()  # wait until the training thread has let go of the trial
            raise
        answers.put(True)
    return training.result()
