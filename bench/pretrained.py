"""Pretrained vs from scratch on a small public dataset (needs network access; not run in CI).

    uv run python bench/pretrained.py [--model resnet18] [--epochs 15] [--url URL]

Downloads fridgeObjects (134 photos of 4 kinds of fridge items, one folder per class; the dataset of the
cloud's own AutoML image tutorials), splits it 80/20 with a fixed seed, and trains the same architecture
twice with the same settings: `weights=DEFAULT` (ImageNet, downloaded once into the torch cache) and
`weights=none`. Prints held-out accuracy and wall time of each; writes bench/results/pretrained.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import private_mlflow_store, table, write  # noqa: E402
from models.data.formats import IMAGE_EXTENSIONS  # noqa: E402
from models.job import build_job  # noqa: E402
from models.train.loop import train  # noqa: E402

FRIDGE_OBJECTS = "https://cvbp-secondary.z19.web.core.windows.net/datasets/image_classification/fridgeObjects.zip"


def folders_to_jsonl(root: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """One folder per class → train.jsonl and validation.jsonl (80/20, every class on both sides)."""
    train_lines, validation_lines = [], []
    rng = random.Random(seed)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        rng.shuffle(images)
        cut = max(1, len(images) // 5)
        for i, image in enumerate(images):
            line = json.dumps({"image_url": str(image.resolve()), "label": folder.name})
            (validation_lines if i < cut else train_lines).append(line)
    paths = out / "train.jsonl", out / "validation.jsonl"
    for path, lines in zip(paths, (train_lines, validation_lines)):
        path.write_text("\n".join(lines) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--url", default=FRIDGE_OBJECTS)
    args = parser.parse_args()
    private_mlflow_store()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = work / "data.zip"
        print(f"downloading {args.url}", flush=True)
        urllib.request.urlretrieve(args.url, archive)
        with zipfile.ZipFile(archive) as z:
            z.extractall(work / "data")
        root = next(p for p in (work / "data").rglob("*") if p.is_dir() and any(c.is_dir() for c in p.iterdir()))
        train_jsonl, validation_jsonl = folders_to_jsonl(root, work)
        for weights in ("DEFAULT", "none"):
            params = {"model_name": args.model, "weights": weights, "number_of_epochs": args.epochs,
                      "training_batch_size": 16, "validation_batch_size": 32, "early_stopping": 0}
            job = build_job(task="image_classification", training_data=train_jsonl, validation_data=validation_jsonl,
                            params=params, output_dir=work / f"out-{weights}", experiment_name="bench",
                            run_name=f"pretrained-{weights}")
            started = time.perf_counter()
            result = train(job, progress=False, report=lambda m: print(m, flush=True))
            rows.append({"model": args.model, "weights": weights, "epochs": result.epochs_run,
                         "accuracy": result.best_metrics["accuracy"], "wall_s": time.perf_counter() - started})
    print(table(rows, ["model", "weights", "epochs", "accuracy", "wall_s"]))
    print(f"\nwritten {write('pretrained', {'dataset': args.url, 'rows': rows})}")


if __name__ == "__main__":
    main()
