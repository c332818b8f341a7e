"""Shared fixtures: an MLflow store per test session, tiny synthetic datasets and tiny trained
models, each made once and reused."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from models.runtime import free_port  # noqa: F401  (the tests' too)
from weights_cache import cache_dirs

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Processes the tests start that join the session's Ray instance (batch scoring, the CLI) run in this very
# environment: under `uv run`, Ray would otherwise build a fresh one from a copy of the working directory for
# every worker they start (models.runtime disables that only for the local instance it starts itself).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Pretrained weights come only from this session's own caches (torch hub, Hugging Face), which
# `pretrained_cache` fills with random values; the real caches and the network are never used.
WEIGHTS_CACHE = Path(tempfile.mkdtemp(prefix="visionserve-weights-"))
os.environ.update({**cache_dirs(WEIGHTS_CACHE), "VISIONSERVE_OFFLINE": "1"})
# Every Ray instance of the session (this process's and those the CLI tests start) keeps its logs and spilled
# objects under one folder that goes when the session ends; Ray itself never removes /tmp/ray/session_*.
RAY_TMPDIR = Path(os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="vs-ray-")))

TASKS = ("image_classification", "image_classification_multilabel", "image_object_detection",
         "image_instance_segmentation")

# Small, fast, and trained long enough to memorise 12 images, so answers are known. The classifiers start
# from the (random) "pretrained" resnet18 of the session's cache; the detectors from scratch, whose
# BatchNorm learns (pretrained detectors keep theirs frozen, which random statistics would not suit).
_DETECTION = {"weights": "none", "min_size": 96, "max_size": 128, "box_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 400,
              "rpn_post_nms_top_n_train": 200, "training_batch_size": 4, "validation_batch_size": 4,
              "learning_rate": 0.01, "warmup_cosine_lr_warmup_epochs": 1, "evaluation_frequency": 25}
_CLASSIFICATION = {"model_name": "resnet18", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
                   "training_batch_size": 6, "validation_batch_size": 12, "learning_rate": 0.01,
                   "warmup_cosine_lr_warmup_epochs": 1, "evaluation_frequency": 5}
RECIPES = {
    "image_classification": {**_CLASSIFICATION, "number_of_epochs": 20},
    "image_classification_multilabel": {**_CLASSIFICATION, "number_of_epochs": 20},
    "image_object_detection": {**_DETECTION, "model_name": "fasterrcnn_resnet18_fpn", "number_of_epochs": 25},
    "image_instance_segmentation": {**_DETECTION, "model_name": "maskrcnn_resnet18_fpn", "number_of_epochs": 25,
                                    "learning_rate": 0.005},
}
NO_AUGMENT = '{"apply_automl_train_augmentations": false}'
IMAGE_SIZE = (128, 96)  # not square, so a swapped width/height shows


# What the tests train by default: resnet18 (also the detectors' resnet18 backbone) and mobilenetv2.
DEFAULT_CACHED = ("ResNet18_Weights.IMAGENET1K_V1", "MobileNet_V2_Weights.IMAGENET1K_V2")


@pytest.fixture(scope="session", autouse=True)
def pretrained_cache():
    """The session's weights caches with freshly initialised networks under the pretrained files' names."""
    from weights_cache import put_torchvision

    for name in DEFAULT_CACHED:
        put_torchvision(name)
    yield WEIGHTS_CACHE
    shutil.rmtree(WEIGHTS_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def ray_files_removed():
    """The session's Ray folder goes once its Ray instance has stopped (a folder someone set is kept)."""
    yield
    if RAY_TMPDIR.name.startswith("vs-ray-"):
        if "ray" in sys.modules:
            import ray

            ray.shutdown()
        shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def mlflow_uri(tmp_path_factory) -> str:
    """The session's SQLite MLflow store (nothing is created until something logs)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@contextlib.contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """MLflow's tracking URI set to `uri` (another store: a hub's) for a while, then the one before it again.
    mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, so the one before is read first: restored from the
    environment, the session's later trainings would log into that other store (and ./mlruns of the checkout)."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


