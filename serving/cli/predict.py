"""`visionserve predict`: score image files with an exported model folder, in this process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serving.cli.flags import add_backend_flag, add_set_flag, parse_param_flags


def _predict(args: argparse.Namespace) -> int:
    from models.data.formats import BATCH_LIMITS
    from serving.predictor import Predictor
    from serving.scoring import Scoring

    predictor = Predictor.load(args.model, overrides=parse_param_flags(args.set), backend=args.backend,
                               limits=BATCH_LIMITS)
    responses = Scoring(predictor).score_files(args.images)
    out = [{"image": str(path), **response} for path, response in zip(args.images, responses)]
    text = json.dumps(out, indent=None if args.compact else 2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("predict", help="score image files with an exported model folder")
    p.add_argument("model", help="MLflow model folder (…/mlflow-model)")
    p.add_argument("images", nargs="+", help="image files")
    add_set_flag(p, "override an inference setting of settings.json, e.g. --set box_score_thresh=0.5")
    add_backend_flag(p)
    p.add_argument("--output", help="write the JSON response here instead of printing it")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=_predict)
