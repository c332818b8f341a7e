"""`visionserve quantize MODEL_DIR --validation-data V [--training-data T]`: add `artifacts/model.int8.onnx`
(models.onnx_int8) to a model folder exported without one (a detector's, or one from before INT8 files), with
what it costs on the validation data recorded in settings.json's `int8`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MAX_IMAGES = 100_000


def _count(flag: str, most: int) -> Any:
    """An argparse type: a whole number in [1, most], else an error naming `flag`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected a whole number") from None
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"{flag} {value}: expected a whole number from 1 to {most}")
        return value

    return parse


def _artifacts(model_dir: str) -> Path:
    """MODEL_DIR's artifacts folder (or MODEL_DIR itself when it is one); errors name MODEL_DIR."""
    from models.export import SETTINGS_FILE

    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"MODEL_DIR {model_dir}: no such folder")
    for folder in (root / "artifacts", root):
        if (folder / SETTINGS_FILE).is_file():
            return folder
    raise ValueError(f"MODEL_DIR {model_dir}: not a visionserve model folder (no artifacts/{SETTINGS_FILE})")


def _records(path: str, flag: str, task: str, labels: list[str], image_root: str | None) -> list[Any]:
    """The labelled records of `path` (JSONL or MLTable), every image usable and every label one of the
    model's; a DataError names `flag`, the file and the line."""
    from models.data.checks import check_labels, check_training_images
    from models.data.jsonl import read_dataset
    from models.errors import DataError

    if not Path(path).exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    dataset = read_dataset(path, task, image_root=image_root)
    problems = dataset.problems or check_labels(dataset, labels) + check_training_images(dataset.records)
    if not problems and not dataset.records:
        problems = [f"{path}: no labelled images"]
    if problems:
        raise DataError(problems, f"{flag} {path}")
    return dataset.records


def _quantize(args: argparse.Namespace) -> int:
    artifacts = _artifacts(args.model_dir)
    if not args.validation_data:
        raise ValueError("--validation-data is needed: the labelled images (JSONL file or MLTable folder) the FP32 "
                         "and INT8 files are both scored on, to record what quantization costs")
    from models.export import SETTINGS_FILE, add_int8, read_settings
    from models.onnx_int8 import QuantizationData

    spec = read_settings(artifacts / SETTINGS_FILE)
    validation = _records(args.validation_data, "--validation-data", spec.task.name, spec.labels, args.image_root)
    calibration = (_records(args.training_data, "--training-data", spec.task.name, spec.labels, args.image_root)
                   if args.training_data else validation)
    data = QuantizationData(calibration, validation, "training" if args.training_data else "validation",
                            args.calibration_images, args.validation_images)
    try:
        record = add_int8(artifacts, data)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001  (the graph does not quantize: a message, not a traceback)
        print(f"error: {spec.model_name} could not be quantized: {type(exc).__name__}: "
              f"{(str(exc).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 1
    print(json.dumps(record.document(), indent=2))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("quantize", help="add artifacts/model.int8.onnx (INT8, for CPUs) to an exported model folder")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="MLflow model folder (…/mlflow-model)")
    p.add_argument("--validation-data", help="JSONL file or MLTable folder of labelled images both files are scored "
                   "on (required); also the calibration images without --training-data")
    p.add_argument("--training-data", help="JSONL file or MLTable folder whose images calibrate the activation "
                   "ranges (default: the validation images, which makes the measured loss an optimistic one)")
    p.add_argument("--image-root", help="folder that cloud image URLs (azureml://.../paths/<p>) map under")
    p.add_argument("--calibration-images", type=_count("--calibration-images", 1000),
                   help="calibration images used, evenly spread (default: 32 for a classifier, 8 for a detector)")
    p.add_argument("--validation-images", type=_count("--validation-images", MAX_IMAGES),
                   help="validation images scored, evenly spread (default: 500 for a classifier, 50 for a detector)")
    p.set_defaults(func=_quantize)
