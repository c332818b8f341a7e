"""`visionserve`: the one console script.

Each command lives in a module of this package (`train`: train and validate; `predict`; `demo`;
`serve`; `hub`; `score`; `data`; `quantize`; the load test in `loadtests.run`) that registers its flags with the standard library
alone and imports its heavy dependencies (torch, Ray, MLflow, OpenCV) only when it runs, so `--help`
and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from loadtests.run import add_loadtest_command
from models.errors import USER_ERRORS
from serving.cli import data, demo, hub, predict, quantize, score, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionserve", description="Train, package and score vision models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_commands(sub)
    predict.add_commands(sub)
    demo.add_commands(sub)
    serve.add_commands(sub)
    hub.add_commands(sub)
    score.add_commands(sub)
    add_loadtest_command(sub)
    data.add_commands(sub)
    quantize.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return args.func(args)
    except USER_ERRORS as exc:  # a user's mistake: a clear message and exit code 2, never a traceback
        if args.verbose:
            logging.exception("details")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
