"""Small objects: whole-image inference vs 2x2 and 3x2 tiling, merged by nms or greedy_nmm.

    uv run python bench/small_objects.py [--train-images 120] [--epochs 16] [--test-images 12]

A fasterrcnn_resnet18_fpn is trained (random init, CPU) on small synthetic images (`--train-size`,
320x240) holding objects of 10–30 px at their native scale, then scored on held-out 1600x1200
images of the same kind (`visionserve data synth --small-objects`) with min_size 600: scored whole,
each object shrinks to half its size; a 3x2 tile is resized to about its own size. Reports voc mAP@0.5 and recall per
mode. Target: 3x2 tiling at least +0.2 mAP@0.5 over whole-image inference.
Writes bench/results/small_objects.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import peak_rss_mb, private_mlflow_store, table, write  # noqa: E402
from models.job import build_job  # noqa: E402
from models.tasks.detection_metrics import detection_metrics
from models.data.synth import write_synthetic_dataset  # noqa: E402
from models.train.loop import train  # noqa: E402
from serving.predictor import Predictor  # noqa: E402
from serving.scoring import Scoring  # noqa: E402

TRAIN = {"weights": "none", "model_name": "fasterrcnn_resnet18_fpn", "training_batch_size": 2, "validation_batch_size": 2,
          "learning_rate": 0.01, "warmup_cosine_lr_warmup_epochs": 1,
         "box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500,
         "box_detections_per_img": 100, "early_stopping": 0, "evaluation_frequency": 4}
MODES = [("whole image", None, "nms"), ("2x2 nms", "2x2", "nms"), ("2x2 greedy_nmm", "2x2", "greedy_nmm"),
         ("3x2 nms", "3x2", "nms"), ("3x2 greedy_nmm", "3x2", "greedy_nmm")]


def _truth(line: dict, labels: list[str], width: int, height: int) -> dict:
    boxes = [[o["topX"] * width, o["topY"] * height, o["bottomX"] * width, o["bottomY"] * height] for o in line["label"]]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([labels.index(o["label"]) + 1 for o in line["label"]])}


def _prediction(response: dict, labels: list[str], width: int, height: int) -> dict:
    items = response["boxes"]
    boxes = [[b["box"]["topX"] * width, b["box"]["topY"] * height, b["box"]["bottomX"] * width,
              b["box"]["bottomY"] * height] for b in items]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([b["score"] for b in items]),
            "labels": torch.tensor([labels.index(b["label"]) + 1 for b in items], dtype=torch.long)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=160)
    parser.add_argument("--train-size", default="320x240", help="training image size WxH (objects stay 10-30 px)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--test-images", type=int, default=12)
    parser.add_argument("--keep", help="keep the data and the trained model in this folder")
    args = parser.parse_args()
    private_mlflow_store()
    width, height = (int(v) for v in args.train_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        data = write_synthetic_dataset("image_object_detection", work / "train", args.train_images,
                                       small_objects=True, image_size=(width, height), seed=1)
        test = write_synthetic_dataset("image_object_detection", work / "test", args.test_images,
                                       small_objects=True, seed=2, validation_fraction=0.0)
        job = build_job(task="image_object_detection", training_data=data.train_jsonl,
                        validation_data=data.validation_jsonl,
                        params={**TRAIN, "number_of_epochs": args.epochs, "min_size": min(width, height),
                                "max_size": max(width, height)},
                        output_dir=work / "out", experiment_name="bench", run_name="small-objects")
        started = time.perf_counter()
        result = train(job, progress=False, report=lambda m: print(m, flush=True) if m.startswith("epoch") else None)
        train_s = time.perf_counter() - started
        predictor = Predictor.load(result.model_dir)
        labels = predictor.labels
        lines = [json.loads(line) for line in Path(test.train_jsonl).read_text().splitlines()]
        paths = [Path(test.train_jsonl).parent / line["image_url"] for line in lines]
        targets = [_truth(line, labels, 1600, 1200) for line in lines]
        rows = []
        for name, grid, merge in MODES:
            params = {"min_size": 600, "max_size": 1333, "box_score_thresh": 0.1, "tile_grid_size": grid,
                      "tile_merge": merge, "batch_size": 2}
            start = time.perf_counter()
            responses = Scoring(predictor).score_files(paths, params)
            seconds = (time.perf_counter() - start) / len(paths)
            predictions = [_prediction(r, labels, 1600, 1200) for r in responses]
            metrics = detection_metrics(predictions, targets, labels, metric_type="voc", iou_threshold=0.5)
            rows.append({"mode": name, "map_50": metrics["mean_average_precision"], "recall": metrics["recall"],
                         "precision": metrics["precision"], "seconds_per_image": seconds})
    whole = rows[0]["map_50"]
    for row in rows:
        row["gain_over_whole"] = row["map_50"] - whole
    tiled = next(r for r in rows if r["mode"] == "3x2 nms")
    print(table(rows, ["mode", "map_50", "gain_over_whole", "recall", "precision", "seconds_per_image"]))
    print(f"\n3x2 tiling gain {tiled['gain_over_whole']:+.3f} mAP@0.5 (target +0.2): "
          f"{'met' if tiled['gain_over_whole'] >= 0.2 else 'NOT met'}; training {train_s:.0f}s, "
          f"{result.epochs_run} epochs, validation mAP {result.best_metrics.get('mean_average_precision', 0):.3f}")
    path = write("small_objects", {"rows": rows, "train_seconds": train_s, "epochs": result.epochs_run,
                                   "train_images": data.n_train, "test_images": len(paths),
                                   "target_gain": 0.2, "meets_target": tiled["gain_over_whole"] >= 0.2,
                                   **peak_rss_mb()})
    print(f"written {path}")


if __name__ == "__main__":
    main()
