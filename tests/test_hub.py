"""`visionserve hub` over HTTP on a real Ray Serve app: the cloud's published Python sample client and raw REST
calls register COCO datasets, train a classifier and a detector side by side, predict, evaluate, cancel and
delete; every error code the API names; a restart on the same state; AutoML `/score` bodies by header; a
model registered from `visionserve train`; three models through a cache of two."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serve_on_free_port, tracking_at
from postgres import Postgres

pytestmark = pytest.mark.slow
KEY = "hub-test-key"
# Ray Serve's throughput-optimized mode buffers replica log lines (1000): written at once, the tests read them
LOG_EACH_REQUEST = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}
V = {"api-version": "2023-04-01-preview"}
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _png(colour: tuple[int, int, int], size=(96, 72), box: tuple[int, int, int, int] | None = None,
         seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(128, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    if box is None:
        pixels[:] = np.clip(pixels * 0.3 + np.array(colour) * 0.7, 0, 255).astype(np.uint8)
    else:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def write_coco(folder: Path, kind: str, per_class: int = 3, *, bad_box: bool = False, bad_image: bool = False) -> Path:
    """A COCO file with absolute_url image paths: solid-ish colours (classification) or one coloured square per
    image (detection, relative [left, top, width, height])."""
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(COLOURS)]
    for c, (name, colour) in enumerate(COLOURS.items()):
        for k in range(per_class):
            image_id = len(images) + 1
            box = (10 + 4 * k, 12, 50 + 4 * k, 52) if kind == "imageObjectDetection" else None
            path = folder / f"{name}-{k}.png"
            path.write_bytes(_png(colour, box=box, seed=image_id))
            images.append({"id": image_id, "width": 96, "height": 72, "file_name": path.name,
                           "absolute_url": str(path)})
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": c + 1}
            if box is not None:
                ann["bbox"] = [box[0] / 96, box[1] / 72, (box[2] - box[0]) / 96, (box[3] - box[1]) / 72]
            annotations.append(ann)
    if bad_box:
        annotations[0]["bbox"] = [0.8, 0.1, 0.5, 0.2]
    if bad_image:
        (folder / images[0]["file_name"]).write_bytes(b"not an image at all")
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def hub(ray_session, tmp_path_factory):
    """A hub on the session's Ray instance: API key, image root, a model cache of 2 per replica; its records in
    PostgreSQL and two ingress replicas, so the sample client's flow alternates between them."""
    from ray import serve

    from serving.hub.app import build_hub

    root = tmp_path_factory.mktemp("hub")
    key_file = root / "key"
    key_file.write_text(KEY)
    with Postgres() as state_db, serve_on_free_port() as url:
        config = {"state_dir": str(root / "state"), "state_db": state_db, "image_root": str(root),
                  "api_key_file": str(key_file), "cache_size": 2, "model_cpus": 0.3, "max_concurrent_trainings": 2,
                  "ingress_replicas": 2, "env": LOG_EACH_REQUEST}

        def deploy():
            serve.run(build_hub(config), name="hub", route_prefix="/")

        deploy()
        yield {"url": url, "root": root, "deploy": deploy}


def _client(url: str):
    return httpx.Client(base_url=url, headers={"Ocp-Apim-Subscription-Key": KEY}, timeout=120, params=V)


def _free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0)


def _until(done, timeout: float, every: float = 0.5) -> bool:
    """Polls `done()` until it is true or `timeout` seconds have passed; → its last answer."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(every)
    return done()


def _wait(client: httpx.Client, path: str, done=("succeeded", "failed", "cancelled"), timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = client.get(path).json()
        if record["status"] in done:
            return record
        time.sleep(2)
    raise AssertionError(f"{path} still {record['status']} after {timeout} s")


@pytest.fixture(scope="module")
def datasets(hub):
    root = hub["root"]
    return {"cls": write_coco(root / "cls", "imageClassification"),
            "det": write_coco(root / "det", "imageObjectDetection"),
            "badbox": write_coco(root / "badbox", "imageObjectDetection", bad_box=True),
            "bad": write_coco(root / "bad", "imageObjectDetection", bad_image=True)}


@pytest.fixture(scope="module")
def registered(hub, datasets):
    """The classification and detection datasets, registered through the cloud's sample client."""
    from cognitive_service_vision_model_customization_python_samples import (
        AnnotationKind, Dataset, DatasetClient, ResourceType,
    )

    client = DatasetClient(ResourceType.MULTI_SERVICE_RESOURCE, None, hub["url"], KEY)
    for name, kind in (("cls", AnnotationKind.MULTICLASS_CLASSIFICATION), ("det", AnnotationKind.OBJECT_DETECTION)):
        answer = client.register_dataset(Dataset(name, kind, [str(datasets[name])]))
        assert answer.name == name and answer.annotation_kind == kind
        assert client.query_dataset(name).annotation_file_uris == [str(datasets[name])]
    return datasets


