"""The hub as a hostile or careless client with a valid key meets it, over HTTP on a real Ray Serve app: a corpus
of bad requests over every route, each a 4xx in the API's format (never a 500, a traceback or a path of the
server) with the hub answering a good request afterwards; quotas refused before anything is written; a burst of
trainings queued behind the configured number and cancelled cleanly, their CPUs given back; racing creates of one
name. Its records are in a real PostgreSQL (--state-db), so that every rule here holds on the clusters' store too
(tests/test_hub.py keeps the embedded SQLite)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import serve_on_free_port
from postgres import Postgres
from serving.hub.state import Store
from test_hub import KEY, LOG_EACH_REQUEST, V, _png, answered_by, write_coco

pytestmark = pytest.mark.slow
QUOTAS = {"datasets": 4, "models": 11, "waiting_trainings": 9}


@pytest.fixture(scope="module")
def hub(ray_session, tmp_path_factory):
    """A hub allowed one training at a time, with small quotas, its records in PostgreSQL, two ingress replicas
    answering (any request may reach either)."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "key").write_text(KEY)
    with Postgres() as state_db, serve_on_free_port() as url:
        yield from _hub_on(root, url, state_db)


def _hub_on(root, url: str, state_db: str):
    from ray import serve

    from serving.hub.app import build_hub

    serve.run(build_hub({"state_dir": str(root / "state"), "state_db": state_db, "image_root": str(root),
                         "api_key_file": str(root / "key"), "model_cpus": 0.3, "max_concurrent_trainings": 1,
                         "quotas": QUOTAS, "ingress_replicas": 2, "env": LOG_EACH_REQUEST}), name="hostile-hub", route_prefix="/")
    with httpx.Client(base_url=url, headers={"Ocp-Apim-Subscription-Key": KEY}, params=V, timeout=120) as client:
        coco = write_coco(root / "cls", "imageClassification")
        assert client.put("/computervision/datasets/cls", json={
            "annotationKind": "imageClassification", "annotationFileUris": [str(coco)]}).status_code == 201
        (root / "pic.png").write_bytes(_png((220, 30, 30)))
        yield {"client": client, "root": root, "state_db": state_db}


