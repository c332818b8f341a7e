"""Hyperparameter sweeps on Ray Tune (training.md, "Job settings"): trials as nested MLflow runs,
early termination, a timeout that still exports the best finished trial, a summary table.

Each trial runs the ordinary training loop (`models.train.loop.train`) in a Ray Tune trial with its
share of a node; its validations are reported to Tune, whose scheduler may stop it early. A trial may run on
any node of the cluster: it tells the sweep how it went through a Board actor and logs its model to its MLflow
run, so nothing is read from a trial's disk. The best trial by the task's primary metric becomes
`<output>/mlflow-model`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import optuna
import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import CombinedStopper

from models.data.jsonl import read_dataset
from models.errors import SettingsError
from models.runtime import cpus_each, ensure_ray, free_cpus, node_cpus
from models.sweep.report import collect, export_best, summary_table
from models.sweep.search_space import auto_search_space, grid_configs, random_configs, tune_space
from models.sweep.settings import JobLimits, SweepSettings
from models.sweep.termination import CallerStopper, ExitScoreStopper, make_scheduler
from models.tasks.registry import training_settings
from models.train.distributed import train_distributed, worker_count
from models.train.loop import TrainingJob, prepare, train
from models.train.remote import board, job_from, open_board, portable_job, train_on_one_thread

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    model_dir: Path
    run_id: str  # the sweep's (parent) MLflow run
    best: dict[str, Any]  # the best trial's summary row
    trials: list[dict[str, Any]]
    seconds: float


def run_trial(config: dict[str, Any]) -> None:
    """The Ray Tune trainable: one trial = one `train` with the trial's hyperparameters, on whichever node Tune
    placed it; its outcome goes to the sweep's board (`ctx["board"]`), its model to its MLflow run."""
    ctx = config["__ctx"]
    trials = board(ctx["board"])
    trial_id = tune.get_context().get_trial_id()
    if "__trial" in config:
        index, params = config["__trial"]["index"], config["__trial"]["params"]
    else:
        index, params = None, {k: v for k, v in config.items() if not k.startswith("__")}
    base = job_from(ctx["job"])
    folder = base.output_dir / "trials" / trial_id  # this trial's own files, on its node only
    now = time.time()
    record = {"trial_id": trial_id, "index": index, "params": params, "started": now,
              "node": ray.get_runtime_context().get_node_id(), "checkpoint": str(folder / "checkpoints" / "best.pt")}
    deadline = ctx["deadline"]
    if ctx["trial_timeout_s"]:
        deadline = min(deadline, now + ctx["trial_timeout_s"])
    # a trial of this sweep that validated has a best checkpoint: something to export
    exportable = any(r.get("validated") for r in ray.get(trials.all.remote()).values())
    if now >= ctx["deadline"] and exportable:  # past the timeout with something to export: start no more trials
        ray.get(trials.put.remote(trial_id, {**record, "status": "skipped (timeout)", "ended": now}))
        return
    parameters = {**base.parameters, **params}
    ray.get(trials.put.remote(trial_id, {**record, "status": "running", "parameters": parameters}))
    job = replace(base, parameters=parameters, output_dir=folder,
                  run_name=f"{base.run_name}-trial-{index if index is not None else trial_id}",
                  timeout_minutes=max(deadline - now, 1e-3) / 60)
    if ctx["workers"] > 1:  # node_count_per_trial > 1: this trial trains data-parallel on Ray Train

        result = train_distributed(job, report=log.info, workers=ctx["workers"], use_gpu=ctx["use_gpu"],
                                   cpus_per_worker=ctx["cpus"], in_tune_trial=True)
    else:
        def send(metrics: dict[str, Any]) -> None:
            trials.update.remote(trial_id, {"validated": True, "run_id": metrics.get("mlflow_run_id")})
            tune.report(metrics)

        result = train_on_one_thread(job, send, threads=max(1, round(ctx["cpus"])), report=log.info)
    ray.get(trials.update.remote(trial_id, {
        "status": "completed", "validated": True, "run_id": result.run_id, "metrics": result.best_metrics,
        "best_epoch": result.best_epoch, "epochs": result.epochs_run, "ended": time.time()}))


