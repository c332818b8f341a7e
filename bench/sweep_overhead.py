"""Sweep overhead: an N-trial Ray Tune sweep vs the same N trainings run one after another in this process.

    uv run python bench/sweep_overhead.py [--trials 3] [--epochs 2] [--images 32]

The trials are a grid over N learning rates (identical work in both cases). Measured:
  sequential   N plain `train` calls in this process (the baseline);
  sweep_1      the sweep with max_concurrent_trials 1 (target: <= 15 % slower than sequential);
  sweep_2      the sweep with max_concurrent_trials 2 (each trial gets half the CPUs).
One plain training first warms up imports and caches; Ray's start is timed separately; neither is counted.
A sweep's overhead is split into `startup` (until its first trial starts: mostly the trial process importing
torch, torchvision and mlflow, which the warmed-up baseline never pays) and `between` (everything else:
Tune's bookkeeping between trials, the summary and the best trial's export).
The machine's load during the run is recorded (`load_average`): on a shared machine the numbers are noisy. Writes bench/results/sweep_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import peak_rss_mb, private_mlflow_store, table, write
from models.job import build_job
from models.search_space import Distribution
from models.sweep import run_sweep
from models.sweep_settings import Limits, SweepSettings
from models.synth import write_synthetic_dataset
from models.training import train
from serving.runtime import ensure_ray

PARAMS = {"model_name": "resnet18", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
          "training_batch_size": 8, "validation_batch_size": 16, "num_workers": 0, "early_stopping": 0,
          "warmup_cosine_lr_warmup_epochs": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    private_mlflow_store()
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    data = write_synthetic_dataset("image_classification", work / "data", args.images, image_size=(96, 96), seed=0)
    rates = [round(0.005 * (i + 1), 4) for i in range(args.trials)]
    job = build_job(task="image_classification", training_data=data.train_jsonl, validation_data=data.validation_jsonl,
                    params={**PARAMS, "number_of_epochs": args.epochs}, output_dir=work / "plain", experiment_name="bench")
    quiet = lambda _: None

    train(replace(job, output_dir=work / "warm-up"), progress=False, report=quiet)  # imports, caches: not counted
    start = time.perf_counter()
    for i, rate in enumerate(rates):
        train(replace(job, parameters={**job.parameters, "learning_rate": rate}, output_dir=work / f"plain-{i}"),
              progress=False, report=quiet)
    sequential = time.perf_counter() - start

    start = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - start
    space = ({"learning_rate": Distribution("choice", tuple(rates))},)
    rows = [{"case": "sequential", "seconds": sequential}]
    for concurrent in (1, 2):
        sweep = SweepSettings(Limits(max_trials=args.trials, max_concurrent_trials=concurrent), "grid", None, space)
        start, wall = time.perf_counter(), time.time()
        result = run_sweep(replace(job, sweep=sweep, output_dir=work / f"sweep-{concurrent}"), report=quiet)
        seconds = time.perf_counter() - start
        assert len(result.trials) == args.trials and all(t["status"] == "completed" for t in result.trials)
        startup = min(t["started"] for t in result.trials) - wall
        trial_seconds = sum(t["seconds"] for t in result.trials)
        rows.append({"case": f"sweep_{concurrent}", "seconds": seconds, "trial_seconds": trial_seconds,
                     "startup": startup,
                     "between": seconds - startup - trial_seconds / concurrent if concurrent == 1 else None})
    for row in rows:
        row["vs_sequential"] = row["seconds"] / sequential
    overhead = rows[1]["seconds"] / sequential - 1
    speedup = rows[1]["seconds"] / rows[2]["seconds"]
    print(table(rows, ["case", "seconds", "trial_seconds", "startup", "between", "vs_sequential"]))
    print(f"Ray start (not counted): {ray_start:.1f} s; sweep overhead (concurrency 1): {overhead:+.1%} "
          f"(target <= 15 %); concurrency 2 speed-up: {speedup:.2f}x")
    path = write("sweep_overhead", {
        "trials": args.trials, "epochs": args.epochs, "images": args.images, "learning_rates": rates,
        "rows": rows, "ray_start_seconds": ray_start, "load_average": os.getloadavg(), "overhead_concurrency_1": overhead,
        "target_overhead": 0.15, "meets_target": overhead <= 0.15, "speedup_concurrency_2": speedup,
        **peak_rss_mb()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