@contextlib.contextmanager
def serve_on_free_port() -> Iterator[str]:
    """Ray Serve listening on a free port of 127.0.0.1 (→ its base URL) until the block ends, also when a deploy in
    it failed: the replicas that did start would otherwise hold their CPUs for the rest of the session (and each
    later module would fail ray_cpus_given_back for it)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()  # the next module starts Serve on a port of its own


@pytest.fixture(scope="session", autouse=True)
def tracking(mlflow_uri, tmp_path_factory) -> str:
    """The store with its experiments made, their artifacts in the session's temp folder (for every test:
    an experiment a training makes itself keeps its artifacts in MLflow's default, ./mlruns of the working
    directory, here the checkout)."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    root = tmp_path_factory.mktemp("mlflow-artifacts")
    for name in ("visionserve", "tests"):
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=(root / name).as_uri())
    return mlflow_uri


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """`synth(task, images=..., size=..., seed=...)` → SynthSummary, each dataset written once."""
    from models.data.synth import write_synthetic_dataset

    cache: dict = {}

    def make(task: str, images: int = 12, size: tuple[int, int] = IMAGE_SIZE, seed: int = 0,
             validation_fraction: float = 0.25):
        key = (task, images, size, seed, validation_fraction)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{task}-{images}")
            cache[key] = write_synthetic_dataset(task, folder, images, image_size=size, seed=seed,
                                                 validation_fraction=validation_fraction)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def trained(synth, tracking, tmp_path_factory):
    """`trained(task)` → TrainingResult of a tiny model that has memorised its 12 training images."""
    from models.job import build_job
    from models.train.loop import train

    cache: dict = {}

    def get(task: str):
        if task not in cache:
            data = synth(task, images=12, validation_fraction=0.0)
            params = {**RECIPES[task], "advanced_settings": NO_AUGMENT, "early_stopping": 0}
            job = build_job(task=task, training_data=data.train_jsonl, validation_data=data.train_jsonl,
                            params=params, output_dir=tmp_path_factory.mktemp(f"trained-{task}"),
                            experiment_name="tests")
            cache[task] = (train(job, progress=False, report=lambda _: None), data)
        return cache[task]

    return get


def run_pyfunc_in_new_process(model_dir: Path, images: list[str], tmp_path: Path) -> list[dict]:
    """Load the model folder with mlflow.pyfunc.load_model in a fresh interpreter and predict."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": str(model_dir), "images": images}))
    code = (
        "import json, sys, mlflow.pyfunc, pandas as pd\n"
        "req = json.load(open(sys.argv[1]))\n"
        "model = mlflow.pyfunc.load_model(req['model'])\n"
        "out = model.predict(pd.DataFrame({'image': req['images']}))\n"
        "json.dump(out, open(sys.argv[2], 'w'))\n"
    )
    response = tmp_path / "response.json"
    done = subprocess.run([sys.executable, "-c", code, str(request), str(response)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(response.read_text())


@pytest.fixture(scope="module", autouse=True)
def ray_cpus_given_back():
    """After each module every CPU of the session's Ray instance is free again. A module that leaves a
    placement group, a trial or a replica behind fails here, not a later one that waits for CPUs."""
    yield
    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 60
    while True:
        total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
        if free >= total - 1e-3:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{total - free:.3f} of the session's {total:g} Ray CPUs are still held 60 s after this "
                        "module's tests ended: something they started was not stopped")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (it takes ~15 s to start here)."""
    import ray

    from models.runtime import ensure_ray

    ensure_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


class _Cluster:
    """The session's two-node cluster: started by the first test that asks for it, stopped after the last one
    that does (not at the session's end: the rest of the suite runs without its processes)."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.running = None
        self.last_user = None  # the last collected test that uses it

    def start(self, weights: Path):
        from cluster import two_node_cluster

        started = time.monotonic()
        self.running = self.stack.enter_context(two_node_cluster(weights))
        self.running.start_seconds = round(time.monotonic() - started, 1)
        print(f"\ntwo-node cluster started in {self.running.start_seconds} s", file=sys.stderr)
        return self.running

    def stop(self) -> None:
        if self.running is not None:
            started = time.monotonic()
            self.stack.close()
            self.running = None
            print(f"\ntwo-node cluster stopped in {time.monotonic() - started:.1f} s", file=sys.stderr)


_CLUSTER = _Cluster()


@pytest.hookimpl(trylast=True)  # after -k and -m deselected what will not run
def pytest_collection_modifyitems(items):
    users = [item for item in items if "cluster" in getattr(item, "fixturenames", ())]
    _CLUSTER.last_user = users[-1] if users else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's own fixtures first (a server it started on the cluster)
    if item is _CLUSTER.last_user:
        _CLUSTER.stop()


@pytest.fixture(scope="session")
def cluster(pretrained_cache):
    """A two-node Ray cluster on this machine, the second node as if on another machine (a private /tmp), and an
    MLflow tracking server with proxied artifacts (tests/cluster.py); started once, stopped after the last test
    that uses it (also when a test fails)."""
    try:
        yield _CLUSTER.start(pretrained_cache)
    finally:
        _CLUSTER.stop()


@pytest.fixture(scope="session")
def cluster_model(cluster, trained) -> str:
    """The tiny classifier (`trained`, in a head-only folder) logged to the cluster's tracking server and
    registered there: → its URI, models:/vs-cluster/1."""
    import mlflow

    result, _ = trained("image_classification")
    with tracking_at(cluster.tracking_uri):
        mlflow.set_experiment("cluster")
        with mlflow.start_run(run_name="registered") as run:
            mlflow.log_artifacts(str(result.model_dir), "mlflow-model")
        version = mlflow.register_model(f"runs:/{run.info.run_id}/mlflow-model", "vs-cluster")
    return f"models:/vs-cluster/{version.version}"