def _configs(sweep: SweepSettings, seed: int) -> list[dict[str, Any]] | None:
    """Every trial's sampled hyperparameters (random, grid), or None where Tune's searcher samples (bayesian)."""
    if sweep.sampling_algorithm == "grid":
        return grid_configs(sweep.search_space)[: sweep.limits.max_trials]
    if sweep.sampling_algorithm == "random":
        return random_configs(sweep.search_space, sweep.limits.max_trials, seed)
    return None


def _check_configs(job: TrainingJob, configs: list[dict[str, Any]]) -> None:
    """Every trial's settings are valid before the first one starts."""
    problems = []
    for i, params in enumerate(configs):
        try:
            training_settings(job.task, {**job.parameters, **params})
        except SettingsError as exc:
            problems += [f"trial {i} {json.dumps(params)}: {p}" for p in exc.problems]
    if problems:
        raise SettingsError(problems, "search space")


TRIAL_DRIVER_CPU = 0.01  # a data-parallel trial's own actor only drives its Ray Train run


def _resources(concurrent: int, workers: int = 1, asks: dict[str, float] | None = None) -> dict[str, float]:
    """One trial's (or, data-parallel, one Ray Train worker's) share of the Ray cluster: its CPUs (and GPUs)
    split across the concurrent trials and their workers, each share on one node (`cpus_each`) of those that
    have the custom resources the trials ask for (`asks`)."""
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0) / (concurrent * workers)
    gpus = math.floor(gpus) if gpus >= 1 else round(gpus, 3)
    # what is free now: a Serve deployment on the same instance (the hub's) keeps its share
    # only some nodes may run trials that ask for custom resources: then what one of them has free
    free = min(total.get("CPU", 1), (free_cpus(asks) if asks else ray.available_resources().get("CPU", 0)) + 1e-6)
    if workers == 1:
        return {"cpu": cpus_each(concurrent, node_cpus(asks), free), "gpu": gpus}
    share = (free - concurrent * TRIAL_DRIVER_CPU) / (concurrent * workers)
    share = min(share, cpus_each(concurrent * workers, node_cpus(asks)))
    return {"cpu": max(0.001, math.floor(share * 1000) / 1000), "gpu": gpus}  # the trial actors hold the rest


def _concurrency(limits: JobLimits, nodes: int, report: Callable[[str], None]) -> int:
    """max_concurrent_trials, capped so that concurrent trials × node_count_per_trial <= max_nodes."""
    concurrent = limits.max_concurrent_trials
    if limits.max_nodes is not None and concurrent * nodes > limits.max_nodes:
        concurrent = max(1, limits.max_nodes // nodes)
        report(f"limits.max_nodes={limits.max_nodes} with node_count_per_trial={nodes}: "
               f"{concurrent} trial(s) at a time")
    return concurrent


def _searcher(sweep: SweepSettings, seed: int):
    if sweep.sampling_algorithm != "bayesian":
        return None

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, sweep.limits.max_trials)))


