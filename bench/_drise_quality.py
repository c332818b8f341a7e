"""D-RISE's faithfulness on synthetic scenes whose objects are known (bench/explain_quality.py's detector part).

A tiny fasterrcnn_resnet18_fpn trained the way the tests train theirs (12 synthetic 128x96 scenes of coloured
shapes, 25 epochs from scratch: it finds its objects) explains its own detections with score >= 0.5:
- pointing game: the map's maximum lies inside the object's true box (the drawn shape's box); chance is the box's
  share of the image. Also the share of the map's positive mass inside the box next to the box's share of area;
- deletion: pixels are hidden (set to the mean colour, what a D-RISE mask does to them) in order of the map, 16 steps to the whole
  image; at each step the detector scores the image and the curve is the explained detection's similarity (best
  IoU x same label x score, D-RISE's own measure). Lower AUC is better. Controls in the same harness: a random
  order, and a box prior that knows the answer (the pixels of the detection's box first, nearest its centre
  first: no model at all).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.tasks.settings import IMAGENET_MEAN

STEPS = 16
MIN_SCORE = 0.5


def train_detector(root: Path, task: str = "image_object_detection"):
    """The tests' tiny detector recipe (tests/conftest.py): (model folder, dataset summary)."""
    import mlflow

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import NO_AUGMENT, RECIPES  # the one recipe of a tiny detector that memorises its scenes

    from models.data.synth import write_synthetic_dataset
    from models.job import build_job
    from models.train.loop import train

    os.environ.setdefault("VISIONSERVE_OFFLINE", "1")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    data = write_synthetic_dataset(task, root / "data", 12, image_size=(128, 96), seed=0, validation_fraction=0.0)
    params = {**RECIPES[task], "advanced_settings": NO_AUGMENT, "early_stopping": 0}
    job = build_job(task=task, training_data=data.train_jsonl, validation_data=data.train_jsonl, params=params,
                    output_dir=root / "out", experiment_name="bench")
    return Path(train(job, progress=False, report=lambda _: None).model_dir), data


def _scenes(train_jsonl: Path, count: int) -> list[tuple[torch.Tensor, list[dict]]]:
    from PIL import Image

    lines = [json.loads(line) for line in train_jsonl.read_text().splitlines()][:count]
    out = []
    for line in lines:
        picture = Image.open(train_jsonl.parent / line["image_url"]).convert("RGB")
        out.append((torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255, line["label"]))
    return out


def _box_mask(box, height: int, width: int) -> torch.Tensor:
    x0, y0, x1, y1 = box
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    return mask


def _box_prior(box, height: int, width: int) -> np.ndarray:
    """A map that knows where the object is and nothing else: inside the box, nearer its centre is higher."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    distance = np.hypot(xs - cx, ys - cy)
    return _box_mask(box, height, width).numpy() * 1e6 - distance


def deletion_auc(detector, settings, image: torch.Tensor, box, label: int, importance: np.ndarray, rng) -> float:
    """AUC of the detection's similarity while pixels are hidden most important first (ties at random)."""
    from explain.drise import similarity

    height, width = image.shape[1:]
    order = np.argsort(-(importance.ravel() + rng.random(height * width) * 1e-9))
    keep = np.ones(height * width, dtype=np.float32)
    fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    images = []
    for k in range(STEPS + 1):
        keep[:] = 1
        keep[order[: int(round(k / STEPS * height * width))]] = 0
        shown = torch.from_numpy(keep.reshape(height, width))
        images.append(image * shown + fill * (1 - shown))
    with torch.inference_mode():
        found = detector.predict(images, settings)
    curve = similarity(torch.tensor([box], dtype=torch.float32), torch.tensor([label]), found)[:, 0].numpy()
    return float(np.trapezoid(curve, dx=1 / STEPS))


