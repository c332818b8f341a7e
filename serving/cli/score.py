"""`visionserve score`: batch scoring of a folder, JSONL file or MLTable on Ray Data (`serving.batch`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from serving.batch.parts import PART_SIZE
from serving.cli.flags import add_backend_flag, add_set_flag, parse_param_flags


def explain_flag(text: str | None) -> dict[str, Any] | None:
    """--explain's value: a JSON object of xai_parameters (its keys and bounds are checked with the model)."""
    from models.errors import SettingsError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SettingsError([f"--explain {text[:80]!r}: not JSON ({exc})"], "command line") from None
    if not isinstance(value, dict):
        raise SettingsError([f"--explain {text[:80]!r}: expected a JSON object of xai_parameters"],
                            "command line")
    return value


def _run(args: argparse.Namespace) -> int:
    """`visionserve score`: the exit code."""
    import logging

    from serving.batch.run import score

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    score(args.model, args.input, args.output, batch_size=args.batch_size, concurrency=args.concurrency,
          num_gpus_per_actor=args.gpus_per_actor, params=parse_param_flags(args.set, "--set"), image_root=args.image_root,
          progress=not args.no_progress, overwrite=args.overwrite, part_size=args.part_size, address=args.address,
          num_cpus=args.num_cpus, backend=args.backend, explain=explain_flag(args.explain))
    return 0


def add_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register `score MODEL --input ... --output ...` on an argparse subparsers object."""
    p = subparsers.add_parser("score", help="batch-score a folder, JSONL file or MLTable of images on Ray Data")
    p.add_argument("model", help="MLflow model folder or MLflow URI (models:/name/1, runs:/...)")
    p.add_argument("--input", required=True, help="folder of images (recursive), JSONL file or MLTable folder")
    p.add_argument("--output", required=True, help="predictions JSONL: one line per image, in input order "
                   "(with <output>.manifest.json: the model and settings that made it)")
    p.add_argument("--batch-size", type=int, help="images per actor call (default: max(32, the model's batch_size))")
    p.add_argument("--concurrency", type=int, help="scoring actors (default: one per GPU share, else CPUs / 4)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor, e.g. 1 or 0.5 (default: CPU)")
    add_set_flag(p, "override an inference setting for this run, e.g. --set box_score_thresh=0.5")
    add_backend_flag(p)
    p.add_argument("--explain", nargs="?", const="{}", metavar="XAI_PARAMETERS",
                   help="explain every image too, as an explanation entry with these xai_parameters (JSON; alone: "
                   "the defaults), e.g. --explain '{\"number_of_masks\": 500}' (D-RISE, for a detector)")
    p.add_argument("--image-root", help="folder that cloud image URLs of a JSONL/MLTable map under "
                   "(they must stay inside it)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local instance)")
    p.add_argument("--num-cpus", type=float, help="CPUs of the local Ray instance it starts (default: all)")
    p.add_argument("--part-size", type=int, default=PART_SIZE, help="images per part file (what a resume redoes)")
    p.add_argument("--overwrite", action="store_true", help="re-score even if the output or part files exist "
                   "(a finished output of another model, other --set or --explain values is refused without it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p

