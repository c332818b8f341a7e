"""Quality on held-out synthetic data within a stated CPU budget.

    uv run python bench/quality.py [--only classification|detection]

Targets: resnet18 classifier accuracy >= 0.95; fasterrcnn_resnet18_fpn voc mAP@0.5 >= 0.6. Both
train from random initialisation (no pretrained weights on this machine) with augmentations on,
and are measured on validation images never trained on. Reports epochs, wall time, peak memory.
Writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import peak_rss_mb, private_mlflow_store, table, write  # noqa: E402
from models.job import build_job  # noqa: E402
from models.data.synth import write_synthetic_dataset  # noqa: E402
from models.train.loop import train  # noqa: E402

RECIPES = {
    "classification": {
        "task": "image_classification", "images": 2400, "size": (64, 64), "metric": "accuracy", "target": 0.95,
        "budget_minutes": 10,
        "params": {"weights": "none", "model_name": "resnet18", "number_of_epochs": 20, "training_batch_size": 32,
                   "validation_batch_size": 64, "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
                   "optimizer": "adam", "learning_rate": 0.001, "warmup_cosine_lr_warmup_epochs": 1,
                   "early_stopping": 0},
    },
    "detection": {
        "task": "image_object_detection", "images": 300, "size": (128, 128), "metric": "mean_average_precision",
        "target": 0.6, "budget_minutes": 30,
        "params": {"weights": "none", "model_name": "fasterrcnn_resnet18_fpn", "number_of_epochs": 24, "training_batch_size": 4,
                   "validation_batch_size": 8, "min_size": 128, "max_size": 128, "learning_rate": 0.01,
                   "warmup_cosine_lr_warmup_epochs": 1, "box_batch_size_per_image": 128,
                   "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "early_stopping": 0,
                   "evaluation_frequency": 2},
    },
}


def run(name: str, workdir: Path) -> dict:
    r = RECIPES[name]
    data = write_synthetic_dataset(r["task"], workdir / name, r["images"], image_size=r["size"], seed=7)
    job = build_job(task=r["task"], training_data=data.train_jsonl, validation_data=data.validation_jsonl,
                    params=r["params"], output_dir=workdir / f"{name}-out", experiment_name="bench",
                    run_name=f"quality-{name}")
    start = time.perf_counter()
    result = train(job, progress=False, report=lambda m: print(m, flush=True) if m.startswith("epoch") else None)
    seconds = time.perf_counter() - start
    value = result.best_metrics[r["metric"]]
    return {"case": name, "model": r["params"]["model_name"], "train_images": data.n_train,
            "validation_images": data.n_validation, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
            "metric": r["metric"], "value": value, "target": r["target"], "meets_target": value >= r["target"],
            "wall_s": seconds, "budget_s": r["budget_minutes"] * 60, "within_budget": seconds <= r["budget_minutes"] * 60,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(RECIPES))
    args = parser.parse_args()
    private_mlflow_store()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, Path(tmp)) for name in ([args.only] if args.only else RECIPES)]
    print(table(rows, ["case", "model", "train_images", "epochs", "best_epoch", "metric", "value", "target",
                       "meets_target", "wall_s", "budget_s", "peak_rss_mb"]))
    path = write("quality" + (f"-{args.only}" if args.only else ""), {"rows": rows, **peak_rss_mb()})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