@pytest.fixture(scope="module")
def trained_pair(hub, registered):
    """A classifier and a detector trained side by side through the cloud's sample client."""
    from cognitive_service_vision_model_customization_python_samples import (
        Model, ModelKind, ResourceType, TrainingClient, TrainingParameters,
    )

    training = TrainingClient(ResourceType.MULTI_SERVICE_RESOURCE, None, hub["url"], KEY)
    started = time.time()
    training.train_model(Model("classifier", TrainingParameters("cls", 0.1, ModelKind.GENERIC_IC)))
    training.train_model(Model("detector", TrainingParameters("det", 0.2, ModelKind.GENERIC_OD)))
    models = {name: training.wait_for_training_completion(name, check_wait_in_secs=2)
              for name in ("classifier", "detector")}
    return models, time.time() - started


def test_the_sample_client_trains_a_classifier_and_a_detector_side_by_side(trained_pair):
    from cognitive_service_vision_model_customization_python_samples import ModelStatus

    models, seconds = trained_pair
    for name, model in models.items():
        assert model.status == ModelStatus.SUCCEEDED, (name, model.error)
        assert 0 < model.training_cost_in_minutes <= seconds / 60 + 1
    classifier = models["classifier"].model_performance
    assert set(classifier) >= {"accuracyTop1", "accuracyTop5", "averagePrecision", "calibrationECE", "tagPerformance"}
    assert set(classifier["tagPerformance"]) == {"red", "blue"}
    detector = models["detector"].model_performance
    assert {"meanAveragePrecision30", "meanAveragePrecision50", "meanAveragePrecision75"} <= set(detector)


def answered_by(ray, app: str, needle: str, total: int = 0) -> dict[str, int]:
    """How many requests whose log line holds `needle` (a path, a request id) each HubService replica of the
    Serve application `app` answered, by the replicas' own logs (serving.edge logs one line per request, as the
    request ends: after its answer went out, so up to 10 s are given for `total` lines to be written)."""
    folder = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.monotonic() + 10
    while True:
        counts = {}
        for log in folder.glob(f"replica_{app}_HubService_*.log"):
            lines = [line for line in log.read_text(errors="replace").splitlines() if "request_id=" in line]
            counts[log.stem.rsplit("_", 1)[1]] = sum(needle in line for line in lines)
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return {replica: n for replica, n in counts.items() if n}
        time.sleep(0.2)


def test_the_sample_clients_flow_alternated_between_the_two_ingress_replicas(ray_session, trained_pair):
    """Registration, training and the polls the sample client made reached both replicas, which answered them
    from the same PostgreSQL records (a poll that reached the other replica saw the same model)."""
    by_replica = answered_by(ray_session, "hub", "/computervision/models/classifier")
    assert len(by_replica) == 2, by_replica


def test_the_hub_trains_from_the_cached_pretrained_weights_with_the_backbone_frozen(hub, trained_pair):
    """Few images per tag (3 here): each trial is a new head on the pretrained backbone, every group frozen."""
    import mlflow

    from models.tasks.architectures import get_architecture

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{hub['root'] / 'state' / 'mlflow.db'}")
    for name, family in (("classifier", "classification"), ("detector", "detection")):
        version = client.search_model_versions(f"name='{name}'")[0]
        best = client.get_run(version.run_id).data.tags["best_trial_run_id"]  # the version's run is the sweep's
        run = client.get_run(best).data
        params, arch = run.params, get_architecture(run.tags["model_name"], family)
        assert params["weights"] == "DEFAULT", (name, params["weights"])
        assert int(params["layers_to_freeze"]) == len(arch.freeze_groups) > 0, name