N = "a" * 256  # one character over the name rule
CORPUS = [  # (method, path, extra query, headers, body, status, code)
    ("PUT", "/computervision/datasets/..", {}, {}, {}, 404, None),
    ("PUT", f"/computervision/datasets/{N}", {}, {}, {"annotationKind": "imageClassification"}, 400, "InvalidArgument"),
    ("PUT", "/computervision/datasets/x%00y", {}, {}, {}, 400, "InvalidArgument"),
    ("PUT", "/computervision/datasets/-x", {}, {}, {}, 400, "InvalidArgument"),
    ("PUT", "/computervision/datasets/ok", {}, {}, b"{not json", 400, "InvalidRequest"),
    ("PUT", "/computervision/datasets/ok", {}, {}, b"1" * 5000, 400, "InvalidRequest"),
    ("PUT", "/computervision/datasets/ok", {}, {}, b"[]", 400, "InvalidRequest"),
    ("PUT", "/computervision/datasets/ok", {}, {}, {"annotationKind": ["x"]}, 400, "InvalidArgument"),
    ("PUT", "/computervision/datasets/ok", {}, {}, {"annotationKind": "imageClassification",
                                                     "annotationFileUris": "a.json"}, 400, "InvalidArgument"),
    ("PUT", "/computervision/datasets/ok", {}, {}, {"annotationKind": "imageClassification",
                                                     "annotationFileUris": ["/etc/passwd"]}, 400,
     "DatasetInvalidAnnotationUri"),
    ("PUT", "/computervision/datasets/ok", {}, {}, {"annotationKind": "imageClassification",
                                                     "annotationFileUris": ["gopher://x/a.json"]}, 400,
     "DatasetInvalidAnnotationUri"),
    ("PUT", "/computervision/datasets/ok", {}, {}, {"annotationKind": "imageClassification",
                                                     "annotationFileUris": ["../../etc/passwd"]}, 400,
     "DatasetInvalidAnnotationUri"),
    ("PUT", "/computervision/datasets/ok", {}, {}, {"annotationKind": "imageClassification",
                                                     "annotationFileUris": ["x"] * 11}, 400, "InvalidArgument"),
    ("PUT", "/computervision/datasets/ok", {}, {}, {"annotationKind": "imageClassification",
                                                     "annotationFileUris": ["a.json"], "customProperties": [1]},
     400, "InvalidArgument"),
    ("PUT", "/computervision/datasets/ok", {}, {}, b"{" + b" " * (2 << 20) + b"}", 413, "InvalidRequest"),
    ("PATCH", "/computervision/datasets/cls", {}, {}, {"annotationFileUris": ["/etc/passwd"]}, 400,
     "DatasetInvalidAnnotationUri"),
    ("PATCH", "/computervision/datasets/cls", {}, {"if-match": '"stale"'}, {"customProperties": {"a": "b"}}, 412,
     "PreconditionFailed"),
    ("PATCH", "/computervision/datasets/ghost", {}, {}, {"customProperties": {"a": "b"}}, 404, "NotFound"),
    ("GET", "/computervision/datasets/ghost", {}, {}, None, 404, "NotFound"),
    ("GET", "/computervision/datasets", {"top": "x"}, {}, None, 400, None),
    ("GET", "/computervision/datasets", {"skip": "-1"}, {}, None, 400, None),
    ("DELETE", "/computervision/datasets/ghost", {}, {}, None, 404, "NotFound"),
    ("PUT", "/computervision/models/m1", {}, {}, {"trainingParameters": {
        "trainingDatasetName": "../datasets/cls", "timeBudgetInHours": 1}}, 400, "InvalidArgument"),
    ("PUT", "/computervision/models/m1", {}, {}, {"trainingParameters": {
        "trainingDatasetName": "cls", "timeBudgetInHours": "1"}}, 400, "InvalidArgument"),
    ("PUT", "/computervision/models/m1", {}, {}, {"trainingParameters": {
        "trainingDatasetName": "cls", "timeBudgetInHours": 1e308}}, 400, "InvalidArgument"),
    ("PUT", "/computervision/models/m1", {}, {}, {"trainingParameters": {
        "trainingDatasetName": "cls", "timeBudgetInHours": 1, "modelKind": ["x"]}}, 400, "InvalidArgument"),
    ("PUT", "/computervision/models/m1", {}, {}, {"trainingParameters": {
        "trainingDatasetName": "cls", "timeBudgetInHours": 1}, "evaluationParameters": {
        "testDatasetName": "a\x00b"}}, 400, "InvalidArgument"),
    ("PUT", "/computervision/models/m1", {}, {}, {"trainingParameters": []}, 400, "InvalidArgument"),
    ("PUT", "/computervision/models/m1", {}, {}, {}, 400, "InvalidArgument"),
    ("GET", "/computervision/models/ghost", {}, {}, None, 404, "NotFound"),
    ("POST", "/computervision/models/ghost:cancel", {}, {}, None, 404, "NotFound"),
    ("DELETE", "/computervision/models/ghost", {}, {}, None, 404, "NotFound"),
    ("PUT", "/computervision/models/ghost/evaluations/e1", {}, {}, {"evaluationParameters": {
        "testDatasetName": "cls"}}, 404, "modelNotFound"),
    ("PUT", "/computervision/models/ghost/evaluations/e1", {}, {}, {}, 400, "InvalidArgument"),
    ("GET", "/computervision/models/ghost/evaluations", {}, {}, None, 404, "modelNotFound"),
    ("GET", "/computervision/models/ghost/evaluations/e1", {}, {}, None, 404, "NotFound"),
    ("POST", "/computervision/imageanalysis:analyze", {"model-name": "../x"}, {}, b"x", 400, "InvalidArgument"),
    ("POST", "/computervision/imageanalysis:analyze", {"model-name": "ghost"}, {}, b"x", 404, None),
    ("POST", "/computervision/imageanalysis:analyze", {"model-name": "ghost"},
     {"content-type": "application/json"}, {"url": "file:///etc/passwd"}, 404, None),
    ("POST", "/score", {}, {"azureml-model-deployment": "../../x"}, {"input_data": {"columns": ["image"],
                                                                                   "data": ["x"]}}, 400, None),
    ("POST", "/score", {"model": "a" * 300}, {}, b"{}", 400, None),
    ("POST", "/score", {}, {}, b"{}", 400, None),
    ("POST", "/invocations", {"model": "ghost"}, {}, b"{}", 404, None),
    ("GET", "/models/../metadata", {}, {}, None, 404, None),
    ("GET", f"/models/{N}/metadata", {}, {}, None, 400, "InvalidArgument"),
    ("GET", "/models/ghost/progress", {}, {}, None, 404, "NotFound"),
    ("GET", "/datasets/ghost/contents", {}, {}, None, 404, "NotFound"),
    ("GET", "/datasets/cls/images/-1", {}, {}, None, 400, "InvalidArgument"),
    ("GET", "/datasets/cls/images/abc", {}, {}, None, 400, None),
    ("GET", "/image", {"url": "/etc/passwd"}, {}, None, 400, None),
    ("GET", "/image", {"url": "gopher://x/y.png"}, {}, None, 400, None),
    ("GET", "/computervision/datasets", {"api-version": "1999-01-01"}, {}, None, 400, None),
    ("DELETE", "/computervision/datasets", {}, {}, None, 405, "MethodNotAllowed"),
]