def run_sweep(job: TrainingJob, *, report: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None,
              trial_resources: dict[str, float] | None = None) -> SweepResult:
    """Run the job's sweep on Ray Tune; export the best trial as the job's MLflow model. `should_stop`:
    polled by Tune; once it answers True every trial ends (their resources given back) and the sweep returns.
    `trial_resources`: custom Ray resources each trial asks for besides its CPUs and GPUs (where it may run)."""
    report = report or (lambda message: print(message, file=sys.stderr))
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a trial skipped at the timeout reports nothing
    sweep: SweepSettings = job.sweep
    started = time.time()
    output = job.output_dir.resolve()
    base = dict(job.parameters)
    if sweep.auto_mode:
        sweep = _auto(job, sweep, report)
    configs = _configs(sweep, seed=int(base.get("seed", 0)))
    if configs is not None:
        _check_configs(job, configs)
    prepare(replace(job, parameters={**base, **(configs[0] if configs else {})}))  # the data, checked once
    ensure_ray()

    workers, use_gpu = worker_count(job)
    concurrent = _concurrency(sweep.limits, job.node_count, report)
    resources = _resources(concurrent, workers, trial_resources)
    primary = job.task.primary_metric
    deadline = started + sweep.limits.timeout_minutes * 60
    mlflow.set_experiment(job.experiment_name)
    outcomes, outcomes_name = open_board()
    with mlflow.start_run(run_name=job.run_name or "sweep") as parent:
        _log_plan(job.task.name, sweep, base, concurrent, resources)
        trial_job = replace(job, parameters=base, output_dir=output, run_name=job.run_name or "sweep",
                            parent_run_id=parent.info.run_id, sweep=None)
        ctx = {"job": portable_job(trial_job), "started": started, "deadline": deadline, "cpus": resources["cpu"],
               "trial_timeout_s": (sweep.limits.trial_timeout_minutes or 0) * 60, "workers": workers,
               "use_gpu": use_gpu, "board": outcomes_name}
        if configs is not None:
            space = {"__trial": tune.grid_search([{"index": i, "params": p} for i, p in enumerate(configs)]),
                     "__ctx": ctx}
            samples = 1
        else:
            space, samples = {**tune_space(sweep.search_space), "__ctx": ctx}, sweep.limits.max_trials
        report(_plan_line(sweep, len(configs) if configs is not None else samples, concurrent, workers, resources))
        exit_score = ExitScoreStopper(primary, sweep.limits.exit_score) if sweep.limits.exit_score is not None else None
        # a data-parallel trial holds almost nothing itself: its Ray Train workers hold the CPUs/GPUs
        asks = {**(resources if workers == 1 else {"cpu": TRIAL_DRIVER_CPU}), **(trial_resources or {})}
        grid = _tuner(sweep, space, samples, concurrent, asks, primary, seed=int(base.get("seed", 0)),
                      reuse_actors=workers == 1, storage=output / "ray_results",
                      stoppers=_stoppers(exit_score, should_stop, CombinedStopper, CallerStopper)).fit()

        if exit_score is not None and exit_score.reached_by:
            report(f"limits.exit_score {exit_score.score} reached by trial {exit_score.reached_by}: sweep stopped")
        records = ray.get(outcomes.all.remote())
        ray.kill(outcomes)
        trials = collect(grid, records, primary, deadline,
                         stopped="stopped (exit_score reached)" if exit_score and exit_score.reached_by else None,
                         planned=configs)
        best, model_dir = _summarise(job, trials, output, primary, report)
        report(f"best trial {best['trial']}: {primary} {best['metric']:.4f}  MLflow model: {model_dir}  "
               f"(sweep run {parent.info.run_id})")
    return SweepResult(model_dir, parent.info.run_id, best, trials, time.time() - started)


def _log_plan(task: str, sweep: SweepSettings, base: dict[str, Any], concurrent: int,
              resources: dict[str, float]) -> None:
    """The sweep's settings on its (parent) MLflow run."""
    mlflow.set_tags({"task": task, "sweep": "1", "sampling_algorithm": sweep.sampling_algorithm})
    mlflow.log_params({"max_trials": sweep.limits.max_trials, "max_concurrent_trials": concurrent,
                       "timeout_minutes": sweep.limits.timeout_minutes,
                       "sampling_algorithm": sweep.sampling_algorithm, "auto_mode": sweep.auto_mode,
                       "early_termination": sweep.early_termination.type if sweep.early_termination else "none",
                       "cpus_per_trial": resources["cpu"], "gpus_per_trial": resources["gpu"]})
    mlflow.log_dict({"search_space": [{k: vars(d) for k, d in sub.items()} for sub in sweep.search_space],
                     "early_termination": vars(sweep.early_termination) if sweep.early_termination else None,
                     "training_parameters": base}, "sweep.json")