def test_the_sample_client_predicts_with_both_models(hub, trained_pair, datasets):
    from cognitive_service_vision_model_customization_python_samples import PredictionClient, ResourceType

    prediction = PredictionClient(ResourceType.MULTI_SERVICE_RESOURCE, None, hub["url"], KEY)
    image = (datasets["cls"].parent / "red-0.png").read_bytes()
    tags = prediction.predict("classifier", image, content_type="image/png")["customModelResult"]["tagsResult"]
    values = tags["values"]
    assert {v["name"] for v in values} == {"red", "blue"}
    assert [v["confidence"] for v in values] == sorted((v["confidence"] for v in values), reverse=True)
    answer = prediction.predict("detector", (datasets["det"].parent / "blue-1.png").read_bytes(), "image/png")
    assert answer["metadata"] == {"width": 96, "height": 72}
    for i, obj in enumerate(answer["customModelResult"]["objectsResult"]["values"], start=1):
        assert obj["id"] == str(i) and set(obj["boundingBox"]) == {"x", "y", "w", "h"}
        assert all(isinstance(v, int) for v in obj["boundingBox"].values())
        assert obj["tags"][0]["name"] in COLOURS


def test_an_image_url_under_the_image_root_is_analyzed_and_one_outside_is_refused(hub, trained_pair, datasets):
    with _client(hub["url"]) as client:
        inside = client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": "classifier"},
                             json={"url": str(datasets["cls"].parent / "blue-0.png")})
        assert inside.status_code == 200 and "tagsResult" in inside.json()["customModelResult"]
        outside = client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": "classifier"},
                              json={"url": "file:///etc/passwd"})
        assert outside.status_code == 400 and outside.json()["error"]["code"] == "InvalidImageUrl"


def test_an_evaluation_reports_model_performance_on_a_test_dataset(hub, trained_pair, datasets):
    from cognitive_service_vision_model_customization_python_samples import (
        Evaluation, EvaluationStatus, ResourceType, TrainingClient,
    )

    training = TrainingClient(ResourceType.MULTI_SERVICE_RESOURCE, None, hub["url"], KEY)
    training.evaluate_model(Evaluation("eval1", "classifier", "cls"))
    evaluation = training.wait_for_evaluation_completion("classifier", "eval1", check_wait_in_secs=2)
    assert evaluation.status == EvaluationStatus.SUCCEEDED
    assert 0 <= evaluation.model_performance["accuracyTop1"] <= 1
    with _client(hub["url"]) as client:
        listed = client.get("/computervision/models/classifier/evaluations").json()["value"]
        assert [e["name"] for e in listed] == ["eval1"]
        assert client.delete("/computervision/models/classifier/evaluations/eval1").status_code == 204


def test_score_bodies_are_answered_by_the_model_the_header_names(hub, trained_pair, datasets):
    import base64

    image = base64.b64encode((datasets["cls"].parent / "red-1.png").read_bytes()).decode()
    body = {"input_data": {"columns": ["image"], "data": [image]}}
    with _client(hub["url"]) as client:
        by_header = client.post("/score", json=body, headers={"azureml-model-deployment": "classifier"})
        by_query = client.post("/score", json=body, params={"model": "classifier"})
        assert by_header.status_code == 200 and by_header.json() == by_query.json()
        assert set(by_header.json()[0]) == {"probs", "labels"}
        unnamed = client.post("/score", json=body)
        assert unnamed.status_code == 400 and "azureml-model-deployment" in unnamed.json()["error"]["message"]
        unknown = client.post("/score", json=body, headers={"azureml-model-deployment": "nope"})
        assert unknown.status_code == 404


def test_a_model_registered_from_visionserve_train_is_served_by_name(hub, trained):
    import base64

    import mlflow

    result, data = trained("image_classification")
    with tracking_at(f"sqlite:///{hub['root'] / 'state' / 'mlflow.db'}"):
        mlflow.register_model(str(result.model_dir), "from-train")
    image = base64.b64encode(next(Path(data.images_dir).iterdir()).read_bytes()).decode()
    with _client(hub["url"]) as client:
        answer = client.post("/score", json={"input_data": {"columns": ["image"], "data": [image]}},
                             headers={"azureml-model-deployment": "from-train"})
        assert answer.status_code == 200 and answer.json()[0]["labels"] == result.labels
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listed["from-train"]["status"] == "succeeded" and listed["from-train"]["source"] == "registry"
        assert listed["classifier"]["task"] == "image_classification"


