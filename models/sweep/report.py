"""After a sweep: each trial's outcome, the summary table, and the best trial's export."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow

from models.train import checkpoints
from models.export import export_model, model_settings_from_training
from models.tasks.registry import training_settings
from models.train.loop import TrainingJob
from models.train.remote import model_from_run


def collect(grid, records: dict[str, dict[str, Any]], primary: str, deadline: float, stopped: str | None = None,
            planned: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per trial: index, status, sampled params, best primary metric, epochs, seconds, run id, node.
    `records`: what each trial told the sweep's board, by trial id; `stopped`: the status of trials still
    running when the sweep was stopped (exit_score); `planned`: every trial's params (random, grid), so that
    trials Tune never created show as "not started"."""
    rows = []
    client = mlflow.MlflowClient()
    for result in grid:
        trial_id = Path(result.path).name
        info = records.get(trial_id, {})
        history = result.metrics_dataframe
        curve = [] if history is None or primary not in history else [float(v) for v in history[primary].dropna()]
        status = info.get("status", "not started")
        if result.error is not None:
            status = f"failed: {str(result.error).strip().splitlines()[-1][:120]}"
        elif status == "running":
            status = "stopped (timeout)" if time.time() >= deadline else stopped or "early terminated"
        run_id = info.get("run_id") or (result.metrics or {}).get("mlflow_run_id")
        if run_id and not status.startswith(("completed", "skipped")):
            client.set_terminated(run_id, "KILLED" if not status.startswith("failed") else "FAILED")
        if run_id:
            client.set_tag(run_id, "sweep_status", status)
        metrics = info.get("metrics") or {}
        ended = info.get("ended") or time.time()
        rows.append({
            "trial_id": trial_id, "index": info.get("index"), "status": status, "params": info.get("params", {}),
            "metric": metrics.get(primary, max(curve) if curve else None), "curve": curve,
            "epochs": info.get("epochs", len(curve)), "seconds": round(ended - info["started"], 1) if info else None,
            "started": info.get("started"),
            "run_id": run_id, "parameters": info.get("parameters"), "node": info.get("node"),
            "checkpoint": info.get("checkpoint") or "",
        })
    seen = {r["index"] for r in rows}
    rows += [{"trial_id": "", "index": i, "status": "not started", "params": params, "metric": None, "curve": [],
              "epochs": 0, "seconds": None, "started": None, "run_id": None, "parameters": None, "node": None,
              "checkpoint": ""}
             for i, params in enumerate(planned or []) if i not in seen]
    rows.sort(key=lambda r: (r["index"] if r["index"] is not None else 10**6, r["trial_id"]))
    for i, row in enumerate(rows):
        row["trial"] = row["index"] if row["index"] is not None else i
    return rows


def summary_table(rows: list[dict[str, Any]], primary: str) -> str:
    """A fixed-width table: trial, status, sampled hyperparameters, primary metric, epochs, seconds."""
    names = sorted({k for r in rows for k in r["params"]})
    header = ["trial", "status", *names, primary, "epochs", "seconds"]
    cells = [[str(r["trial"]), r["status"], *[_fmt(r["params"].get(n)) for n in names], _fmt(r["metric"]),
              str(r["epochs"]), _fmt(r["seconds"])] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest primary metric; else (a timeout) the best one whose checkpoint this
    node has (a trial cut short on another node keeps its checkpoint there)."""
    done = [r for r in rows if r["status"] == "completed" and r["run_id"] and r["metric"] is not None]
    if not done:
        done = [r for r in rows if r["metric"] is not None and r["parameters"] and r["checkpoint"]
                and Path(r["checkpoint"]).is_file()]
    return max(done, key=lambda r: r["metric"]) if done else None


def export_best(job: TrainingJob, rows: list[dict[str, Any]], output: Path, primary: str,
                report: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    """Download from its MLflow run (or, for a trial cut by the timeout, export from its best checkpoint) the best
    trial's model to `<output>/mlflow-model` and log it, its metrics and its run id on the sweep's run."""
    best = best_trial(rows)
    if best is None:
        raise RuntimeError("no trial finished an evaluation of the primary metric "
                           f"({primary}); raise limits.timeout_minutes or check the failed trials above")
    target = output / "mlflow-model"
    if best["status"] == "completed":
        model_from_run(best["run_id"], target)
    else:
        report(f"no trial completed; exporting trial {best['trial']} from its best checkpoint")
        shutil.rmtree(target, ignore_errors=True)
        settings, arch = training_settings(job.task, best["parameters"])
        ckpt = checkpoints.read_checkpoint(best["checkpoint"])
        spec = model_settings_from_training(job.task, arch.name, ckpt["labels"], settings)
        export_model(target, spec, ckpt["model"])
    mlflow.log_artifacts(str(target), "mlflow-model")
    mlflow.log_metric(f"best_{primary}", best["metric"])
    mlflow.set_tags({"best_trial": str(best["trial"]), "best_trial_run_id": best["run_id"] or ""})
    mlflow.log_params({f"best.{k}": v for k, v in best["params"].items()})
    return best, target
