"""`visionserve demo`: the whole path on synthetic data, sized for a laptop CPU (about 2 minutes on 2 cores)."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
from ray import serve

from models.data.synth import write_synthetic_dataset
from models.job import build_job
from models.runtime import cluster_address, ensure_ray, free_port
from models.train.loop import train
from serving.app import deployment, service_config

# CPU-sized recipes: small images, small models, torchvision's samplers trimmed. The demo trains from
# scratch (weights=none: it runs offline and downloads nothing; every other training starts from
# pretrained weights by default), so the classifier needs a couple of thousand images to learn shapes
# rather than backgrounds: about 2 minutes on a 2-core CPU.
APP = "visionserve-demo"  # the Serve application the demo deploys
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
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def run_demo(out: Path, *, task: str = "image_classification", images: int | None = None,
             epochs: int | None = None, keep_serving: bool = False, port: int | None = None) -> dict[str, Any]:
    """Synthetic data → training → the MLflow model → served on a local port through the same scoring core as
    `visionserve serve`, scored and (classifiers) explained over HTTP; stops after (`keep_serving`: until Ctrl-C)."""
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
    print(f"\nvalidation metrics (best epoch {result.best_epoch}):")
    for name, value in result.best_metrics.items():
        if "/" not in name:
            print(f"  {name:<24} {value:.4f}")

    line = json.loads(Path(data.validation_jsonl).read_text().splitlines()[0])
    image = Path(data.validation_jsonl).parent / line["image_url"]
    print(f"3/4 serving {result.model_dir} on a local port (Ray Serve, as `visionserve serve` does)")
    calls = _serve_and_call(result.model_dir, image, out, keep_serving=keep_serving, port=port)
    print(f"\nsample response for {image.name} (true label: {json.dumps(line['label'])[:200]}):")
    print(json.dumps(calls["response"], indent=2)[:2000])
    print(f"\nMLflow model folder: {result.model_dir}")
    print(f"  settings:  {result.model_dir / 'artifacts' / 'settings.json'}")
    print(f"  serve it:  uv run visionserve serve {result.model_dir}")
    print(f"\ntotal {time.perf_counter() - started:.0f}s (training {result.seconds:.0f}s)")
    return {"result": result, **calls, "label": line["label"]}


def _request_body(image: Path, explain: bool) -> dict[str, Any]:
    encoded = base64.b64encode(image.read_bytes()).decode("ascii")
    entry = json.dumps({"image_base64": encoded, "model_explainability": True,
                        "xai_parameters": {"xai_algorithm": "xrai", "n_steps": 20}}) if explain else encoded
    return {"input_data": {"columns": ["image"], "data": [entry]}}


def _serve_and_call(model_dir: Path, image: Path, out: Path, *, keep_serving: bool, port: int | None) -> dict:
    """The model served on 127.0.0.1:`port` (a free one by default); one image scored over HTTP and, for a
    classifier, explained (its picture written to `out`); the studio's URL and a curl line printed."""
    ensure_ray(log_to_driver=False)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        config = service_config(model_dir)
        serve.run(deployment(config, ray_actor_options={"num_cpus": 1}), name=APP, route_prefix="/")
        request = out / "request.json"
        request.write_text(json.dumps(_request_body(image, explain=False)))
        print(f"4/4 scoring {image.name} over HTTP: POST {url}/score")
        response = httpx.post(f"{url}/score", content=request.read_bytes(), timeout=120).json()[0]
        explained = _explain(url, image, out) if "probs" in response else None
        print(f"\nstudio (try and explain the model in a browser): {url}/studio")
        print(f"the same request with curl:  curl -s -X POST {url}/score -H 'Content-Type: application/json' "
              f"-d @{request}")
        if keep_serving:
            print(f"serving at {url} until Ctrl-C", flush=True)
            _wait_for_interrupt()
    finally:
        _stop(APP)
    return {"response": response, "explanation": explained, "url": url}


def _stop(app: str) -> None:
    """The demo's app gone from a cluster it joined (whose other apps are not its own); a local Ray instance it
    started, stopped whole (serve.shutdown first would make Ray print a failed-task warning at the end)."""
    import ray

    if cluster_address():
        serve.delete(app)
    else:
        ray.shutdown()


def _explain(url: str, image: Path, out: Path) -> dict[str, Any]:
    print(f"   and explaining it (xrai): POST {url}/score with model_explainability: true")
    answer = httpx.post(f"{url}/score", json=_request_body(image, explain=True), timeout=300).json()[0]
    picture = out / "explanation.png"
    picture.write_bytes(base64.b64decode(answer["visualizations"]))
    print(f"   explanation: {picture} (the image, the attribution map and its overlays)")
    return {key: value for key, value in answer.items() if key != "visualizations"}


def _wait_for_interrupt() -> None:
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
