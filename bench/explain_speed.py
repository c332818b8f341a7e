"""Explanation speed: seconds per explanation per algorithm, batched vs one pass per step.

    uv run python bench/explain_speed.py [--repeats 1] [--n-steps 50] [--batch 16]

resnet18 (random weights: speed does not depend on them) at valid_crop_size 224 on whatever
device `VISIONSERVE_DEVICE` / CUDA gives (the CPU here). For xrai and integrated_gradients the
same explanation is timed twice in the same run: `internal_batch_size=--batch` (integration steps
and XRAI's two baselines share passes) and `internal_batch_size=1` (one forward/backward per step,
what saliency's and captum's loops do by default). Target: batched <= 0.5 x unbatched. guided_*
have no steps (one pass each). Only the attribution is timed (not the PNG); the PNG is timed once
separately. Writes bench/results/explain_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table, write  # noqa: E402
from explain import make_explainer
from explain.params import ALGORITHMS, parse_xai
from explain.methods import attribute  # noqa: E402
from explain.visualize import render  # noqa: E402
from models.tasks.architectures import build_model, get_architecture  # noqa: E402
from models.tasks.registry import get_task, inference_settings  # noqa: E402
from serving.loading import default_device

STEPPED = ("xrai", "integrated_gradients")


def _seconds(explainer, pixels, xai, repeats: int) -> float:
    attribute(explainer, pixels, 0, xai.model_copy(update={"n_steps": 2}))  # warm-up: allocations, imports
    started = time.perf_counter()
    for _ in range(repeats):
        attribute(explainer, pixels, 0, xai)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    task = get_task("image_classification")
    settings = inference_settings(task, {"valid_resize_size": 256, "valid_crop_size": 224})
    torch.manual_seed(0)
    model = build_model(get_architecture("resnet18", "classification"), 4, settings).eval()
    device = default_device()
    explainer = make_explainer(model, "resnet18", multilabel=False, device=device)
    pixels = torch.rand(1, 3, 224, 224, device=device)
    rows = []
    for algorithm in ALGORITHMS:
        common = {"xai_algorithm": algorithm, "n_steps": args.n_steps}
        batched = _seconds(explainer, pixels, parse_xai({**common, "internal_batch_size": args.batch}), args.repeats)
        row = {"algorithm": algorithm, "batched_s": round(batched, 3)}
        if algorithm in STEPPED:
            single = _seconds(explainer, pixels, parse_xai({**common, "internal_batch_size": 1}), args.repeats)
            row.update(one_pass_per_step_s=round(single, 3), ratio=round(batched / single, 3),
                       target_met=batched <= 0.5 * single)
        rows.append(row)
        print(row, flush=True)
    attributions = attribute(explainer, pixels, 0, parse_xai({"xai_algorithm": "guided_backprop"}))
    started = time.perf_counter()
    render(pixels[0].cpu(), attributions, "label: 0.99 (guided_backprop)")
    png_s = time.perf_counter() - started
    print(table(rows, ["algorithm", "batched_s", "one_pass_per_step_s", "ratio", "target_met"]))
    print(f"2x2 PNG: {png_s:.3f} s")
    path = write("explain_speed", {"model": "resnet18", "crop": 224, "n_steps": args.n_steps,
                                   "internal_batch_size": args.batch, "device": str(device),
                                   "repeats": args.repeats, "rows": rows, "png_seconds": round(png_s, 3)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
