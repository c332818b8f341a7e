"""`visionserve`: the one console script (train, data, predict, demo)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtests.run import add_loadtest_command
from models.errors import DataError
from models.errors import SettingsError
from serving.batch.run import add_score_command
from serving.cli.data import add_data_commands
from serving.cli.serve import add_serve_command

# Expected failures: printed as a clear message with exit code 2, never a traceback.
USER_ERRORS = (SettingsError, DataError, ValueError, FileNotFoundError)


def _train(args: argparse.Namespace) -> int:
    from models.train.job import build_job
    from models.tasks.fields import parse_param_flags
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
    from models.train.job import build_job
    from models.tasks.fields import parse_param_flags
    from models.train.loop import prepare

    job = build_job(args.job_file, task=args.task, training_data=args.training_data,
                    validation_data=args.validation_data, params=parse_param_flags(args.param),
                    image_root=args.image_root)
    prepared = prepare(job)
    print(f"OK: {len(prepared.train)} training and {len(prepared.validation)} validation images, "
          f"labels {', '.join(prepared.labels)}; settings valid for {prepared.arch.name}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from models.tasks.fields import parse_param_flags
    from serving.predictor import Predictor

    predictor = Predictor.load(args.model, overrides=parse_param_flags(args.set))
    responses = predictor.predict_files(args.images)
    out = [{"image": str(path), **response} for path, response in zip(args.images, responses)]
    text = json.dumps(out, indent=None if args.compact else 2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from serving.demo import run_demo

    run_demo(Path(args.out), task=args.task, images=args.images, epochs=args.epochs)
    return 0


def _training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_file", nargs="?", help="a job YAML in the cloud's shape (task, training_data, ...)")
    p.add_argument("--task", help="image_classification | image_classification_multilabel | "
                                  "image_object_detection | image_instance_segmentation")
    p.add_argument("--training-data", help="JSONL file or MLTable folder")
    p.add_argument("--validation-data", help="JSONL file or MLTable folder (default: split off the training data)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a training parameter with the spec's name, e.g. --param number_of_epochs=5")
    p.add_argument("--image-root", help="folder that cloud image URLs (azureml://.../paths/<p>) map under")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionserve", description="Train, package and score vision models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and export it as an MLflow model folder")
    _training_flags(p)
    p.add_argument("--model-name", help="architecture, e.g. resnet18 or fasterrcnn_resnet50_fpn")
    p.add_argument("--output", default="outputs", help="output folder; the model goes to OUTPUT/mlflow-model")
    p.add_argument("--experiment-name", help="MLflow experiment (default: visionserve)")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines are still printed)")
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a dataset and parameters without training")
    _training_flags(p)
    p.set_defaults(func=_validate)

    p = sub.add_parser("predict", help="score image files with an exported model folder")
    p.add_argument("model", help="MLflow model folder (…/mlflow-model)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override an inference setting of settings.json, e.g. --set box_score_thresh=0.5")
    p.add_argument("--output", help="write the JSON response here instead of printing it")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=_predict)

    p = sub.add_parser("demo", help="synthetic data → training → MLflow model → scoring, in a couple of minutes on a CPU")
    p.add_argument("--task", default="image_classification", help="which task to demonstrate")
    p.add_argument("--out", default="visionserve-demo", help="folder for the data, model and MLflow store")
    p.add_argument("--images", type=int, default=None, help="synthetic images to generate")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.set_defaults(func=_demo)

    add_serve_command(sub)
    add_score_command(sub)
    add_loadtest_command(sub)
    add_data_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.verbose:
            logging.exception("details")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
