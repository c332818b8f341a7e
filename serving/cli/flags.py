"""Flags several commands share, and how `--param` / `--set` pairs are read."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from models.data.records import TASK_NAMES
from models.errors import SettingsError


def parse_param_flags(pairs: Sequence[str], flag: str = "--param") -> dict[str, str]:
    """`--param name=value` (or `--set`) flags → {name: value}; a pair without `=` is an error naming it."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SettingsError([f"{flag} {pair!r}: expected name=value"], "command line")
        out[name.strip()] = value.strip()
    return out


def add_backend_flag(p: argparse.ArgumentParser) -> None:
    from serving.backends import BACKENDS, DEFAULT_BACKEND

    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="what scores: the torch network, or the model's artifacts/model.onnx on ONNX Runtime "
                        "(any task; explanations still use torch); auto: ONNX Runtime for a "
                        f"classifier on CPUs, else torch. Default: {DEFAULT_BACKEND}")


def add_set_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=help)


def add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_file", nargs="?", help="a job YAML in the cloud's shape (task, training_data, ...)")
    p.add_argument("--task", help=" | ".join(TASK_NAMES))
    p.add_argument("--training-data", help="JSONL file or MLTable folder")
    p.add_argument("--validation-data", help="JSONL file or MLTable folder (default: split off the training data)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a training parameter with the spec's name, e.g. --param number_of_epochs=5")
    p.add_argument("--image-root", help="folder that cloud image URLs (azureml://.../paths/<p>) map under")