def test_error_codes_of_the_api(hub, datasets):
    with _client(hub["url"]) as client:
        put = lambda path, body: client.put(path, json=body)  # noqa: E731
        assert put("/computervision/datasets/bad", {"annotationKind": "imageObjectDetection",
                                                    "annotationFileUris": [str(datasets["bad"])]}).status_code == 201
        again = put("/computervision/datasets/bad", {"annotationKind": "imageObjectDetection",
                                                     "annotationFileUris": [str(datasets["bad"])]})
        assert again.status_code == 409 and again.headers["x-ms-error-code"] == "DatasetAlreadyExists"
        bad_box = put("/computervision/datasets/badbox", {"annotationKind": "imageObjectDetection",
                                                          "annotationFileUris": [str(datasets["badbox"])]})
        assert bad_box.status_code == 400 and bad_box.json()["error"]["code"] == "DatasetInvalidAnnotationUri"
        assert "annotation 1" in bad_box.json()["error"]["message"]  # the box past the right edge, by its id
        missing_file = put("/computervision/datasets/nofile", {"annotationKind": "imageClassification",
                                                               "annotationFileUris": [str(hub["root"] / "no.json")]})
        assert missing_file.status_code == 400 and missing_file.json()["error"]["code"] == "DatasetInvalidAnnotationUri"
        assert client.get("/computervision/datasets/nope").status_code == 404
        bad_name = put("/computervision/datasets/-bad name", {"annotationKind": "imageClassification",
                                                              "annotationFileUris": ["x"]})
        assert bad_name.status_code == 400
        cases = {"corrupt": ("bad", 0.5, "datasetCorrupt"), "nodata": ("nope", 0.5, "datasetNotFound"),
                 "poor": ("det", 0.0001, "notEnoughBudget")}
        for model, (dataset, budget, _) in cases.items():
            created = put(f"/computervision/models/{model}", {"trainingParameters": {
                "trainingDatasetName": dataset, "timeBudgetInHours": budget, "modelKind": "Generic-Detector"}})
            assert created.status_code == 201 and created.json()["status"] == "notStarted"
        for model, (_, _, code) in cases.items():
            record = _wait(client, f"/computervision/models/{model}")
            assert record["status"] == "failed" and record["error"]["code"] == code, record
        assert "image 1" in client.get("/computervision/models/corrupt").json()["error"]["message"]
        poor = client.get("/computervision/models/poor").json()["error"]["message"]
        assert "minimum" in poor and "suggested" in poor
        no_model = client.post("/computervision/imageanalysis:analyze", content=b"x")
        assert no_model.status_code == 400 and no_model.json()["error"]["message"].startswith("Either 'features' or")
        assert client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": "ghost"},
                           content=b"x").status_code == 404
        assert client.get("/computervision/models", params={"api-version": "1999-01-01"}).status_code == 400


def test_a_model_no_better_than_chance_on_its_held_out_images_fails_diverged(hub):
    """The same picture, half of its copies tagged red and half blue: every prediction is the same, so exactly
    half of the 10 held-out images are right, chance for two tags. 19 training images per tag (a frozen backbone
    under the few-shot rule) and a budget just over the minimum: the budget ends the sweep, and the best trial so
    far is judged (72 s here; 139 s with 52 images and 0.05 h)."""
    folder = hub["root"] / "chance"
    folder.mkdir()
    (folder / "same.png").write_bytes(_png(COLOURS["red"], seed=7))
    images = [{"id": i + 1, "width": 96, "height": 72, "file_name": "same.png", "absolute_url": str(folder / "same.png")}
              for i in range(48)]
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2} for i in range(48)]
    coco = folder / "annotations.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}))
    with _client(hub["url"]) as client:
        assert client.put("/computervision/datasets/chance", json={
            "annotationKind": "imageClassification", "annotationFileUris": [str(coco)]}).status_code == 201
        assert client.put("/computervision/models/chance", json={"trainingParameters": {
            "trainingDatasetName": "chance", "timeBudgetInHours": 0.015,
            "modelKind": "Generic-Classifier"}}).status_code == 201
        record = _wait(client, "/computervision/models/chance")
    assert record["status"] == "failed" and record["error"]["code"] == "diverged", record["error"]
    assert "no better than chance" in record["error"]["message"]


