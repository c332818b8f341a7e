"""INT8 for a detector: what quantizing a Faster R-CNN's graph gives (its backbone, FPN, RPN head and box head
convolutions and matrix products in int8; anchors, TopK, NMS, RoiAlign, the resize and the box decoding in float).

    uv run python bench/int8_detector.py [--images 120] [--epochs 12] [--repeats 3]

- speed: fasterrcnn_resnet18_fpn at its serving defaults (min_size 600, max_size 1333; random weights: the box
  head runs on 1,000 proposals whatever they hold), one 640x480 image: seconds per image in eager torch (what
  `auto` scores detectors with on a CPU), on its FP32 model.onnx and on its model.int8.onnx (ONNX Runtime,
  every CPU thread), rounds interleaved, with the seconds export took to quantize;
- accuracy: the same architecture trained from random weights on synthetic shapes at 128 px (`--images`,
  `--epochs`), then given its model.int8.onnx as `visionserve quantize` does (models.export.add_int8, calibrated on
  training images): voc mAP@0.5 of each file on the held-out images, and the share of FP32 detections the INT8
  file also finds.
Writes bench/results/int8_detector.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import peak_rss_mb, private_mlflow_store, table, write  # noqa: E402
from models.data.jsonl import read_dataset  # noqa: E402
from models.data.synth import write_synthetic_dataset  # noqa: E402
from models.onnx_int8 import QuantizationData, session  # noqa: E402

MODEL = "fasterrcnn_resnet18_fpn"
TASK = "image_object_detection"


def speed(repeats: int, workdir: Path) -> dict:
    from models.export import ModelSettings, add_int8, export_model
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.detection import configured
    from models.tasks.registry import get_task, inference_settings

    data = write_synthetic_dataset(TASK, workdir / "speed-data", 12, image_size=(640, 480), seed=3)
    records = read_dataset(data.train_jsonl, TASK).records
    task = get_task(TASK)
    spec = ModelSettings(task, MODEL, data.labels, inference_settings(task, {}))
    torch.manual_seed(0)
    network = build_model(get_architecture(MODEL, task.family), len(data.labels), spec.settings).eval()
    folder = export_model(workdir / "speed", spec, network.state_dict())
    model = configured(network, spec.settings)  # scoring under the settings the graph was exported with
    started = time.perf_counter()  # what `visionserve quantize` adds: calibration on 8 images, 2 checked
    record = add_int8(folder / "artifacts", QuantizationData(records, records[:2]))
    quantize_s = time.perf_counter() - started
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(0))
    fp32, int8 = session(folder / "artifacts" / "model.onnx"), session(folder / "artifacts" / "model.int8.onnx")
    engines = {"torch": lambda: model([image]), "onnx_fp32": lambda: fp32.run(None, {"input1": image.numpy()}),
               "onnx_int8": lambda: int8.run(None, {"input1": image.numpy()})}
    best = {name: float("inf") for name in engines}
    with torch.inference_mode():
        for fn in engines.values():
            fn()
        for _ in range(repeats):
            for name, fn in engines.items():
                started = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - started)
    return {"model": MODEL, "image": "640x480", "min_size": spec.settings.min_size,
            **{f"{name}_s": round(s, 3) for name, s in best.items()},
            "int8_vs_onnx_fp32": round(best["onnx_fp32"] / best["onnx_int8"], 2),
            "int8_vs_torch": round(best["torch"] / best["onnx_int8"], 2), "quantize_and_check_s": round(quantize_s, 1),
            "quantized": record.quantized, "float_ops": record.float_ops}


def accuracy(images: int, epochs: int, workdir: Path) -> dict:
    from models.export import add_int8
    from models.job import build_job
    from models.train.loop import train

    private_mlflow_store()
    data = write_synthetic_dataset(TASK, workdir / "data", images, image_size=(128, 128), seed=7,
                                   validation_fraction=0.3)
    params = {"weights": "none", "model_name": MODEL, "number_of_epochs": epochs, "training_batch_size": 4,
              "validation_batch_size": 8, "min_size": 128, "max_size": 128, "learning_rate": 0.01,
              "warmup_cosine_lr_warmup_epochs": 1, "box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 600,
              "rpn_post_nms_top_n_train": 300, "early_stopping": 0, "evaluation_frequency": epochs}
    job = build_job(task=TASK, training_data=data.train_jsonl, validation_data=data.validation_jsonl, params=params,
                    output_dir=workdir / "out", experiment_name="bench", run_name="int8-detector")
    report = lambda m: print(m, flush=True) if m.startswith(("epoch", "best")) else None  # noqa: E731
    result = train(job, progress=False, report=report)
    train_records = read_dataset(data.train_jsonl, TASK).records
    validation = read_dataset(data.validation_jsonl, TASK).records
    started = time.perf_counter()
    record = add_int8(Path(result.model_dir) / "artifacts",
                      QuantizationData(train_records, validation, validation_images=len(validation)))
    return {"model": MODEL, "size": 128, "train_images": len(train_records), "epochs": epochs,
            "fp32_map": round(record.fp32, 4), "int8_map": round(record.int8, 4),
            "map_difference": round(record.difference, 4), "agreement": round(record.agreement, 3),
            "validation_images": record.images, "quantize_and_score_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("speed", "accuracy"))
    args = parser.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "accuracy":
            out["speed"] = speed(args.repeats, Path(tmp))
            print(table([out["speed"]], ["model", "image", "torch_s", "onnx_fp32_s", "onnx_int8_s",
                                         "int8_vs_onnx_fp32", "int8_vs_torch", "quantize_and_check_s"]), flush=True)
        if args.only != "speed":
            out["accuracy"] = accuracy(args.images, args.epochs, Path(tmp))
            print(table([out["accuracy"]], list(out["accuracy"])))
    print(f"\nwritten {write('int8_detector', {**out, **peak_rss_mb()})}")


if __name__ == "__main__":
    main()
