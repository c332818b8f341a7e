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


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """Where a server runs: the Ray cluster to join, where its HTTP proxies run, what its replicas' environment
    gets, how long its deployment may take."""
    p.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly", "Disabled"), default=None,
                   help="where Ray Serve's HTTP proxies (HAProxy) run: every node (Ray's default), the head only, or "
                        "none (requests through DeploymentHandles only). Proxies started earlier in the cluster stay")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the replicas and everything they start (repeatable); on a "
                        "cluster MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI and VISIONSERVE_* travel by themselves")
    p.add_argument("--deploy-timeout-s", type=float, default=600.0,
                   help="the application must be running by then, else it is removed and the command fails saying "
                        "why (default 600)")


def env_flags(args: argparse.Namespace) -> dict[str, str]:
    """The --env flags as {NAME: VALUE} (a SettingsError naming a malformed one)."""
    from models.runtime import parse_env_flags

    try:
        return parse_env_flags(getattr(args, "env", None) or [])
    except ValueError as exc:
        raise SettingsError([str(exc)], "command line") from None


def add_backend_flag(p: argparse.ArgumentParser) -> None:
    from models.int8_record import TOLERANCE
    from serving.backends import BACKENDS, DEFAULT_BACKEND

    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="what scores: the torch network, the model's artifacts/model.onnx on ONNX Runtime (any "
                        "task; explanations still use torch), or its artifacts/model.int8.onnx (onnx-int8; "
                        "`visionserve quantize` adds one); auto: for a classifier on CPUs the INT8 file when it "
                        f"lost at most {TOLERANCE * 100:g} point on the validation set, else model.onnx; else torch. "
                        f"Default: {DEFAULT_BACKEND}")


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


# The limits, batching and explanation admission `visionserve serve` and `visionserve hub` share (the fields of
# serving.scoring.ScoringLimits): flag, type, default, help.
SCORING_FLAGS = (
    ("--max-request-mb", float, 100.0, "largest request body, in MB (then 413)"),
    ("--max-images-per-request", int, 64, "images in one request (then 413)"),
    ("--max-image-mb", float, 6.0, "largest image, in MB, as the cloud allows (then a 400 naming it)"),
    ("--max-batch-size", int, 16, "images per forward pass across requests"),
    ("--batch-wait-ms", float, 10.0, "how long a batch waits to fill while other requests are being scored"),
    ("--max-concurrent-explanations", int, 1, "explanation requests running at once per replica"),
    ("--max-waiting-explanations", int, 4, "waiting explanation requests before 429"),
    ("--explanation-timeout-s", float, 90.0, "then 504 explanation_timeout"),
)


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    for flag, kind, default, help in SCORING_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=f"{help} (default {default:g})")


def scoring_limits(args: argparse.Namespace) -> dict[str, float | int]:
    """The scoring flags as serving.scoring.ScoringLimits' fields; a SettingsError naming each flag out of range."""
    values = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, *_ in SCORING_FLAGS}
    bad = [f"--{name.replace('_', '-')} {value:g}: must be > 0" for name, value in values.items()
           if value <= 0 and name not in ("batch_wait_ms", "max_waiting_explanations")]
    bad += [f"--{name.replace('_', '-')} {value:g}: must be >= 0" for name, value in values.items()
            if value < 0 and name in ("batch_wait_ms", "max_waiting_explanations")]
    if bad:
        raise SettingsError(bad, "command line")
    values["batch_wait_timeout_s"] = values.pop("batch_wait_ms") / 1000
    return values