def test_a_training_with_no_pretrained_weights_at_hand_fails_unknown_saying_so(hub, datasets, tmp_path, monkeypatch):
    """`unknown`, the code for what the API names no other way: here every architecture the hub trains lacks
    its pretrained weights, offline (the session's VISIONSERVE_OFFLINE=1) with an empty torch cache."""
    from serving.hub.training import train_model

    class Reports:  # a training.Progress that keeps what the training says and never asks it to stop
        def __init__(self) -> None:
            self.reports: list[dict] = []

        def report(self, **values) -> None:
            self.reports.append(values)

        def stopped(self) -> bool:  # (the Protocol's attribute, a callable)
            return False

    progress = Reports()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with tracking_at(os.environ["MLFLOW_TRACKING_URI"]):  # train_model sets its own, as a hub's actor does
        fields = train_model({
            "model": "nothing", "dataset_name": "cls", "kind": "Generic-Classifier", "budget_hours": 0.1,
            "dataset": {"name": "cls", "annotationKind": "imageClassification",
                        "annotationFileUris": [str(datasets["cls"])]},
            "image_root": str(hub["root"]), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "job_dir": str(tmp_path / "job"), "test_dataset_name": None}, progress)
    assert progress.reports[0] == {"status": "training"}  # it said it had started before it failed
    assert fields["status"] == "failed" and fields["error"]["code"] == "unknown", fields
    message = fields["error"]["message"]
    assert "no pretrained weights are at hand" in message and str(tmp_path / "empty-cache") in message


def test_keys_in_any_case_trailing_commas_repeated_slashes_paging_and_etags(hub, datasets):
    with _client(hub["url"]) as client:
        body = ('{"AnnotationKind": "imageClassification", "AnnotationFileUris": ["%s"],}' % datasets["cls"])
        for i in range(3):
            created = client.put(f"{hub['url']}//computervision//datasets/page{i}", content=body,  # slashes kept
                                 headers={"content-type": "application/json-patch+json"})
            assert created.status_code == 201, created.text
        first = client.get("/computervision/datasets", params={**V, "top": 2}).json()
        assert len(first["value"]) == 2 and "nextLink" in first
        rest = httpx.get(first["nextLink"], headers={"Ocp-Apim-Subscription-Key": KEY}).json()
        assert rest["value"] and not {d["name"] for d in rest["value"]} & {d["name"] for d in first["value"]}
        tag = client.get("/computervision/datasets/page0").json()["eTag"]
        stale = client.patch("/computervision/datasets/page0", json={"customProperties": {"a": "b"}},
                             headers={"If-Match": '"stale"'})
        assert stale.status_code == 412
        fresh = client.patch("/computervision/datasets/page0", json={"customProperties": {"a": "b"}},
                             headers={"If-Match": tag})
        assert fresh.status_code == 200 and fresh.json()["customProperties"] == {"a": "b"} and fresh.json()["eTag"] != tag
        assert client.delete("/computervision/datasets/page0").status_code == 204


