"""`visionserve data ...`: synthetic datasets and COCO / Pascal VOC conversion to JSONL."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from models.data.records import TASK_NAMES

_SHOWN_WARNINGS = 10


def _size(text: str) -> tuple[int, int]:
    """Parse "WxH" (e.g. 640x480)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    return width, height


def _fraction(text: str) -> float:
    """Parse a float in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _run_synth(args: argparse.Namespace) -> int:
    """Write a synthetic dataset and describe it."""
    from models.data.synth import write_synthetic_dataset

    try:
        s = write_synthetic_dataset(
            args.task, args.out, args.images, small_objects=args.small_objects, image_size=args.size,
            seed=args.seed, validation_fraction=args.validation_fraction,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"Wrote a synthetic {s.task} dataset: {s.n_train} training and {s.n_validation} validation images "
        f"with labels {', '.join(s.labels)}; training data {s.train_jsonl}, validation data "
        f"{s.validation_jsonl}, images in {s.images_dir}."
    )
    return 0


def _report(summary: Any, source: Any) -> None:
    """Print a one-paragraph summary of a conversion, then its first warnings."""
    print(
        f"Converted {source}: {summary.n_images} images and {summary.n_annotations} annotations written "
        f"to {summary.out_jsonl} (bbox format {summary.bbox_format_used}); labels: "
        f"{', '.join(summary.labels) or 'none'}; {summary.n_clipped} clipped, {summary.n_skipped} skipped; "
        f"{len(summary.warnings)} warning(s)."
    )
    for warning in summary.warnings[:_SHOWN_WARNINGS]:
        print(f"  warning: {warning}")
    if len(summary.warnings) > _SHOWN_WARNINGS:
        print(f"  ... and {len(summary.warnings) - _SHOWN_WARNINGS} more warning(s)")


def _run_from_coco(args: argparse.Namespace) -> int:
    """Convert a COCO JSON file."""
    from models.data.coco import coco_to_jsonl

    try:
        summary = coco_to_jsonl(
            args.coco_json, args.out, task=args.task, image_url_prefix=args.image_url_prefix,
            bbox_format=args.bbox_format,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _report(summary, args.coco_json)
    return 0


def _run_from_voc(args: argparse.Namespace) -> int:
    """Convert a Pascal VOC folder."""
    from models.data.voc import voc_to_jsonl

    try:
        summary = voc_to_jsonl(args.voc_dir, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _report(summary, args.voc_dir)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register `data synth`, `data from-coco` and `data from-voc` on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="make synthetic datasets or convert COCO / VOC to JSONL")
    sub = data.add_subparsers(dest="data_command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic shapes dataset (train.jsonl, validation.jsonl, images/)")
    synth.add_argument("--task", required=True, choices=TASK_NAMES)
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--images", required=True, type=int, help="number of images (training + validation)")
    synth.add_argument("--small-objects", action="store_true", help="1600x1200 images with 8-20 objects of 10-30 px")
    synth.add_argument("--size", type=_size, default=None, help="image size WxH (default 160x120)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--validation-fraction", type=_fraction, default=0.2)
    synth.set_defaults(func=_run_synth)

    coco = sub.add_parser("from-coco", help="convert a COCO JSON file to JSONL")
    coco.add_argument("coco_json", help="COCO annotations file")
    coco.add_argument("--out", required=True, help="output JSONL file")
    coco.add_argument("--task", choices=TASK_NAMES, default="image_object_detection")
    coco.add_argument("--image-url-prefix", default=None, help="image_url = PREFIX + file_name")
    coco.add_argument("--bbox-format", choices=("auto", "pixel", "relative"), default="auto")
    coco.set_defaults(func=_run_from_coco)

    voc = sub.add_parser("from-voc", help="convert a Pascal VOC folder to object-detection JSONL")
    voc.add_argument("voc_dir", help="folder with Annotations/ and JPEGImages/, or xml files next to images")
    voc.add_argument("--out", required=True, help="output JSONL file")
    voc.set_defaults(func=_run_from_voc)
