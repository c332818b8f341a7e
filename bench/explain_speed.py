"""Explanation speed: seconds per explanation per algorithm, batched vs one pass per step (or per mask).

    uv run python bench/explain_speed.py [--repeats 1] [--n-steps 50] [--batch 16] [--only classifiers|d_rise]
                                         [--drise-sample 24] [--drise-batch 8]

resnet18 (random weights: speed does not depend on them) at valid_crop_size 224 on whatever
device `VISIONSERVE_DEVICE` / CUDA gives (the CPU here). For xrai and integrated_gradients the
same explanation is timed twice in the same run: `internal_batch_size=--batch` (integration steps
and XRAI's two baselines share passes) and `internal_batch_size=1` (one forward/backward per step,
what saliency's and captum's loops do by default). Target: batched <= 0.5 x unbatched. guided_*
have no steps (one pass each). Only the attribution is timed (not the PNG); the PNG is timed once
separately.

D-RISE: fasterrcnn_resnet18_fpn (random weights; the cost of a pass does not depend on them: the RPN keeps its
1000 proposals either way) on a 640x480 image at the default min_size 600 / max_size 1333 (the network sees
800x600). Its default number_of_masks is 1000 forward passes: on a 2-core CPU that is most of an hour, so
`--drise-sample` masks are timed and the time of the default count is that per-mask time x 1000 (the loop does
the same work for every mask). Timed twice in the same run: `internal_batch_size=--drise-batch` masks per pass,
and one mask per pass (what Microsoft's vision-explanation-methods does). All explained detections of an image
share the masks, so seconds per explained detection = seconds per image / detections explained (1 and the
default 3 reported). Target: batched <= 0.3 x one mask at a time. Writes bench/results/explain_speed.json.
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
DRISE_SIZE = (640, 480)


def _drise_seconds_per_mask(detector, settings, image: torch.Tensor, masks: int, batches: tuple[int, ...],
                            rounds: int = 3) -> dict[int, float]:
    """Seconds per mask for each batch size; the modes alternate in `rounds` so that a change in the machine's
    load (other processes share these cores) falls on both alike."""
    from explain.drise import Sampling, saliency

    boxes, labels = torch.tensor([[200.0, 150, 400, 330]]), torch.tensor([1])
    seconds, done = dict.fromkeys(batches, 0.0), dict.fromkeys(batches, 0)
    saliency(detector, image, boxes, labels, settings, Sampling(masks=2, batch=2, budget_s=1e9))  # warm-up
    for _ in range(rounds):
        for batch in batches:
            result = saliency(detector, image, boxes, labels, settings,
                              Sampling(masks=max(1, masks // rounds), batch=batch, budget_s=1e9))
            seconds[batch] += result.seconds
            done[batch] += result.masks
    return {b: seconds[b] / done[b] for b in batches}


def drise_rows(sample: int, batch: int, device: torch.device) -> list[dict]:
    from explain import detector_copy, explaining_settings
    from explain.params import DetectionXaiParameters
    from serving.scorers import TorchScorer

    task = get_task("image_object_detection")
    settings = inference_settings(task, {})
    torch.manual_seed(0)
    model = build_model(get_architecture("fasterrcnn_resnet18_fpn", "detection"), 4, settings).eval()
    detector = TorchScorer(detector_copy(model).to(device), task.ops)  # what serving explains through
    image = torch.rand(3, DRISE_SIZE[1], DRISE_SIZE[0], device=device)
    default = DetectionXaiParameters()
    masks = default.number_of_masks
    timed = _drise_seconds_per_mask(detector, explaining_settings(settings), image, sample, (batch, 1))
    per_image = {b: s * masks for b, s in timed.items()}
    row = {"algorithm": "d_rise", "image": f"{DRISE_SIZE[0]}x{DRISE_SIZE[1]}", "masks": masks,
           "masks_timed": sample, "batch": batch, "batched_s_per_mask": round(timed[batch], 3),
           "one_mask_per_pass_s_per_mask": round(timed[1], 3), "batched_s": round(per_image[batch], 1),
           "one_mask_per_pass_s": round(per_image[1], 1)}
    for k in (1, default.max_explained_detections):
        row[f"batched_s_per_detection_of_{k}"] = round(per_image[batch] / k, 1)
        row[f"one_at_a_time_s_per_detection_of_{k}"] = round(per_image[1] / k, 1)
    row.update(ratio=round(timed[batch] / timed[1], 3), target_met=timed[batch] <= 0.3 * timed[1])
    print(row, flush=True)
    return [row]


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
    parser.add_argument("--only", choices=("classifiers", "d_rise"), default=None)
    parser.add_argument("--drise-sample", type=int, default=24, help="D-RISE masks timed (per mode)")
    parser.add_argument("--drise-batch", type=int, default=8, help="D-RISE masks per pass when batched")
    args = parser.parse_args()
    device = default_device()
    results = {"device": str(device), "repeats": args.repeats}
    if args.only != "d_rise":
        results["classifiers"] = classifier_rows(args, device)
    if args.only != "classifiers":
        results["d_rise"] = drise_rows(args.drise_sample, args.drise_batch, device)
        print(table(results["d_rise"], ["image", "masks", "masks_timed", "batch", "batched_s_per_mask",
                                        "one_mask_per_pass_s_per_mask", "batched_s_per_detection_of_3",
                                        "one_at_a_time_s_per_detection_of_3", "ratio", "target_met"]))
    path = write("explain_speed", results)
    print(f"wrote {path}")


def classifier_rows(args, device: torch.device) -> dict:
    """resnet18 at 224: each classifier algorithm batched, and the stepped ones one pass per step."""
    task = get_task("image_classification")
    settings = inference_settings(task, {"valid_resize_size": 256, "valid_crop_size": 224})
    torch.manual_seed(0)
    model = build_model(get_architecture("resnet18", "classification"), 4, settings).eval()
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
    return {"model": "resnet18", "crop": 224, "n_steps": args.n_steps, "internal_batch_size": args.batch,
            "rows": rows, "png_seconds": round(png_s, 3)}


if __name__ == "__main__":
    main()
