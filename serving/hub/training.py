"""One hub training, from a registered dataset to a registered MLflow model, within a compute budget.

It runs in a Ray actor of its own (`serving.hub.runs`), on any node: it tells the hub where it is and hears a
`:cancel` through a Progress (that actor), reads its dataset from the image root, logs and registers through the
tracking store, and returns the model's final fields: `status`, `error` ({code, message}: the API's
`notEnoughBudget`, `datasetCorrupt`, `datasetNotFound`, `diverged`, `unknown`), `trainingCostInMinutes`, `modelPerformance`.
The hub picks the architecture and hyperparameters itself: a sweep on Ray Tune over the AutoMode
architectures whose pretrained weights are at hand, cheapest first, one trial at a time, stopping once a
trial is perfect on the held-out split or the budget is spent (a tiny dataset ends in minutes).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import mlflow
import ray

from models.data.coco_files import CocoDataset, CocoProblems, few_images_problems, read_coco_files, to_jsonl_lines
from models.data.formats import TRAINING_LIMITS
from models.data.images import image_size
from models.errors import DataError
from models.job import build_job
from models.data.records import Record
from models.sweep.run import SweepResult, run_job
from models.sweep.search_space import FEW_SHOT
from models.sweep.settings import parse_sweep
from models.tasks.architectures import get_architecture
from models.tasks.performance import model_performance
from models.tasks.registry import get_task
from models.train import weights
from models.train.loop import TrainingJob
from serving.hub.model_request import DATASET_KIND, KIND_TASK
from serving.loading import ModelFolder
from serving.predictor import Predictor
from serving.scoring import Scoring

EXPERIMENT = "visionserve-hub"  # the MLflow experiment of every hub training (its artifacts in --state-dir)
HOURS_PER_IMAGE = {"image_classification": 0.0003334, "image_object_detection": 0.0066667}  # the spec's minimum
CANDIDATES = {"image_classification": ("mobilenetv2", "resnet18", "resnet34", "resnet50"),
              "image_object_detection": ("fasterrcnn_resnet18_fpn", "fasterrcnn_resnet34_fpn",
                                         "fasterrcnn_resnet50_fpn")}
MAX_TRIALS = 3
RUN_TAG = "visionserve.hub.run"  # on a version the hub registered: the run (the record's `_run`) that did


class Progress(Protocol):
    """What a training is handed to talk with the hub (serving.hub.runs: its actor)."""

    def report(self, **values: Any) -> None:
        """Where the training is now (`status`, `message`): each report replaces the one before."""

    # True once the hub asked it to stop (`:cancel`, or the hub stopping): its sweep then ends its trials and gives
    # back their CPUs. A callable that pickles (Tune keeps its stoppers with the experiment's state).
    stopped: Callable[[], bool]


class Failed(Exception):
    """The training ends `failed` with this API error code and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def tracking_server(tracking_uri: str) -> bool:
    """An MLflow tracking server (it makes its own store and keeps the artifacts where it says), not a store of
    files or a database that this process opens itself."""
    return tracking_uri.startswith(("http://", "https://"))


def ready_experiment(tracking_uri: str, artifacts: Path) -> None:
    """The hub's experiment in its tracking store, made if missing; a store of its own keeps its artifacts in
    `artifacts` (beside the hub's state), a tracking server where it says (proxied: every node reaches them)."""
    client = mlflow.MlflowClient(tracking_uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT, artifact_location=None if tracking_server(tracking_uri)
                                 else artifacts.as_uri())


def minimum_budget(task: str, images: int) -> float:
    """The smallest timeBudgetInHours the cloud accepted for this many training images."""
    return HOURS_PER_IMAGE[task] * images


def check_budget(task: str, images: int, budget: float) -> None:
    low = minimum_budget(task, images)
    if budget < low:
        suggested = math.ceil(low * 2 * 1000) / 1000
        raise Failed("notEnoughBudget", f"timeBudgetInHours={budget:g} is below the minimum for {images} training "
                     f"images ({low:.4f} h: {HOURS_PER_IMAGE[task]} h per image); a budget of {suggested:g} h or "
                     "more is suggested")


def split(records: list, seed: int = 0) -> tuple[list, list]:
    """About a fifth of the images held out, at least one of each class (classification) where a class has two."""
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for r in records:
        by_label.setdefault(r.label_names()[0] if r.label_names() else "", []).append(r)
    train, held = [], []
    for group in by_label.values():
        group = group[:]
        rng.shuffle(group)
        cut = max(1, round(len(group) / 5)) if len(group) >= 2 else 0
        held += group[:cut]
        train += group[cut:]
    return train, held