def _ask(client: httpx.Client, method: str, path: str, query: dict, headers: dict, body) -> httpx.Response:
    params = {**V, **query}
    if isinstance(body, (dict, list)):
        return client.request(method, path, params=params, headers=headers, json=body)
    return client.request(method, path, params=params, headers=headers, content=body)


@pytest.mark.parametrize("method, path, query, headers, body, status, code", CORPUS,
                         ids=[f"{c[0]} {c[1][:40]} {i}" for i, c in enumerate(CORPUS)])
def test_a_hostile_request_is_a_4xx_in_the_api_format_and_the_hub_answers_after_it(
        hub, method, path, query, headers, body, status, code):
    answer = _ask(hub["client"], method, path, query, headers, body)
    assert answer.status_code == status, (answer.status_code, answer.text[:500])
    error = answer.json()["error"]
    assert code is None or error["code"] == code, error
    if path not in ("/score", "/invocations") or "x-ms-error-code" in answer.headers:  # the AutoML bodies'
        assert error["code"] == answer.headers["x-ms-error-code"], error            # format has no header
    text = answer.text
    assert "Traceback" not in text and str(hub["root"]) not in text and "site-packages" not in text, text
    assert hub["client"].get("/computervision/datasets/cls").status_code == 200


def test_the_corpus_covers_at_least_forty_requests_over_every_route():
    routes = {(m, p.split("?")[0].rsplit("/", 1)[0] if p.startswith("/computervision/") else p.split("/")[1])
              for m, p, *_ in CORPUS}
    assert len(CORPUS) >= 40 and len(routes) >= 15


def _status(client: httpx.Client, name: str) -> str:
    return client.get(f"/computervision/models/{name}").json()["status"]