def test_every_call_needs_the_key_in_either_header(hub):
    assert httpx.get(f"{hub['url']}/computervision/datasets", params=V).status_code == 401
    bearer = httpx.get(f"{hub['url']}/computervision/datasets", params=V, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    assert httpx.get(f"{hub['url']}/health/live").status_code == 200


def test_the_unkeyed_readiness_probe_reads_and_tells_nothing_of_the_models(hub):
    assert httpx.get(f"{hub['url']}/health/ready").json() == {"status": "ready"}


def test_cancel_stops_the_training_and_frees_its_cpus(hub, registered):
    free_before = _free_cpus()
    with _client(hub["url"]) as client:
        client.put("/computervision/models/tocancel", json={"trainingParameters": {
            "trainingDatasetName": "cls", "timeBudgetInHours": 1, "modelKind": "Generic-Classifier"}})

        def holding() -> bool:  # its sweep runs a trial that holds a CPU, as its own report says
            said = client.get("/models/tocancel/progress").json()
            return said["status"] == "training" and "sweep:" in (said["message"] or "") and \
                _free_cpus() <= free_before - 0.99

        assert _until(holding, 300), "the training never ran a trial"
        cancelled = client.post("/computervision/models/tocancel:cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] in ("cancelling", "cancelled")
        assert _wait(client, "/computervision/models/tocancel", timeout=120)["status"] == "cancelled"
        assert _until(lambda: _free_cpus() >= free_before - 0.01, 60)  # the trial's CPU is free again
        assert client.delete("/computervision/models/tocancel").status_code == 204


def test_three_models_through_a_cache_of_two_all_answer(hub, trained_pair, trained, datasets):
    """Round robin over classifier, detector and from-train with 2 models per replica: reloads, no failures."""
    images = {"classifier": (datasets["cls"].parent / "red-0.png").read_bytes(),
              "detector": (datasets["det"].parent / "red-0.png").read_bytes(),
              "from-train": (datasets["cls"].parent / "blue-0.png").read_bytes()}
    with _client(hub["url"]) as client:
        for _ in range(3):
            for name, image in images.items():
                answer = client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": name},
                                     content=image, headers={"content-type": "image/png"})
                assert answer.status_code == 200, (name, answer.text)
        cache = client.get("/models").json()["cache"]
    assert cache["size"] == 2 and cache["memory_mb"] is None
    [replica] = cache["replicas"]
    assert len(replica["loads"]) > 3  # 3 models, 2 places: evicted and loaded again
    assert {load.split("/")[0] for load in replica["loads"]} == set(images)
    assert len(replica["models"]) == 2 and replica["budget_mb"] is None


def test_a_memory_budget_evicts_by_what_models_hold_and_models_shows_it(hub, trained_pair, datasets):
    """A second hub on the first one's registry, 3 models per replica but a budget of 1 MB: each load evicts the
    other model (the count cap never does here), and GET /models shows each resident's footprint and load time."""
    from ray import serve

    from serving.hub.app import build_hub

    root = hub["root"] / "memory"
    serve.run(build_hub({"state_dir": str(root), "tracking_uri": f"sqlite:///{hub['root'] / 'state' / 'mlflow.db'}",
                         "api_key_file": str(hub["root"] / "key"), "cache_size": 3, "model_memory_mb": 1,
                         "model_cpus": 0.3}), name="memory-hub", route_prefix="/memory")
    images = {"classifier": (datasets["cls"].parent / "red-0.png").read_bytes(),
              "detector": (datasets["det"].parent / "red-0.png").read_bytes()}
    try:
        with _client(f"{hub['url']}/memory") as client:
            for name in ("classifier", "detector", "classifier"):
                answer = client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": name},
                                     content=images[name], headers={"content-type": "image/png"})
                assert answer.status_code == 200, (name, answer.text)
                cache = client.get("/models").json()["cache"]
                [replica] = cache["replicas"]
                [resident] = replica["models"]  # the one just called: the other was evicted for memory
                assert resident["model"].split("/")[0] == name
                assert resident["footprint_mb"] > 1 and resident["load_s"] > 0
                assert replica["used_mb"] == resident["footprint_mb"] and replica["budget_mb"] == 1
        assert [load.split("/")[0] for load in replica["loads"]] == ["classifier", "detector", "classifier"]
        assert cache["memory_mb"] == 1 and cache["size"] == 3
    finally:
        serve.delete("memory-hub")


def test_a_restart_keeps_everything_and_fails_what_was_training(hub, trained_pair, datasets):
    from ray import serve

    with _client(hub["url"]) as client:
        before = client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": "classifier"},
                             content=(datasets["cls"].parent / "red-2.png").read_bytes()).json()
        idle = _free_cpus()
        client.put("/computervision/models/interrupted", json={"trainingParameters": {
            "trainingDatasetName": "cls", "timeBudgetInHours": 1}})
        assert _until(lambda: _free_cpus() <= idle - 0.5, 300), (  # its trial holds a CPU
            client.get("/models/interrupted/progress").json())
        serve.delete("hub")
        hub["deploy"]()
        assert _until(lambda: _free_cpus() >= idle - 1e-3, 60)  # the stopped hub's training gave its CPU back
        after = client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": "classifier"},
                            content=(datasets["cls"].parent / "red-2.png").read_bytes()).json()
        assert after == before
        interrupted = client.get("/computervision/models/interrupted").json()
        assert interrupted["status"] == "failed" and "restarted" in interrupted["error"]["message"]
        assert interrupted["trainingParameters"]["modelKind"] == "Generic-Classifier"
        assert client.get("/computervision/datasets/cls").status_code == 200