def _at_hand(task: str, per_class: int) -> list[dict[str, Any]]:
    """The trial configurations: AutoMode's architectures whose pretrained weights are cached or can be
    downloaded, cheapest first; a linear head on frozen features when a class has few images."""
    family = get_task(task).family
    configs, reasons = [], []
    for name in CANDIDATES[task]:
        arch = get_architecture(name, family)
        try:
            weights.available(weights.resolve(arch, "DEFAULT"))
        except weights.WeightsError as exc:
            reasons.append(str(exc))
            continue
        config = {"model_name": name}
        if per_class < FEW_SHOT:
            config["layers_to_freeze"] = len(arch.freeze_groups)
        configs.append(config)
        if len(configs) == MAX_TRIALS:
            break
    if not configs:
        raise Failed("unknown", "no pretrained weights are at hand for any architecture the hub trains: "
                     + " | ".join(reasons[:2]))
    return configs


def _sizes(task: str, records: list) -> dict[str, Any]:
    """Input sizes from the data: detectors at the images' own scale up to torchvision's 600 px."""
    if task == "image_classification":
        return {}
    shorter = sorted(min(image_size(r.image)) for r in records[:50])
    side = max(64, min(600, shorter[len(shorter) // 2]))
    return {"min_size": side, "max_size": max(side, min(1000, 2 * side))}


def _performance(folder: Any, records: list) -> dict[str, Any]:
    """modelPerformance of the exported model (a serving.loading.ModelFolder) on `records` (the held-out split or a
    test dataset)."""
    ms = folder.model_settings
    scoring = Scoring(Predictor.load(folder, limits=TRAINING_LIMITS))  # the images a dataset may hold
    return model_performance(ms.task.name, records, scoring.score_files([r.image for r in records]), ms.labels)


def evaluate(folder: Any, dataset: dict[str, Any] | None, name: str, image_root: str | None) -> dict[str, Any]:
    """modelPerformance of an exported model (a serving.loading.ModelFolder) on a registered dataset (a test dataset
    or an evaluation)."""
    task, labels = folder.model_settings.task.name, folder.model_settings.labels
    if dataset is None:
        raise Failed("datasetNotFound", f"dataset {name!r} is not registered")
    try:
        coco = read_coco_files(dataset["annotationFileUris"], dataset["annotationKind"], image_root=image_root,
                               confined=True)
    except CocoProblems as exc:
        raise Failed("datasetCorrupt", str(exc)) from None
    if KIND_TASK[DATASET_KIND[coco.kind]] != task:
        raise Failed("incorrectModelKind", f"dataset {name} is {coco.kind}; the model is {task}")
    if not coco.records:
        raise Failed("datasetEmpty", f"dataset {name} has no images")
    unknown = sorted(set(coco.labels) - set(labels))
    if unknown:
        raise Failed("datasetAnnotationsInvalid", f"dataset {name} has categories the model does not know: "
                     f"{', '.join(unknown[:10])}")
    return _performance(folder, coco.records)


def evaluate_task(model_uri: str, dataset: dict[str, Any] | None, name: str, image_root: str | None,
                  tracking_uri: str) -> dict[str, Any]:
    """An evaluation (run in a Ray task): → its final fields."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        performance = evaluate(ModelFolder.open(model_uri), dataset, name, image_root)
    except Failed as exc:
        return {"status": "failed", "error": {"code": exc.code, "message": exc.message}}
    return {"status": "succeeded", "modelPerformance": performance}


def register(run_id: str, model: str, run: str, tags: dict[str, str]) -> Any:
    """The run's model registered as a new version of `model`, tagged in the same call (with RUN_TAG: `run`), so
    that a hub restarted after a crash finds what its run registered (serving.hub.jobs.Jobs.recover)."""
    return mlflow.register_model(f"runs:/{run_id}/mlflow-model", model, tags={**tags, RUN_TAG: run})


def train_model(order: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """The whole training (run in an actor of its own, serving.hub.runs): → the model's final fields."""
    job_dir = Path(order["job_dir"])
    started = time.time()
    progress.report(status="training")
    try:
        fields = _train(order, job_dir, started, progress)
    except Failed as exc:
        fields = {"status": "failed", "error": {"code": exc.code, "message": exc.message}}
    except DataError as exc:  # an image the COCO files name cannot be trained on
        fields = {"status": "failed", "error": {"code": "datasetCorrupt", "message": str(exc)}}
    except Exception as exc:  # noqa: BLE001  (reported on the model, with the log for details)

        logging.getLogger(__name__).exception("training %s failed", order["model"])
        fields = {"status": "failed", "error": {"code": "unknown", "message": f"{type(exc).__name__}: {exc}"}}
    spent = (time.time() - started) / 60  # one trial at a time: wall minutes are the compute spent
    fields["trainingCostInMinutes"] = round(min(spent, order["budget_hours"] * 60), 4)
    return fields


def _train(order: dict[str, Any], job_dir: Path, started: float, progress: Progress) -> dict[str, Any]:
    task = KIND_TASK[order["kind"]]
    coco = _dataset(order, task)
    train, held = split(coco.records)
    check_budget(task, len(train), order["budget_hours"])
    job = _sweep_job(order, task, coco, train, held, job_dir, started)
    mlflow.set_tracking_uri(order["tracking_uri"])

    def report(message: str) -> None:
        progress.report(status="training", message=message[:500])

    # its trials run where this runs: they read the data just written to this node's disk
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001, **order.get("resources", {})}
    try:
        result = run_job(job, report=report, should_stop=progress.stopped, trial_resources=here)
    except RuntimeError as exc:  # no trial finished an evaluation: each lost its loss or ran out of budget
        if progress.stopped():
            raise Failed("cancelled", "cancelled") from None
        raise Failed("diverged", str(exc)) from None
    if progress.stopped():
        raise Failed("cancelled", "cancelled")
    metric = result.best.get("metric")
    chance = 1 / len(coco.labels) if task == "image_classification" else 0.0
    if metric is None or not math.isfinite(metric) or (len(held) >= 10 and metric <= chance):
        raise Failed("diverged", f"the best trial's {get_task(task).primary_metric} is {metric} on {len(held)} held-out "
                     f"images, no better than chance ({chance:.3g})")
    return _publish(order, task, coco.labels, result, held, started)


def _dataset(order: dict[str, Any], task: str) -> CocoDataset:
    """The order's registered dataset read (confined to the image root) and checked against its modelKind."""
    dataset = order.get("dataset")
    if dataset is None:
        raise Failed("datasetNotFound", f"dataset {order['dataset_name']!r} is not registered")
    try:
        coco = read_coco_files(dataset["annotationFileUris"], dataset["annotationKind"], image_root=order["image_root"],
                               confined=True)
    except CocoProblems as exc:
        raise Failed("datasetCorrupt", str(exc)) from None
    if KIND_TASK[DATASET_KIND[coco.kind]] != task:
        raise Failed("datasetCorrupt", f"modelKind {order['kind']} needs an imageObjectDetection dataset"
                     if task == "image_object_detection" else
                     f"modelKind {order['kind']} needs an imageClassification dataset")
    few = few_images_problems(coco)
    if few:
        raise Failed("datasetCorrupt", "; ".join(few))
    return coco


def _sweep_job(order: dict[str, Any], task: str, coco: CocoDataset, train: list[Record], held: list[Record],
               job_dir: Path, started: float) -> TrainingJob:
    """The training job: the split written as JSONL on this node, a grid over the configurations at hand, the
    time left of the budget as the sweep's timeout."""
    lines = {id(r): line for r, line in zip(coco.records, to_jsonl_lines(coco))}  # two image ids may name one file
    job_dir.mkdir(parents=True, exist_ok=True)  # on the node this runs on (the hub made it on its own)
    for name, records in (("train", train), ("validation", held)):
        (job_dir / f"{name}.jsonl").write_text("".join(json.dumps(lines[id(r)]) + "\n" for r in records))
    per_class = min(Counter(n for r in train for n in set(r.label_names())).values(), default=0)
    configs = _at_hand(task, per_class)
    params = {"number_of_epochs": 15, "early_stopping": 1, "early_stopping_patience": 3, "seed": 0,
              **_sizes(task, train)}
    if task == "image_classification":
        params |= {"training_batch_size": 16, "validation_batch_size": 16}
    budget_minutes = order["budget_hours"] * 60 - (time.time() - started) / 60
    doc = {"limits": {"max_trials": len(configs), "max_concurrent_trials": 1, "timeout_minutes": budget_minutes,
                      "exit_score": 1.0},
           "sweep": {"sampling_algorithm": "grid"},
           "search_space": [{k: {"type": "choice", "values": [v]} for k, v in c.items()} for c in configs]}
    job = build_job(task=task, training_data=job_dir / "train.jsonl", validation_data=job_dir / "validation.jsonl",
                    params=params, output_dir=job_dir / "outputs", experiment_name=EXPERIMENT,
                    run_name=order["model"])
    return replace(job, sweep=parse_sweep(doc, get_task(task)), min_images=2)  # the spec's few-shot minimum


def _publish(order: dict[str, Any], task: str, labels: list[str], result: SweepResult, held: list[Record],
             started: float) -> dict[str, Any]:
    """The best trial's model evaluated (on the test dataset where the order names one, else the held-out split)
    and registered with the cloud's tags; the job's outcome."""
    folder = ModelFolder.open(result.model_dir)
    if order.get("test_dataset_name"):  # evaluationParameters.testDatasetName: its performance, not the split's
        performance = evaluate(folder, order.get("test_dataset"), order["test_dataset_name"], order["image_root"])
    else:
        performance = _performance(folder, held)
    client = mlflow.MlflowClient()
    tags = {"modelKind": order["kind"], "trainingDatasetName": order["dataset"]["name"],
            "timeBudgetInHours": str(order["budget_hours"]), "visionserve.hub": "1",
            "trainingCostInMinutes": f"{(time.time() - started) / 60:.4f}",
            "modelPerformance": json.dumps(performance)}
    version = register(result.run_id, order["model"], order["run"], tags)
    for key, value in performance.items():
        if isinstance(value, (int, float)):
            client.log_metric(result.run_id, f"hub_{key}", float(value))
    return {"status": "succeeded", "modelPerformance": performance, "modelVersion": version.version,
            "modelUri": f"models:/{order['model']}/{version.version}", "architecture": result.best["params"],
            "task": task, "labels": labels}