def _plan_line(sweep: SweepSettings, trials: int, concurrent: int, workers: int, resources: dict[str, float]) -> str:
    """What the sweep will run, in one line for the log."""
    share = (f"{resources['cpu']} CPU / {resources['gpu']} GPU each" if workers == 1 else
             f"{workers} Ray Train workers each, {resources['cpu']} CPU / {resources['gpu']} GPU per worker")
    return (f"sweep: {trials} trials, {sweep.sampling_algorithm} sampling, {concurrent} at a time with {share}, "
            f"early termination {sweep.early_termination.type if sweep.early_termination else 'none'}"
            + (f", exit_score {sweep.limits.exit_score}" if sweep.limits.exit_score is not None else ""))


def _tuner(sweep: SweepSettings, space: dict[str, Any], samples: int, concurrent: int, asks: dict[str, float],
           primary: str, *, seed: int, reuse_actors: bool, storage: Path, stoppers: Any) -> tune.Tuner:
    """Ray Tune's run of the trials: the searcher, the early-termination scheduler and the time budget."""
    timeout_s = sweep.limits.timeout_minutes * 60
    return tune.Tuner(
        tune.with_resources(run_trial, asks), param_space=space,
        tune_config=tune.TuneConfig(metric=primary, mode="max", num_samples=samples,
                                    max_concurrent_trials=concurrent,
                                    search_alg=_searcher(sweep, seed),
                                    scheduler=make_scheduler(sweep.early_termination, primary),
                                    time_budget_s=timeout_s + max(120.0, 0.25 * timeout_s),
                                    trial_dirname_creator=lambda trial: trial.trial_id,
                                    reuse_actors=reuse_actors),  # a stopped data-parallel trial's actor goes
        run_config=tune.RunConfig(name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(storage), verbose=0, stop=stoppers),
    )


def _summarise(job: TrainingJob, trials: list[dict[str, Any]], output: Path, primary: str,
               report: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    """The summary table (printed and on the MLflow run) and the best trial exported as the job's model."""
    table = summary_table(trials, primary)
    report(table)
    mlflow.log_text(table + "\n", "sweep_summary.txt")
    mlflow.log_dict({"primary_metric": primary, "trials": trials}, "sweep_summary.json")
    return export_best(job, trials, output, primary, report)


def _auto(job: TrainingJob, sweep: SweepSettings, report: Callable[[str], None]) -> SweepSettings:
    """AutoMode: the built-in search space for the task, data size and machine."""
    records = read_dataset(job.training_data, job.task.name, image_root=job.image_root).records
    per_label = Counter(name for r in records for name in set(r.label_names()))
    space = auto_search_space(job.task, len(records), float(torch.cuda.device_count()), job.parameters,
                              per_class=min(per_label.values(), default=0))
    shown = [{k: d.describe() for k, d in subspace.items()} for subspace in space]
    report(f"AutoMode: {sweep.limits.max_trials} trials over {json.dumps(shown if len(shown) > 1 else shown[0])}")
    return replace(sweep, search_space=space)


def _stoppers(exit_score, should_stop, combined, caller):
    """Tune's `stop`: limits.exit_score and the caller's cancellation, whichever are given."""
    stoppers = [s for s in (exit_score, caller(should_stop) if should_stop is not None else None) if s is not None]
    return None if not stoppers else stoppers[0] if len(stoppers) == 1 else combined(*stoppers)


def run_job(job: TrainingJob, *, progress: bool = True, report: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None, trial_resources: dict[str, float] | None = None):
    """`visionserve train`: a sweep, a data-parallel run on Ray Train, or one plain training."""
    if job.sweep is not None:
        return run_sweep(job, report=report, should_stop=should_stop, trial_resources=trial_resources)
    if job.node_count > 1 or (job.workers_per_node or 1) > 1:

        return train_distributed(job, report=report)
    return train(job, progress=progress, report=report)


__all__ = ["SweepResult", "run_job", "run_sweep", "run_trial"]
