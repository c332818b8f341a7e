"""`visionserve demo`: the whole path on synthetic data, sized for a laptop CPU (about 2 minutes on 2 cores)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

# CPU-sized recipes: small images, small models, torchvision's samplers trimmed. The demo trains from
# scratch (weights=none: it runs offline and downloads nothing; every other training starts from
# pretrained weights by default), so the classifier needs a couple of thousand images to learn shapes
# rather than backgrounds: about 2 minutes on a 2-core CPU.
_SCRATCH = {"weights": "none"}
_CLASSIFIER = {**_SCRATCH, "model_name": "resnet18", "number_of_epochs": 12, "training_batch_size": 32,
               "validation_batch_size": 64, "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
               "optimizer": "adam", "learning_rate": 0.001, "warmup_cosine_lr_warmup_epochs": 1, "early_stopping": 0}
_DETECTOR = {**_SCRATCH, "min_size": 128, "max_size": 128, "box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 600,
             "rpn_post_nms_top_n_train": 300, "training_batch_size": 4, "validation_batch_size": 8,
             "learning_rate": 0.01, "warmup_cosine_lr_warmup_epochs": 1, "number_of_epochs": 6}
DEMOS: dict[str, dict[str, Any]] = {
    "image_classification": {"images": 2000, "size": (64, 64), "params": _CLASSIFIER},
    "image_classification_multilabel": {"images": 2000, "size": (64, 64), "params": _CLASSIFIER},
    "image_object_detection": {"images": 120, "size": (128, 128),
                               "params": {"model_name": "fasterrcnn_resnet18_fpn", **_DETECTOR}},
    "image_instance_segmentation": {"images": 120, "size": (128, 128),
                                    "params": {"model_name": "maskrcnn_resnet18_fpn", **_DETECTOR,
                                               "learning_rate": 0.005}},
}


def _tracking_uri(out: Path) -> str:
    """The demo keeps its MLflow store inside its own folder unless MLFLOW_TRACKING_URI says otherwise."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def _ensure_experiment(name: str, artifacts: Path) -> None:
    import mlflow

    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def run_demo(out: Path, *, task: str = "image_classification", images: int | None = None,
             epochs: int | None = None) -> dict[str, Any]:
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    from models.job import build_job
    from models.data.synth import write_synthetic_dataset
    from models.train.loop import train

    if task not in DEMOS:
        raise ValueError(f"--task {task!r}: the demo covers {', '.join(DEMOS)}")
    recipe = DEMOS[task]
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print(f"1/4 writing a synthetic {task} dataset to {out / 'data'}")
    data = write_synthetic_dataset(task, out / "data", images or recipe["images"], image_size=recipe["size"], seed=0)

    mlflow.set_tracking_uri(_tracking_uri(out))
    _ensure_experiment("visionserve-demo", out / "mlruns")
    params = dict(recipe["params"])
    if epochs:
        params["number_of_epochs"] = epochs
    print(f"2/4 training {params['model_name']} from scratch (random initialisation, nothing downloaded; "
          f"`visionserve train` starts from pretrained weights by default) for {params['number_of_epochs']} "
          f"epochs on {data.n_train} images (MLflow store: {mlflow.get_tracking_uri()})")
    job = build_job(task=task, training_data=data.train_jsonl, validation_data=data.validation_jsonl,
                    params=params, output_dir=out / "outputs", experiment_name="visionserve-demo", run_name="demo")
    result = train(job)

    print(f"3/4 loading {result.model_dir} with mlflow.pyfunc.load_model and scoring 3 validation images")
    model = mlflow.pyfunc.load_model(str(result.model_dir))
    lines = [json.loads(line) for line in Path(data.validation_jsonl).read_text().splitlines()][:3]
    paths = [Path(data.validation_jsonl).parent / line["image_url"] for line in lines]
    frame = pd.DataFrame({"image": [base64.encodebytes(p.read_bytes()).decode("utf-8") for p in paths]})
    responses = model.predict(frame)

    print("4/4 done")
    print(f"\nvalidation metrics (best epoch {result.best_epoch}):")
    for name, value in result.best_metrics.items():
        if "/" not in name:
            print(f"  {name:<24} {value:.4f}")
    print(f"\nMLflow model folder: {result.model_dir}")
    print(f"  serve it:  uv run mlflow models serve -m {result.model_dir} --env-manager local -p 5001")
    print(f"  settings:  {result.model_dir / 'artifacts' / 'settings.json'}")
    print(f"\nsample response for {paths[0].name} (true label: {json.dumps(lines[0]['label'])[:200]}):")
    print(json.dumps(responses[0], indent=2)[:2000])
    print(f"\ntotal {time.perf_counter() - started:.0f}s (training {result.seconds:.0f}s)")
    return {"result": result, "responses": responses, "labels": [line["label"] for line in lines]}