def _true_box(objects: list[dict], labels: list[str], box, label: int, height: int, width: int):
    """The drawn object the detection found: same label, largest IoU (None: a false detection)."""
    from torchvision.ops import box_iou

    candidates = [o for o in objects if labels.index(o["label"]) + 1 == label]
    if not candidates:
        return None
    truth = torch.tensor([[o["topX"] * width, o["topY"] * height, o["bottomX"] * width, o["bottomY"] * height]
                          for o in candidates])
    iou = box_iou(torch.tensor([box]), truth)[0]
    return truth[int(iou.argmax())].tolist() if float(iou.max()) >= 0.5 else None


def drise_quality(images: int, masks: int, resolution: int, seed: int = 0, model: Path | None = None,
                  train_jsonl: Path | None = None) -> dict:
    """Pointing game and deletion AUCs (D-RISE, random, box prior) over the detections of `images` scenes; a model
    folder and its training JSONL (made by `train_detector` before) are reused when given."""
    from explain import detector_copy, explain_detections, explaining_settings, parse_xai
    from serving.loading import ModelFolder, load_model

    if model is None:
        started = time.perf_counter()
        model, data = train_detector(Path(tempfile.mkdtemp(prefix="visionserve-drise-quality-")))
        train_jsonl = data.train_jsonl
        print(f"trained the tiny detector in {time.perf_counter() - started:.0f} s", flush=True)
    folder = ModelFolder.open(model)
    loaded = load_model(folder, folder.plan("torch", "cpu"))
    detector = loaded.scorer.on(detector_copy(loaded.model))  # what serving explains through
    settings, labels = folder.model_settings.settings, folder.model_settings.labels
    scored = explaining_settings(settings)  # what D-RISE scores masked images under
    xai = parse_xai({"number_of_masks": masks, "mask_resolution": resolution, "internal_batch_size": 16,
                     "time_budget_s": 3600, "max_explained_detections": 10, "detection_score_threshold": MIN_SCORE,
                     "attributions": True, "visualizations": False}, "image_object_detection")
    rng = np.random.default_rng(seed)
    rows, seconds = [], 0.0
    for image, objects in _scenes(Path(train_jsonl), images):
        height, width = image.shape[1:]
        with torch.inference_mode():
            prediction = detector.predict([image], settings)[0]
        begun = time.perf_counter()
        out = explain_detections(detector, image, prediction, labels, xai, settings)
        seconds += time.perf_counter() - begun
        for explained, saliency_map in zip(out["explained_boxes"], out["attributions"]):
            i = explained["detection"]
            box, label = prediction["boxes"][i].tolist(), int(prediction["labels"][i])
            truth = _true_box(objects, labels, box, label, height, width)
            if truth is None:
                continue
            saliency_map = np.asarray(saliency_map)
            inside = _box_mask(truth, height, width).numpy()
            positive = np.clip(saliency_map, 0, None)
            rows.append({"hit": bool(inside.ravel()[saliency_map.argmax()]), "chance": float(inside.mean()),
                         "mass_inside": float(positive[inside].sum() / max(positive.sum(), 1e-12)),
                         "d_rise": deletion_auc(detector, scored, image, box, label, saliency_map, rng),
                         "random": deletion_auc(detector, scored, image, box, label, rng.random((height, width)), rng),
                         "box_prior": deletion_auc(detector, scored, image, box, label, _box_prior(box, height, width),
                                                   rng)})
            print(f"    {rows[-1]}", flush=True)
        print(f"  {len(rows)} detections explained ({seconds:.0f} s of D-RISE)", flush=True)
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 4)  # noqa: E731
    return {"detector": "fasterrcnn_resnet18_fpn, tests' tiny recipe, 128x96 synthetic scenes",
            "images": images, "detections": len(rows), "number_of_masks": masks, "mask_resolution": resolution,
            "pointing_game": mean("hit"), "pointing_chance": mean("chance"), "positive_mass_inside_box": mean("mass_inside"),
            "deletion_auc": {"d_rise": mean("d_rise"), "random": mean("random"), "box_prior": mean("box_prior")},
            "s_per_image": round(seconds / images, 2)}