def test_a_burst_of_trainings_runs_one_at_a_time_the_rest_queued_then_cancelled_cleanly(hub, ray_session):
    client, names = hub["client"], [f"burst{i}" for i in range(10)]
    free_before = ray_session.available_resources().get("CPU", 0)
    body = {"trainingParameters": {"trainingDatasetName": "cls", "timeBudgetInHours": 1,
                                   "modelKind": "Generic-Classifier"}}
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda n: client.put(f"/computervision/models/{n}", json=body), names))
    assert [a.status_code for a in answers] == [201] * 10
    assert all(a.json()["status"] == "notStarted" for a in answers)
    over = client.put("/computervision/models/burst10", json=body)  # 1 running + 9 waiting: the queue is full
    assert over.status_code == 429 and over.headers["x-ms-error-code"] == "TooManyRequests"
    assert over.headers["retry-after"] and "--max-waiting-trainings" in over.json()["error"]["message"]
    assert client.get("/computervision/models/burst10").status_code == 404  # refused: nothing written

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "training" not in [_status(client, n) for n in names]:
        time.sleep(1)
    statuses = [_status(client, n) for n in names]
    assert statuses.count("training") == 1 and statuses.count("notStarted") == 9, statuses
    assert statuses.index("training") == 0 or answers[statuses.index("training")].json()["createdDateTime"] <= min(
        a.json()["createdDateTime"] for a in answers)  # the first one asked for

    for name in reversed(names):  # the waiting ones first: each is cancelled at once, nothing started
        cancelled = client.post(f"/computervision/models/{name}:cancel")
        assert cancelled.status_code == 202
    waiting = [n for n, s in zip(names, statuses) if s == "notStarted"]
    assert all(_status(client, n) == "cancelled" for n in waiting)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and any(_status(client, n) != "cancelled" for n in names):
        time.sleep(1)
    assert [_status(client, n) for n in names] == ["cancelled"] * 10
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ray_session.available_resources().get("CPU", 0) < free_before - 0.01:
        time.sleep(1)
    assert ray_session.available_resources().get("CPU", 0) >= free_before - 0.01  # every CPU given back
    for name in names:
        assert client.delete(f"/computervision/models/{name}").status_code == 204
    again = client.put("/computervision/models/burst0", json=body)  # the name is free again
    assert again.status_code == 201
    assert client.post("/computervision/models/burst0:cancel").status_code == 202
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and _status(client, "burst0") != "cancelled":
        time.sleep(1)
    assert client.delete("/computervision/models/burst0").status_code == 204


def test_quotas_are_refused_naming_the_flag_before_anything_is_written(hub):
    client, root = hub["client"], hub["root"]
    coco = str(write_coco(root / "more", "imageClassification"))
    kept = len(client.get("/computervision/datasets").json()["value"])
    for i in range(QUOTAS["datasets"] - kept):
        assert client.put(f"/computervision/datasets/more{i}", json={
            "annotationKind": "imageClassification", "annotationFileUris": [coco]}).status_code == 201
    over = client.put("/computervision/datasets/over", json={"annotationKind": "imageClassification",
                                                              "annotationFileUris": [coco]})
    assert over.status_code == 400 and over.json()["error"]["code"] == "QuotaExceeded"
    assert "--max-datasets" in over.json()["error"]["message"]
    assert client.get("/computervision/datasets/over").status_code == 404
    for i in range(QUOTAS["datasets"] - kept):
        assert client.delete(f"/computervision/datasets/more{i}").status_code == 204


def test_an_evaluation_of_an_unknown_model_writes_nothing(hub):
    client = hub["client"]
    answer = client.put("/computervision/models/ghost/evaluations/e1",
                        json={"evaluationParameters": {"testDatasetName": "cls"}})
    assert answer.status_code == 404
    records = Store(hub["root"] / "reader", hub["state_db"])
    assert records.count("evaluations", "ghost") == 0 and records.get("models", "ghost") is None
    assert json.loads(client.get("/health/ready").text)["status"] == "ready"


def test_of_eight_puts_of_one_name_at_once_over_two_ingress_replicas_exactly_one_creates_it(hub, ray_session):
    client, coco = hub["client"], str(write_coco(hub["root"] / "raced", "imageClassification"))
    body = {"annotationKind": "imageClassification", "annotationFileUris": [coco]}
    ids = [f"race{n}" for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.put("/computervision/datasets/raced", json=body,
                                                     headers={"x-request-id": i}), ids))
    assert sorted(a.status_code for a in answers) == [201] + [409] * 7
    by_replica = answered_by(ray_session, "hostile-hub", "request_id=race", total=8)  # these 8 requests' lines
    assert len(by_replica) == 2 and sum(by_replica.values()) == 8, by_replica
    assert {a.headers["x-ms-error-code"] for a in answers if a.status_code == 409} == {"DatasetAlreadyExists"}
    assert [d["name"] for d in client.get("/computervision/datasets").json()["value"]].count("raced") == 1
    assert client.delete("/computervision/datasets/raced").status_code == 204
