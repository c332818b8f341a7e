"""`visionserve demo`: the whole path on synthetic data (`serving.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from serving.demo import run_demo

    run_demo(Path(args.out), task=args.task, images=args.images, epochs=args.epochs, keep_serving=args.serve,
             port=args.port)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("demo", help="synthetic data → training → MLflow model → served, scored and explained over HTTP, "
                       "in a few minutes on a CPU")
    p.add_argument("--task", default="image_classification", help="which task to demonstrate")
    p.add_argument("--out", default="visionserve-demo", help="folder for the data, model and MLflow store")
    p.add_argument("--images", type=int, default=None, help="synthetic images to generate")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--serve", action="store_true", help="keep the model served (and its studio) until Ctrl-C")
    p.add_argument("--port", type=int, default=None, help="the port to serve on (default: a free one)")
    p.set_defaults(func=_demo)
