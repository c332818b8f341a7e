"""`visionserve train` and `validate`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from serving.cli.flags import add_training_flags, parse_param_flags


def _train(args: argparse.Namespace) -> int:
    from models.job import build_job
    from models.sweep.run import SweepResult, run_job

    job = build_job(
        args.job_file, task=args.task, training_data=args.training_data, validation_data=args.validation_data,
        model_name=args.model_name, params=parse_param_flags(args.param), output_dir=args.output,
        image_root=args.image_root, experiment_name=args.experiment_name, run_name=args.run_name,
    )
    result = run_job(job, progress=not args.no_progress)
    if isinstance(result, SweepResult):
        print(json.dumps({"model_dir": str(result.model_dir), "run_id": result.run_id, "best_trial": result.best["trial"],
                          "best_trial_run_id": result.best["run_id"], "params": result.best["params"],
                          "metric": result.best["metric"], "trials": len(result.trials)}, indent=2))
        return 0
    print(json.dumps({"model_dir": str(result.model_dir), "run_id": result.run_id, "best_epoch": result.best_epoch,
                      "metrics": result.best_metrics}, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from models.job import build_job
    from models.train.loop import prepare

    job = build_job(args.job_file, task=args.task, training_data=args.training_data,
                    validation_data=args.validation_data, params=parse_param_flags(args.param),
                    image_root=args.image_root)
    prepared = prepare(job)
    print(f"OK: {len(prepared.train)} training and {len(prepared.validation)} validation images, "
          f"labels {', '.join(prepared.labels)}; settings valid for {prepared.arch.name}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model and export it as an MLflow model folder")
    add_training_flags(p)
    p.add_argument("--model-name", help="architecture, e.g. resnet18 or fasterrcnn_resnet50_fpn")
    p.add_argument("--output", default="outputs", help="output folder; the model goes to OUTPUT/mlflow-model")
    p.add_argument("--experiment-name", help="MLflow experiment (default: visionserve)")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines are still printed)")
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a dataset and parameters without training")
    add_training_flags(p)
    p.set_defaults(func=_validate)
