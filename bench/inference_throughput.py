"""Inference throughput: the MLflow pyfunc vs the bare model, and the cost of 3x2 tiling.

    uv run python bench/inference_throughput.py [--images 16] [--repeats 3]

For a classifier (resnet18, 224 crop) and a detector (fasterrcnn_resnet18_fpn, min_size 600):
- pyfunc: `mlflow.pyfunc.load_model(folder, model_config={"backend": "torch"}).predict(df)` on base64 JPEGs (640x480), all of it
  counted: base64, decoding, preprocessing, batching, the model, the response;
- bare: the same weights' forward on already-decoded, already-preprocessed tensors in batches
  of the same size, `torch.inference_mode`; nothing else;
- bare_cl: the same, with the model in channels_last memory format as the pyfunc runs convolutional
  models, so that `overhead_ratio` (bare_cl over pyfunc) shows what decoding, preprocessing and the
  response cost on their own.
Target: pyfunc >= 0.8 of bare. Tiling: seconds per image with `tile_grid_size` 3x2 over seconds
per image without (target <= 5x; one forward per tile plus the whole image would be 7x).

Backends (classifiers): the same pyfunc loaded with `model_config` for eager torch, torch.compile and
ONNX Runtime (artifacts/model.onnx): seconds to load (what a replica's start-up costs) and images/s at
batch 1 (one image per call) and batch 8, each also as a ratio to eager torch. Target: ONNX loads no
slower than eager torch.

INT8 (`--int8-models`, `--int8-only` for this part alone): resnet18 and resnet50 trained from random weights on
synthetic shapes (`--int8-train-images`, `--int8-epochs`, `--int8-background`) at a `--int8-crop` crop (default
112: at 224, one epoch of resnet18 alone took over 7 minutes on this shared 2-core machine), exported with their
model.int8.onnx (calibrated on training images); the accuracy of each file on the held-out validation images as
export recorded it (at that crop), and images/s of the same two files on ONNX Runtime alone (CPU threads: all, as
a replica runs them) on 224 crops (the graphs take any size) at batch 1 and 8, rounds interleaved. Target: INT8
>= 2.5x FP32 at batch 1 and 8, within 1 point of accuracy. `--int8-epochs 0`: untrained models (speed only).
Writes bench/results/inference_throughput.json (bench/results/inference_throughput_int8.json with --int8-only).
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import peak_rss_mb, table, write  # noqa: E402
from models.tasks.architectures import build_model, get_architecture  # noqa: E402
from models.export import ModelSettings, export_model  # noqa: E402
from models.tasks.registry import get_task, inference_settings  # noqa: E402

LABELS = ["circle", "square", "star", "triangle"]
CASES = {
    "resnet18": ("image_classification", {"batch_size": 16}),
    "fasterrcnn_resnet18_fpn": ("image_object_detection", {"batch_size": 4, "box_score_thresh": 0.05}),
}


def _jpeg(seed: int, size=(640, 480)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _folder(name: str, workdir: Path) -> tuple[Path, ModelSettings, torch.nn.Module]:
    task_name, values = CASES[name]
    task = get_task(task_name)
    spec = ModelSettings(task, name, LABELS, inference_settings(task, values))
    torch.manual_seed(0)
    model = build_model(get_architecture(name, task.family), len(LABELS), spec.settings).eval()
    return export_model(workdir / name, spec, model.state_dict()), spec, model


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, n: int, repeats: int, workdir: Path) -> dict:
    import mlflow.pyfunc
    import pandas as pd

    folder, spec, model = _folder(name, workdir)
    jpegs = [_jpeg(i) for i in range(n)]
    frame = pd.DataFrame({"image": [base64.encodebytes(j).decode("utf-8") for j in jpegs]})
    pyfunc = mlflow.pyfunc.load_model(str(folder), model_config={"backend": "torch"})  # against the bare torch model
    ops, settings = spec.task.ops, spec.settings
    preprocess = ops.preprocess(settings)
    tensors = [preprocess(torch.from_numpy(np.array(Image.open(io.BytesIO(j)).convert("RGB"))).permute(2, 0, 1))
               for j in jpegs]

    def bare(net):
        with torch.inference_mode():
            for start in range(0, n, settings.batch_size):
                ops.predict(net, tensors[start:start + settings.batch_size], settings)

    t_pyfunc = _timed(lambda: pyfunc.predict(frame), repeats)
    t_bare = _timed(lambda: bare(model), repeats)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    t_bare_cl = _timed(lambda: bare(channels_last), repeats)
    row = {"model": name, "images": n, "batch": settings.batch_size, "pyfunc_images_per_s": n / t_pyfunc,
           "bare_images_per_s": n / t_bare, "bare_cl_images_per_s": n / t_bare_cl, "ratio": t_bare / t_pyfunc,
           "overhead_ratio": t_bare_cl / t_pyfunc, "target": 0.8, "meets_target": t_bare / t_pyfunc >= 0.8}
    if spec.task.name == "image_object_detection":
        few = frame.iloc[: max(2, n // 4)]
        t_whole = _timed(lambda: pyfunc.predict(few), repeats)
        t_tiled = _timed(lambda: pyfunc.predict(few, params={"tile_grid_size": "3x2"}), repeats)
        row.update({"tiled_3x2_cost": t_tiled / t_whole, "tiled_target": 5.0,
                    "tiled_meets_target": t_tiled / t_whole <= 5.0})
    return row


BACKENDS = {"torch": {"backend": "torch"}, "compiled": {"compile": True}, "onnx": {"backend": "onnx"}}


def backends(name: str, repeats: int, workdir: Path) -> list[dict]:
    """Load time and images/s at batch 1 and 8 of the pyfunc on each backend (classifiers)."""
    import mlflow.pyfunc
    import pandas as pd

    folder = workdir / name
    frame = pd.DataFrame({"image": [base64.b64encode(_jpeg(i)).decode() for i in range(8)]})
    rows = []
    for backend, config in BACKENDS.items():
        start = time.perf_counter()
        pyfunc = mlflow.pyfunc.load_model(str(folder), model_config=config)
        load_s = time.perf_counter() - start
        one = _timed(lambda: [pyfunc.predict(frame.iloc[i:i + 1]) for i in range(8)], repeats)
        eight = _timed(lambda: pyfunc.predict(frame), repeats)
        rows.append({"model": name, "backend": backend, "load_s": load_s, "b1_images_per_s": 8 / one,
                     "b8_images_per_s": 8 / eight})
    base = rows[0]
    for row in rows:
        row.update({"b1_vs_torch": row["b1_images_per_s"] / base["b1_images_per_s"],
                    "b8_vs_torch": row["b8_images_per_s"] / base["b8_images_per_s"],
                    "load_vs_torch": row["load_s"] / base["load_s"]})
    onnx = next(row for row in rows if row["backend"] == "onnx")
    onnx.update({"load_target": "<= torch", "meets_target": onnx["load_s"] <= base["load_s"]})
    return rows


INT8_TARGET = 2.5


def _trained(name: str, images: int, epochs: int, crop: int, background: str, workdir: Path) -> Path:
    """A `name` classifier trained from random weights on synthetic shapes at `crop`: its exported folder (with
    `epochs` 0, untrained: random weights, exported with its INT8 file calibrated on the same images; for speed)."""
    from bench._common import private_mlflow_store
    from models.data.jsonl import read_dataset
    from models.data.synth import write_synthetic_dataset
    from models.job import build_job
    from models.onnx_int8 import QuantizationData
    from models.train.loop import train

    private_mlflow_store()
    data = write_synthetic_dataset("image_classification", workdir / f"data-{name}", images,
                                   image_size=(crop * 8 // 7, crop), seed=11, validation_fraction=0.4,
                                   background=background)
    if epochs == 0:
        task = get_task("image_classification")
        spec = ModelSettings(task, name, data.labels, inference_settings(task, {"valid_resize_size": crop,
                                                                                "valid_crop_size": crop}))
        torch.manual_seed(0)
        model = build_model(get_architecture(name, task.family), len(data.labels), spec.settings).eval()
        records = [read_dataset(p, task.name).records for p in (data.train_jsonl, data.validation_jsonl)]
        return export_model(workdir / f"{name}-untrained", spec, model.state_dict(),
                            quantization=QuantizationData(*records))
    params = {"weights": "none", "model_name": name, "number_of_epochs": epochs, "training_batch_size": 16,
              "validation_batch_size": 32, "valid_resize_size": crop, "valid_crop_size": crop, "train_crop_size": crop,
              "optimizer": "adam", "learning_rate": 0.001, "warmup_cosine_lr_warmup_epochs": 1, "early_stopping": 0}
    job = build_job(task="image_classification", training_data=data.train_jsonl,
                    validation_data=data.validation_jsonl, params=params, output_dir=workdir / f"{name}-out",
                    experiment_name="bench", run_name=f"int8-{name}")
    report = lambda m: print(m, flush=True) if m.startswith(("epoch", "best")) else None  # noqa: E731
    return train(job, progress=False, report=report).model_dir


def int8(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """FP32 vs INT8 model files of a trained `name` on ONNX Runtime: images/s at batch 1 and 8, accuracy."""
    from models.export import read_settings
    from models.onnx_int8 import session

    started = time.perf_counter()
    crop, repeats = args.int8_crop, max(args.repeats, 5)
    artifacts = _trained(name, args.int8_train_images, args.int8_epochs, crop, args.int8_background,
                         workdir) / "artifacts"
    train_s = time.perf_counter() - started
    record = read_settings(artifacts / "settings.json").int8
    crops = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    sessions = {"fp32": session(artifacts / "model.onnx"), "int8": session(artifacts / "model.int8.onnx")}
    best = {(kind, batch): float("inf") for kind in sessions for batch in (1, 8)}
    for kind, s in sessions.items():  # warm-up
        s.run(None, {"input1": crops[:8]})
    for _ in range(repeats):  # interleaved, so that a busy neighbour slows both alike
        for (kind, batch) in best:
            start = time.perf_counter()
            for i in range(0, len(crops), batch):
                sessions[kind].run(None, {"input1": crops[i:i + batch]})
            best[(kind, batch)] = min(best[(kind, batch)], time.perf_counter() - start)
    rate = {key: len(crops) / seconds for key, seconds in best.items()}
    row = {"model": name, "accuracy_crop": crop, "train_s": train_s,
           **{f"{k}_b{b}_images_per_s": v for (k, b), v in rate.items()},
           "b1_ratio": rate[("int8", 1)] / rate[("fp32", 1)], "b8_ratio": rate[("int8", 8)] / rate[("fp32", 8)]}
    row.update({"fp32_accuracy": record.fp32, "int8_accuracy": record.int8, "accuracy_difference": record.difference,
                "agreement": record.agreement, "validation_images": record.images,
                "calibration_images": record.calibration_images, "target": f">= {INT8_TARGET}x, loss <= 0.01"})
    row["meets_target"] = (min(row["b1_ratio"], row["b8_ratio"]) >= INT8_TARGET and record.within_tolerance())
    return row


INT8_COLUMNS = ["model", "accuracy_crop", "fp32_b1_images_per_s", "int8_b1_images_per_s", "b1_ratio",
                "fp32_b8_images_per_s", "int8_b8_images_per_s", "b8_ratio", "fp32_accuracy", "int8_accuracy",
                "accuracy_difference", "agreement", "validation_images", "meets_target"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--int8-models", nargs="*", default=["resnet18", "resnet50"])
    parser.add_argument("--int8-only", action="store_true", help="only the FP32 vs INT8 measurement")
    parser.add_argument("--int8-train-images", type=int, default=800, help="synthetic images (40 %% held out)")
    parser.add_argument("--int8-epochs", type=int, default=4, help="0: untrained (random weights; speed only)")
    parser.add_argument("--int8-crop", type=int, default=112, help="the crop the INT8 models train and score at")
    parser.add_argument("--int8-background", choices=("plain", "textured"), default="plain",
                        help="the synthetic images' background (textured: harder, needs more epochs)")
    args = parser.parse_args()
    if args.int8_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [int8(name, args, Path(tmp)) for name in args.int8_models]
        print(table(rows, INT8_COLUMNS))
        print(f"\nwritten {write('inference_throughput_int8', {'int8': rows, **peak_rss_mb()})}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, args.images, args.repeats, Path(tmp)) for name in args.models]
        by_backend = [row for name in args.models if CASES[name][0] == "image_classification"
                      for row in backends(name, args.repeats, Path(tmp))]
        int8_rows = [int8(name, args, Path(tmp)) for name in args.int8_models]
    print(table(rows, ["model", "images", "batch", "pyfunc_images_per_s", "bare_images_per_s", "bare_cl_images_per_s",
                       "ratio", "overhead_ratio", "meets_target", "tiled_3x2_cost", "tiled_meets_target"]))
    print()
    print(table(by_backend, ["model", "backend", "load_s", "b1_images_per_s", "b8_images_per_s", "b1_vs_torch",
                             "b8_vs_torch", "load_vs_torch", "meets_target"]))
    print()
    print(table(int8_rows, INT8_COLUMNS))
    path = write("inference_throughput", {"rows": rows, "backends": by_backend, "int8": int8_rows, **peak_rss_mb()})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
