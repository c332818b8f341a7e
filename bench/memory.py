"""Memory of scoring one very large image, per task, against the loaded model's own resident size.

    uv run python bench/memory.py [--tasks image_object_detection ...] [--cases jpeg_16000 ...]

Cases (each scored alone, in a fresh process, through the scoring core (`Scoring.score_bytes`) as every route does):
- jpeg_16000:  one 16000x16000 JPEG (smooth content, a few MB: legal under the 6 MB limit);
- png16_8000:  one 16-bit grayscale 8000x8000 PNG;
- tiled_16000: one 16000x12000 JPEG with `tile_grid_size` 3x2 (detection only: segmentation refuses tiling).
Models: each task's default architecture with random weights (what they hold does not change memory),
`box_score_thresh` 0 so detectors always return their `box_detections_per_img` (100) boxes and masks.
Reported: the model's resident size (RSS after loading and one small warm-up image) and the peak RSS
while scoring the large image above it (Linux: VmHWM reset through /proc/self/clear_refs).
Target: every case under 1.5 GB above the loaded model on a CPU. Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table, write  # noqa: E402

TASKS = ("image_classification", "image_object_detection", "image_instance_segmentation")
CASES = ("jpeg_16000", "png16_8000", "tiled_16000")
TARGET_MB = 1536
LABELS = ["circle", "square", "star", "triangle"]


def _image(case: str, folder: Path) -> Path:
    """A large image with smooth content (gradients and a coarse pattern: it compresses to a few MB)."""
    import numpy as np
    from PIL import Image

    path = folder / f"{case}.{'png' if case.startswith('png') else 'jpg'}"
    if path.exists():
        return path
    if case == "png16_8000":
        ramp = np.linspace(0, 65535, 8000, dtype=np.float32)
        pixels = ((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint16)
        Image.fromarray(pixels).save(path, format="PNG", compress_level=6)  # mode I;16
        return path
    width, height = (16000, 16000) if case == "jpeg_16000" else (16000, 12000)
    small = np.random.default_rng(0).integers(0, 255, size=(height // 250, width // 250, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(path, format="JPEG", quality=30)
    return path


def _model(task_name: str, folder: Path) -> Path:
    import torch

    from models.export import ModelSettings, export_model
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.registry import get_task, inference_settings

    task = get_task(task_name)
    path = folder / task_name
    if path.exists():
        return path
    values = {} if task.is_classification else {"box_score_thresh": 0.0}
    spec = ModelSettings(task, task.default_model, LABELS, inference_settings(task, values))
    torch.manual_seed(0)
    model = build_model(get_architecture(task.default_model, task.family), len(LABELS), spec.settings).eval()
    return export_model(path, spec, model.state_dict())


def _status(key: str) -> float:
    """A VmRSS / VmHWM line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _one(model_dir: str, image: str, case: str) -> dict:
    """In this process: load, warm up on a small image, reset the peak, score the large image."""
    import torch
    from PIL import Image

    from serving.predictor import Predictor
    from serving.scoring import Scoring

    torch.set_num_threads(2)
    predictor = Scoring(Predictor.load(model_dir))
    small = io.BytesIO()
    Image.new("RGB", (320, 240), (120, 80, 40)).save(small, format="JPEG")
    predictor.score_bytes([small.getvalue()])
    model_mb = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    params = {"tile_grid_size": "3x2"} if case == "tiled_16000" else None
    started = time.perf_counter()
    [answer] = predictor.score_bytes([Path(image).read_bytes()], params)
    seconds = time.perf_counter() - started
    return {"model_mb": round(model_mb), "peak_mb": round(_status("VmHWM")), "seconds": round(seconds, 1),
            "answer": "error: " + answer["error"]["code"] if "error" in answer else "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "IMAGE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(*args.one)))
        return
    work = Path(tempfile.mkdtemp(prefix="visionserve-memory-"))
    rows = []
    for task in args.tasks:
        model = _model(task, work)
        for case in args.cases:
            if case == "tiled_16000" and task != "image_object_detection":
                continue
            image = _image(case, work)
            done = subprocess.run([sys.executable, __file__, "--one", str(model), str(image), case],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"task": task, "case": case, "answer": f"crashed: {done.stderr.strip()[-300:]}"})
                continue
            row = {"task": task, "case": case, "image_mb": round(image.stat().st_size / 2**20, 1),
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            row["above_model_mb"] = row["peak_mb"] - row["model_mb"]
            row["within_target"] = row["above_model_mb"] <= TARGET_MB
            rows.append(row)
            print(f"{task} {case}: {row['above_model_mb']} MB above the model ({row['seconds']} s)", flush=True)
    columns = ["task", "case", "image_mb", "model_mb", "peak_mb", "above_model_mb", "within_target", "seconds",
               "answer"]
    print(table(rows, columns))
    print(f"wrote {write('memory', {'target_mb_above_model': TARGET_MB, 'rows': rows})}")


if __name__ == "__main__":
    main()
