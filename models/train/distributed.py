"""Data-parallel training on Ray Train (training.md, "Large data"): `TorchTrainer` with one worker per
GPU (or CPU process) on each of `node_count_per_trial` nodes; gloo on CPUs, NCCL on GPUs.

Every worker runs the ordinary training loop on its shard of the training data with the model in
DistributedDataParallel; rank 0 validates, logs to MLflow, checkpoints and exports the model. Rank 0 may run on
any node: its result reaches the driver through a Board actor, and the model through the MLflow run it logged
(downloaded into `<output>/mlflow-model`), never through rank 0's disk.
Inside a sweep trial (node_count_per_trial > 1 with a search space) every worker also reports each
validation with `ray.train.report`, which `TuneReportCallback` hands to the trial's Tune scheduler.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from models.train.remote import board, job_from, metric_reporter, model_from_run, open_board, portable_job
from models.train.loop import TrainingJob, TrainingResult, train


class RayTrainDistribute:
    """What the training loop needs on a Ray Train worker: rank, device, sharding, DDP, broadcast."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self.rank = ray.train.get_context().get_world_rank()
        self.world_size = ray.train.get_context().get_world_size()
        self.device = ray.train.torch.get_device()

    def loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def share(self, value: Any) -> Any:
        """Rank 0's value on every worker (validation metrics, the stop decision)."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every worker's value, in rank order, on every worker (what each rank trained on)."""
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out


def _worker(ctx: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train

    job = job_from(ctx["job"])
    torch.set_num_threads(max(1, round(ctx["cpus"])))
    distribute = RayTrainDistribute()
    # inside a sweep trial every worker reports (Ray Train's report is collective); Tune sees rank 0's
    on_epoch = metric_reporter(job.task.primary_metric, ray.train.report) if ctx["report_to_tune"] else None
    result = train(job, progress=False, report=lambda m: print(m, file=sys.stderr, flush=True), distribute=distribute,
                   on_epoch=on_epoch)
    if result is not None:  # rank 0
        ray.get(board(ctx["board"]).put.remote("result", {
            "run_id": result.run_id, "labels": result.labels, "best_epoch": result.best_epoch,
            "best_metrics": result.best_metrics, "epochs_run": result.epochs_run, "history": result.history,
            "workers": result.workers, "node": ray.get_runtime_context().get_node_id()}))


def worker_count(job: TrainingJob) -> tuple[int, bool]:
    """(Ray Train workers, use_gpu): workers_per_node (default: the GPUs of a node, else 1) × nodes."""
    gpus = torch.cuda.device_count()
    per_node = job.workers_per_node or max(1, gpus)
    return per_node * job.node_count, gpus > 0


def train_distributed(job: TrainingJob, *, report: Callable[[str], None] | None = None,
                      workers: int | None = None, use_gpu: bool | None = None, cpus_per_worker: float | None = None,
                      in_tune_trial: bool = False) -> TrainingResult:
    """Train `job` data-parallel on the Ray cluster; returns the same result as `train`. In a Tune trial
    (`in_tune_trial`) the validations go on to the trial's scheduler."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from models.runtime import cpus_each, ensure_ray, node_cpus

    report = report or (lambda message: print(message, file=sys.stderr))
    started = time.time()
    counted, gpu = worker_count(job)
    workers, use_gpu = workers or counted, gpu if use_gpu is None else use_gpu
    if not in_tune_trial:
        ensure_ray()
    cpus = cpus_per_worker or cpus_each(workers, node_cpus())  # each worker's CPUs on one node
    output = job.output_dir.resolve()
    output.mkdir(parents=True, exist_ok=True)
    results, results_name = open_board()
    ctx = {"job": portable_job(replace(job, output_dir=output, sweep=None)), "cpus": cpus,
           "report_to_tune": in_tune_trial, "board": results_name}
    report(f"Ray Train: {workers} workers ({'GPU' if use_gpu else f'{cpus} CPU'} each), "
           f"backend {'nccl' if use_gpu else 'gloo'}")
    trainer = TorchTrainer(
        _worker, train_loop_config=ctx,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus}),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(output / "ray_results"),
                             callbacks=[TuneReportCallback()] if in_tune_trial else None),
    )
    trainer.fit()
    done = ray.get(results.all.remote()).get("result")
    ray.kill(results)
    if done is None:
        raise RuntimeError("Ray Train finished without a result from rank 0; see the workers' output above")
    model_dir = model_from_run(done["run_id"], output / "mlflow-model")
    report(f"MLflow model: {model_dir}  (run {done['run_id']}, trained by rank 0 on node {done['node'][:12]})")
    return TrainingResult(model_dir, done["run_id"], done["labels"], done["best_epoch"], done["best_metrics"],
                          done["epochs_run"], done["history"], time.time() - started, done["workers"])
