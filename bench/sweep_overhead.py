"""Sweep overhead: an N-trial Ray Tune sweep vs the same N trainings run one after another.

    uv run python bench/sweep_overhead.py [--trials 3] [--epochs 2] [--images 32] [--rounds 2]

The trials are a grid over N learning rates (identical work in both cases). Measured, `--rounds` times,
alternating so that the machine's drifting load hits both alike:
  sequential   N plain `train` calls in one process that has already run one training (imports and caches
               warm, not counted) and does not run Ray itself: the baseline;
  sweep_1      the sweep with max_concurrent_trials 1, from this process (Ray already started; its start is
               timed separately and not counted). Target: the median round <= 15 % slower than sequential's.
Then once: sweep_2, the sweep with max_concurrent_trials 2 (each trial gets half the CPUs).
A sweep's overhead is split into `startup` (until its first trial starts: mostly the trial process importing
torch, torchvision and mlflow, which the warmed-up baseline never pays) and `between` (everything else:
Tune's bookkeeping between trials, the summary and the best trial's export).
The machine's load during the run is recorded (`load_average`). Writes bench/results/sweep_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import peak_rss_mb, private_mlflow_store, table, write
from models.job import build_job
from models.train.loop import TrainingJob
from models.data.synth import write_synthetic_dataset

PARAMS = {"weights": "none", "model_name": "resnet18", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
          "training_batch_size": 8, "validation_batch_size": 16, "num_workers": 0, "early_stopping": 0,
          "warmup_cosine_lr_warmup_epochs": 0}


def _job(work: Path, images: int, epochs: int) -> TrainingJob:
    data = write_synthetic_dataset("image_classification", work / "data", images, image_size=(96, 96), seed=0)
    return build_job(task="image_classification", training_data=data.train_jsonl,
                     validation_data=data.validation_jsonl, params={**PARAMS, "number_of_epochs": epochs},
                     output_dir=work / "plain", experiment_name="bench")


def _rates(trials: int) -> list[float]:
    return [round(0.005 * (i + 1), 4) for i in range(trials)]


def sequential(work: Path, args: argparse.Namespace) -> float:
    """Seconds for the N plain trainings, after one warm-up training; run in a process of its own."""
    from models.train.loop import train

    private_mlflow_store()
    job, quiet = _job(work, args.images, args.epochs), (lambda _: None)
    train(replace(job, output_dir=work / "warm-up"), progress=False, report=quiet)
    start = time.perf_counter()
    for i, rate in enumerate(_rates(args.trials)):
        train(replace(job, parameters={**job.parameters, "learning_rate": rate}, output_dir=work / f"plain-{i}"),
              progress=False, report=quiet)
    return time.perf_counter() - start


def _sequential_in_subprocess(work: Path, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--sequential-only", "--trials", str(args.trials), "--epochs",
               str(args.epochs), "--images", str(args.images), "--work", str(work)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def _sweep(job: TrainingJob, args: argparse.Namespace, concurrent: int, output: Path) -> dict:
    from models.sweep.search_space import Distribution
    from models.sweep.run import run_sweep
    from models.sweep.settings import JobLimits, SweepSettings

    space = ({"learning_rate": Distribution("choice", tuple(_rates(args.trials)))},)
    sweep = SweepSettings(JobLimits(max_trials=args.trials, max_concurrent_trials=concurrent), "grid", None, space)
    start, wall = time.perf_counter(), time.time()
    result = run_sweep(replace(job, sweep=sweep, output_dir=output), report=lambda _: None)
    seconds = time.perf_counter() - start
    assert len(result.trials) == args.trials and all(t["status"] == "completed" for t in result.trials)
    startup = min(t["started"] for t in result.trials) - wall
    trial_seconds = sum(t["seconds"] for t in result.trials)
    return {"case": f"sweep_{concurrent}", "seconds": seconds, "trial_seconds": trial_seconds, "startup": startup,
            "between": seconds - startup - trial_seconds if concurrent == 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="sequential/sweep_1 pairs, alternating")
    parser.add_argument("--sequential-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sequential_only:
        print(json.dumps({"seconds": sequential(args.work, args)}))
        return

    from models.runtime import ensure_ray

    private_mlflow_store()
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    job = _job(work, args.images, args.epochs)
    start = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - start
    rows = []
    for r in range(args.rounds):
        rows.append({"case": "sequential", "round": r + 1,
                     "seconds": _sequential_in_subprocess(work / f"seq-{r}", args)})
        rows.append({"round": r + 1, **_sweep(job, args, 1, work / f"sweep-1-{r}")})
    rows.append(_sweep(job, args, 2, work / "sweep-2"))
    median = {case: statistics.median(row["seconds"] for row in rows if row["case"] == case)
              for case in ("sequential", "sweep_1", "sweep_2")}
    for row in rows:
        row["vs_sequential"] = row["seconds"] / median["sequential"]
    overhead = median["sweep_1"] / median["sequential"] - 1
    speedup = median["sweep_1"] / median["sweep_2"]
    print(table(rows, ["case", "round", "seconds", "trial_seconds", "startup", "between", "vs_sequential"]))
    print(f"Ray start (not counted): {ray_start:.1f} s; median sweep overhead (concurrency 1): {overhead:+.1%} "
          f"(target <= 15 %); concurrency 2 speed-up: {speedup:.2f}x")
    path = write("sweep_overhead", {
        "trials": args.trials, "epochs": args.epochs, "images": args.images, "rounds": args.rounds,
        "learning_rates": _rates(args.trials), "rows": rows, "medians": median, "ray_start_seconds": ray_start,
        "load_average": os.getloadavg(), "overhead_concurrency_1": overhead, "target_overhead": 0.15,
        "meets_target": overhead <= 0.15, "speedup_concurrency_2": speedup, **peak_rss_mb()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
