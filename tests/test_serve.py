"""The online endpoint: a real Ray Serve app over HTTP on 127.0.0.1, for every task."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import TASKS, serve_on_free_port

pytestmark = pytest.mark.slow

API_KEY = "s3cret-key-for-tests"
PREFIX = {"image_classification": "/cls", "image_classification_multilabel": "/ml",
          "image_object_detection": "/det", "image_instance_segmentation": "/seg"}


@pytest.fixture(scope="module")
def endpoint(ray_session, trained):
    """All four task models served by one Ray Serve instance, each under its own route prefix,
    plus `/secure` (API key, small limits), `/patient` (batches wait 3 s to fill, on eager torch), `/onnx` and
    `/int8` (the classifier on ONNX Runtime: its model.onnx, its model.int8.onnx) and `/tight` (capacity 1 + 1
    queued), `/lanes` (the detector on a replica of two threads: two batches side by side). `/cls` runs
    a compiled classifier (`backend: torch`; compiling takes a replica 10-25 s on 2 CPUs); the other classifier
    apps run the default backend."""
    from ray import serve

    from ray.serve.config import BackpressureConfig

    from serving.access import key_digest
    from serving.app import VisionService, service_config

    with serve_on_free_port() as url:
        small = {"ray_actor_options": {"num_cpus": 0.1}}
        cls_dir = trained("image_classification")[0].model_dir
        apps = [serve.RunTarget(VisionService.options(**small).bind(asdict(service_config(
            model=str(trained(task)[0].model_dir), max_batch_size=8, batch_wait_timeout_s=0.02,
            compile=task == "image_classification", backend="torch" if task == "image_classification" else "auto"))),
            name=task, route_prefix=PREFIX[task]) for task in TASKS]
        secure = service_config(model=str(cls_dir), api_key_sha256=key_digest(API_KEY), max_images_per_request=4,
                               max_concurrent_explanations=1, max_waiting_explanations=0, explanation_timeout_s=0.2,
                               compile=False)
        apps.append(serve.RunTarget(VisionService.options(**small).bind(asdict(secure)), name="secure",
                                    route_prefix="/secure"))
        patient = service_config(model=str(cls_dir), max_batch_size=4, batch_wait_timeout_s=3.0, compile=False,
                                backend="torch")
        apps.append(serve.RunTarget(VisionService.options(**small).bind(asdict(patient)), name="patient",
                                    route_prefix="/patient"))
        for name in ("onnx", "onnx-int8"):
            on_onnx = service_config(model=str(cls_dir), max_batch_size=8, backend=name)
            apps.append(serve.RunTarget(VisionService.options(**small).bind(asdict(on_onnx)), name=name,
                                        route_prefix=f"/{name.removeprefix('onnx-')}"))
        tight = service_config(model=str(cls_dir), max_batch_size=1, compile=False)
        apps.append(serve.RunTarget(VisionService.options(
            max_ongoing_requests=1, max_queued_requests=1, backpressure_config=BackpressureConfig(status_code=429,
                                                                                                 retry_after_s=2),
            **small).bind(asdict(tight)), name="tight", route_prefix="/tight"))
        two_threads = {"num_cpus": 0.1, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}
        det = service_config(model=str(trained("image_object_detection")[0].model_dir), max_batch_size=8)
        apps.append(serve.RunTarget(VisionService.options(ray_actor_options=two_threads).bind(asdict(det)),
                                    name="lanes", route_prefix="/lanes"))
        serve.run_many(apps)  # the replicas start side by side
        yield url


def _b64(path: Path) -> str:
    return base64.encodebytes(path.read_bytes()).decode("utf-8")


def _images(trained, task: str, n: int = 2) -> list[str]:
    data = trained(task)[1]
    lines = [json.loads(line) for line in Path(data.train_jsonl).read_text().splitlines()][:n]
    return [_b64(Path(data.train_jsonl).parent / line["image_url"]) for line in lines]


def _png(size, noise: bool = False) -> str:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) if noise else np.full((size[1], size[0], 3), 90,
                                                                                                  np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _score(url: str, rows, **kw) -> httpx.Response:
    return httpx.post(url, json={"input_data": {"columns": ["image"], "data": rows}}, timeout=120, **kw)


@pytest.mark.parametrize("task", TASKS)
def test_score_answers_the_spec_schema_for_every_task(endpoint, trained, task):
    response = _score(f"{endpoint}{PREFIX[task]}/score", _images(trained, task))
    assert response.status_code == 200, response.text
    answers = response.json()
    assert isinstance(answers, list) and len(answers) == 2
    if "classification" in task:
        assert all(set(a) == {"probs", "labels"} for a in answers)
    else:
        assert all(set(a) == {"boxes"} and a["boxes"] for a in answers)
        expected = {"box", "label", "score"} | ({"polygon"} if "segmentation" in task else set())
        assert all(set(b) == expected for a in answers for b in a["boxes"])
    assert response.headers.get("x-request-id")


@pytest.mark.parametrize("body", [
    lambda rows: {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}},
    lambda rows: {"dataframe_records": [{"image": r} for r in rows]},
    lambda rows: {"instances": rows},
    lambda rows: {"inputs": {"image": rows}},
], ids=["dataframe_split", "dataframe_records", "instances", "inputs"])
def test_invocations_accepts_every_mlflow_format(endpoint, trained, body):
    rows = _images(trained, "image_object_detection")
    response = httpx.post(f"{endpoint}/det/invocations", json=body(rows), timeout=120)
    assert response.status_code == 200, response.text
    assert [set(p) for p in response.json()["predictions"]] == [{"boxes"}, {"boxes"}]


def test_answers_of_the_compiled_classifier_match_the_pyfunc(endpoint, trained):
    from serving.predictor import Predictor
    from serving.scoring import Scoring

    assert httpx.get(f"{endpoint}/cls/metadata").json()["compiled"] is True
    assert httpx.get(f"{endpoint}/patient/metadata").json()["compiled"] is False
    rows = _images(trained, "image_classification", 3)
    served = _score(f"{endpoint}/cls/score", rows).json()
    local = Scoring(Predictor.load(trained("image_classification")[0].model_dir, backend="torch")).score_rows(rows)
    assert [a["labels"] for a in served] == [a["labels"] for a in local]
    assert np.allclose([a["probs"] for a in served], [a["probs"] for a in local], atol=1e-5)


def test_a_classifier_replica_on_onnx_runtime_answers_the_json_of_one_on_torch(endpoint, trained):
    from models.onnx_export import TOLERANCE

    assert httpx.get(f"{endpoint}/onnx/metadata").json()["backend"] == "onnx"
    assert httpx.get(f"{endpoint}/patient/metadata").json()["backend"] == "torch"
    rows = _images(trained, "image_classification", 3)
    on_onnx, on_torch = _score(f"{endpoint}/onnx/score", rows), _score(f"{endpoint}/patient/score", rows)
    assert on_onnx.status_code == on_torch.status_code == 200
    assert [sorted(a) for a in on_onnx.json()] == [sorted(a) for a in on_torch.json()]
    assert [a["labels"] for a in on_onnx.json()] == [a["labels"] for a in on_torch.json()]
    assert np.allclose([a["probs"] for a in on_onnx.json()], [a["probs"] for a in on_torch.json()], atol=TOLERANCE)


def test_a_classifier_replica_on_the_int8_backend_answers_and_its_metadata_says_what_int8_costs(endpoint, trained):
    from models.export import read_settings
    from models.int8_record import TOLERANCE

    record = read_settings(Path(trained("image_classification")[0].model_dir) / "artifacts" / "settings.json").int8
    described = httpx.get(f"{endpoint}/int8/metadata").json()
    assert (described["backend"], described["scoring_file"]) == ("onnx-int8", "model.int8.onnx")
    assert described["int8"] == {**record.document(), "tolerance": TOLERANCE}
    assert httpx.get(f"{endpoint}/onnx/metadata").json()["scoring_file"] == "model.onnx"
    rows = _images(trained, "image_classification", 3)
    on_int8, on_fp32 = _score(f"{endpoint}/int8/score", rows), _score(f"{endpoint}/onnx/score", rows)
    assert on_int8.status_code == on_fp32.status_code == 200, on_int8.text
    assert [sorted(a) for a in on_int8.json()] == [["labels", "probs"]] * 3
    assert [a["labels"] for a in on_int8.json()] == [a["labels"] for a in on_fp32.json()]
    difference = np.abs(np.array([a["probs"] for a in on_int8.json()]) - [a["probs"] for a in on_fp32.json()])
    assert 0 < difference.max() <= record.largest_score_difference + 0.01  # another network, as close as recorded


def test_32_concurrent_requests_each_get_their_own_answer(endpoint, trained):
    rows = _images(trained, "image_classification", 12)
    expected = [_score(f"{endpoint}/cls/score", [r]).json()[0]["probs"] for r in rows]
    jobs = [(i % len(rows), [rows[i % len(rows)], rows[(i + 1) % len(rows)]]) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda job: _score(f"{endpoint}/cls/score", job[1]), jobs))
    for (i, _), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert np.allclose(answer[0]["probs"], expected[i], atol=1e-5)
        assert np.allclose(answer[1]["probs"], expected[(i + 1) % len(rows)], atol=1e-5)


def test_batches_wait_to_fill_only_while_other_requests_are_in_progress(endpoint, trained):
    """Observed through the replica's own report (headers, /metadata), not through timing."""
    url = f"{endpoint}/patient/score"  # batch_wait_timeout_s 3 s, max_batch_size 4
    small = _images(trained, "image_classification", 1)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(4000, dtype=np.uint8), (4000, 1))[..., None].repeat(3, 2)).save(buffer, "JPEG")
    large = [base64.b64encode(buffer.getvalue()).decode()] * 12  # 4000x4000 each: seconds of decoding in all
    with httpx.Client(timeout=60) as client:
        alone = client.post(url, json={"input_data": {"columns": ["image"], "data": small}})
        assert alone.status_code == 200
        assert alone.headers["x-visionserve-batch-wait-ms"] == "0"  # alone: no wait for more images
        assert alone.headers["x-visionserve-batch-images"] == "1"
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client:
        first = pool.submit(_score, url, large)
        deadline = time.monotonic() + 30
        while client.get(f"{endpoint}/patient/metadata").json()["in_progress"]["scoring"] < 1:
            assert time.monotonic() < deadline and not first.done(), "the large request was never seen in progress"
            time.sleep(0.01)
        behind = client.post(url, json={"input_data": {"columns": ["image"], "data": small}})
        assert behind.status_code == 200
        assert first.result().status_code == 200
    assert behind.headers["x-visionserve-batch-wait-ms"] == "3000"  # behind another request: it waited to fill
    assert first.result().headers["x-visionserve-batch-images"] == "4"  # the large request filled whole batches


def test_per_request_params_apply_to_that_request(endpoint, trained):
    rows = _images(trained, "image_object_detection", 1)
    body = {"input_data": {"columns": ["image"], "data": rows}, "params": {"box_score_thresh": 0.01,
                                                                            "box_detections_per_img": 2}}
    capped = httpx.post(f"{endpoint}/det/score", json=body, timeout=120).json()
    assert len(capped[0]["boxes"]) == 2
    plain = _score(f"{endpoint}/det/score", rows).json()
    assert all(b["score"] >= 0.3 for b in plain[0]["boxes"])


def test_api_key_is_required_except_on_health_routes(endpoint, trained):
    rows = _images(trained, "image_classification", 1)
    url = f"{endpoint}/secure"
    assert _score(f"{url}/score", rows).status_code == 401
    wrong = _score(f"{url}/score", rows, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert API_KEY not in wrong.text
    assert _score(f"{url}/score", rows, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/health/live").status_code == 200
    assert httpx.get(f"{url}/health/ready").status_code == 200
    assert httpx.get(f"{url}/metadata").status_code == 401
    meta = httpx.get(f"{url}/metadata", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert meta["task"] == "image_classification" and meta["labels"] == trained("image_classification")[1].labels


def test_docs_show_every_route_body_and_per_request_parameter(endpoint):
    assert httpx.get(f"{endpoint}/cls/docs").status_code == 200
    doc = httpx.get(f"{endpoint}/cls/openapi.json").json()
    paths = {path.removeprefix("/cls"): spec for path, spec in doc["paths"].items()}
    schemas = doc["components"]["schemas"]
    for route, body in (("/score", "ScoreRequest"), ("/invocations", "InvocationsRequest")):
        content = paths[route]["post"]["requestBody"]["content"]["application/json"]
        assert content["schema"]["$ref"] == f"#/components/schemas/{body}"
        assert paths[route]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] == \
            "#/components/schemas/ErrorResponse"
    assert set(schemas["ScoreRequest"]["properties"]) == {"input_data", "params"}
    assert {r["$ref"].rsplit("/", 1)[1] for r in schemas["ScoreRequest"]["properties"]["params"]["anyOf"]} == {
        "ClassificationParams", "DetectionParams", "SegmentationParams"}
    assert set(schemas["InvocationsRequest"]["properties"]) == {"dataframe_split", "dataframe_records", "instances",
                                                                "inputs", "params"}
    detection = schemas["DetectionParams"]["properties"]
    assert detection["box_score_thresh"]["maximum"] == 1 and detection["box_score_thresh"]["minimum"] == 0
    assert "half_precision" not in detection  # set when the model loads, not per request
    assert {"tile_grid_size", "nms_iou_thresh", "min_size"} <= set(detection)
    assert {"mask_pixel_score_threshold", "image_type"} <= set(schemas["SegmentationParams"]["properties"])
    assert schemas["ClassificationParams"]["properties"]["valid_crop_size"]["minimum"] == 1
    assert schemas["ClassificationXaiParameters"]["properties"]["n_steps"]["maximum"] == 1000
    assert schemas["ExplanationEntry"]["required"] == ["image_base64"]


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, None),
    (b'{"data": []}', 422, "input_data"),
    (b'{"input_data": {"columns": ["img"], "data": ["x"]}}', 422, "input_data.columns"),
    (b'{"input_data": {"columns": ["image"], "data": "abc"}}', 422, "input_data.data"),
    (b'{"input_data": {"columns": ["image"], "data": []}}', 422, "input_data.data"),
    (b'[1, 2]', 422, "body"),
])
def test_malformed_bodies_are_refused_naming_the_field(endpoint, body, status, field):
    response = httpx.post(f"{endpoint}/cls/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert "Traceback" not in response.text and error["request_id"]
    if field:
        assert error["details"][0]["field"] == field


@pytest.mark.parametrize("bad, code", [
    ("not base64 ???", "invalid_base64"),
    (base64.b64encode(b"hello, not an image").decode(), "not_an_image"),
    (_png((30, 30)), "too_small"),
    (_png((16_001, 60)), "too_large"),
    (_png((1_600, 1_600), noise=True), "too_large"),  # about 7.7 MB: over the 6 MB per image
])
def test_bad_images_are_a_400_naming_the_image_index(endpoint, trained, bad, code):
    rows = _images(trained, "image_classification", 1)
    response = _score(f"{endpoint}/cls/score", [rows[0], bad])
    assert response.status_code == 400, response.text
    [detail] = response.json()["error"]["details"]
    assert (detail["field"], detail["index"], detail["code"]) == ("input_data.data[1]", 1, code)


def test_partial_true_scores_the_good_images_and_flags_the_bad_one(endpoint, trained):
    rows = _images(trained, "image_classification", 2)
    response = _score(f"{endpoint}/cls/score?partial=true", [rows[0], "garbage!!", rows[1]])
    assert response.status_code == 200
    answers = response.json()
    assert "probs" in answers[0] and "probs" in answers[2] and answers[1]["error"]["code"] == "invalid_base64"


def test_explanation_and_plain_entries_mixed_in_one_request(endpoint, trained):
    rows = _images(trained, "image_classification", 2)
    explain = json.dumps({"image_base64": rows[1], "model_explainability": True,
                          "xai_parameters": {"xai_algorithm": "integrated_gradients", "n_steps": 4,
                                             "attributions": True}})
    response = _score(f"{endpoint}/cls/score", [rows[0], explain, rows[1]])
    assert response.status_code == 200, response.text
    plain, explained, again = response.json()
    assert set(plain) == set(again) == {"probs", "labels"}
    assert set(explained) == {"probs", "labels", "visualizations", "attributions"}
    assert np.allclose(explained["probs"], again["probs"], atol=1e-4)
    assert Image.open(io.BytesIO(base64.b64decode(explained["visualizations"]))).format == "PNG"
    assert np.asarray(explained["attributions"]).shape == (3, 64, 64)
    bad = json.dumps({"image_base64": rows[0], "model_explainability": True, "xai_parameters": {"n_steps": 1}})
    refused = _score(f"{endpoint}/cls/score", [rows[0], bad])
    assert refused.status_code == 400 and refused.json()["error"]["details"][0]["field"] == \
        "input_data.data[1].xai_parameters.n_steps"
    detection = _score(f"{endpoint}/det/score", [json.dumps({"image_base64": _images(trained, "image_object_detection",
                                                                                       1)[0],
                                                             "model_explainability": True,
                                                             "xai_parameters": {"number_of_masks": 16}})])
    assert detection.status_code == 200, detection.text  # detectors explain with D-RISE (tests/test_drise_serving.py)
    assert detection.json()[0]["masks_used"] == 16 and detection.json()[0]["explained_boxes"]


def test_unknown_parameter_and_too_many_images_are_refused(endpoint, trained):
    rows = _images(trained, "image_classification", 1)
    body = {"input_data": {"columns": ["image"], "data": rows}, "params": {"box_score_thresh": 0.5}}
    response = httpx.post(f"{endpoint}/cls/score", json=body, timeout=60)
    assert response.status_code == 400 and "box_score_thresh: unknown parameter" in response.text
    many = _score(f"{endpoint}/secure/score", rows * 5, headers={"Authorization": f"Bearer {API_KEY}"})
    assert many.status_code == 413 and "at most 4" in many.text


def test_explanations_past_the_replica_limits_answer_429_and_504(endpoint, trained):
    """/secure explains one image at a time, none waiting, for at most 0.2 s."""
    explain = json.dumps({"image_base64": _images(trained, "image_classification", 1)[0], "model_explainability": True,
                          "xai_parameters": {"xai_algorithm": "xrai", "n_steps": 100}})
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: _score(f"{endpoint}/secure/score", [explain], headers=auth), range(4)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {429, 504}, [r.text for r in responses]
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "5" and rejected.json()["error"]["code"] == "too_many_explanations"
    late = next(r for r in responses if r.status_code == 504).json()["error"]
    assert late["code"] == "explanation_timeout" and "explanation_timeout_s" in late["message"]
    plain = _score(f"{endpoint}/secure/score", _images(trained, "image_classification", 1), headers=auth)
    assert plain.status_code == 200  # scoring goes on while the explanation thread finishes


def test_over_capacity_answers_429_with_retry_after(endpoint, trained):
    rows = _images(trained, "image_classification", 8)
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: _score(f"{endpoint}/tight/score", rows), range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers.get("retry-after") == "2"


def _exited(pid: int) -> bool:
    """Whether process `pid` (on this machine) has exited: gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_replica_killed_mid_load_is_replaced_by_a_new_one_and_no_request_hangs(endpoint, trained):
    import threading

    import ray

    rows = _images(trained, "image_classification_multilabel", 1)
    url = f"{endpoint}/ml/score"
    before = httpx.get(f"{endpoint}/ml/metadata", timeout=30).json()["replica"]
    replica_actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
                      if "image_classification_multilabel" in a["name"] and "VisionService" in a["name"]]
    assert len(replica_actors) == 1
    replica = ray.get_actor(replica_actors[0]["name"], namespace=replica_actors[0]["namespace"])
    pid = ray.get(replica.__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=60)
    outcomes: list[tuple[float, int | str, float]] = []  # (sent at, status or error, seconds)
    stop = threading.Event()

    def load() -> None:  # a client that keeps sending while the replica dies and comes back
        while not stop.is_set():
            started = time.monotonic()
            try:
                status: int | str = httpx.post(url, json={"input_data": {"columns": ["image"], "data": rows}},
                                                timeout=60).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            outcomes.append((started, status, time.monotonic() - started))
            time.sleep(0.1)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(load) for _ in range(3)]
        time.sleep(2)
        killed_at = time.monotonic()
        ray.kill(replica, no_restart=True)
        while not _exited(pid) and time.monotonic() < killed_at + 30:
            time.sleep(0.01)
        died_at = time.monotonic()  # the replica's process is gone (within ~10 ms)
        assert _exited(pid), "the killed replica's process is still running after 30 s"
        deadline = time.time() + 120
        after = before
        while time.time() < deadline and after == before:
            time.sleep(1)
            meta = httpx.get(f"{endpoint}/ml/metadata", timeout=30)
            after = meta.json()["replica"] if meta.status_code == 200 else before
        time.sleep(2)  # the new replica also serves the load for a moment
        stop.set()
        for future in futures:
            future.result()
    assert after != before, "no new replica answered within 120 s"
    before_kill = [status for sent, status, took in outcomes if sent + took < killed_at]
    assert before_kill and set(before_kill) == {200}
    # Every request is answered, 503/429 at worst, and none hangs: HAProxy tries a request that fails on the
    # dead replica (refused, or closed without an answer) again, in the end on the head node's Serve proxy,
    # which waits for the new replica (models.runtime.serve_environment). The exception: a request HAProxy
    # had already sent to the replica when its process died, or sent over a kept-alive connection to it
    # before noticing that the connection had closed with the process, can lose its connection (HAProxy
    # closes the client's connection without an answer, as a signal that the request may be retried).
    # So a lost connection only for a request sent before the process was gone or within 1 s after, and
    # lost when the process goes, not later.
    timeline = [(sent - died_at, status, took) for sent, status, took in sorted(outcomes)]  # sent: s after
    dropped = [(sent, status, took) for sent, status, took in timeline if status not in (200, 429, 503)]
    sent_after = [status for sent, status, _ in timeline if sent >= 0]
    print(f"process gone {died_at - killed_at:.2f} s after the kill; lost (sent, error, s): "
          f"{[(round(sent, 3), status, round(took, 3)) for sent, status, took in dropped]}; "
          f"sent after it: { {status: sent_after.count(status) for status in set(sent_after)} }")
    assert {status for _, status, _ in dropped} <= {"RemoteProtocolError", "ReadError"}, timeline
    assert all(sent < 1 and sent + took < 5 for sent, _, took in dropped), timeline
    sent_later = [status for sent, status, _ in timeline if sent >= 1]
    assert sent_later and set(sent_later) <= {200, 429, 503}, timeline
    assert sent_later[-1] == 200 and max(took for _, _, took in outcomes) < 60
    assert all(_score(url, rows).status_code == 200 for _ in range(3))


def test_a_short_headless_locust_run_against_the_endpoint_has_zero_failures(endpoint, trained, tmp_path):
    from loadtests.run import run_loadtest

    data = trained("image_classification")[1]
    summary = run_loadtest(f"{endpoint}/secure", data.images_dir, users=2, spawn_rate=2, duration="8s",
                           images_per_request=2, api_key=API_KEY, out_dir=tmp_path / "report", echo=False)
    assert summary.total.requests > 0 and summary.total.failures == 0, summary.errors
    assert (tmp_path / "report" / "report.html").is_file()


def _kept(answer: dict, above: float = 0.31) -> list[dict]:
    """The boxes clear of the 0.3 threshold (float rounding cannot move them across it)."""
    return [b for b in answer["boxes"] if b["score"] >= above]


def test_concurrent_tiled_requests_on_a_side_by_side_detector_answer_as_one_at_a_time(endpoint, trained):
    """`/lanes` scores two batches at once (a detector on torch, a replica of two threads); tiled requests sent
    together, pooled or side by side, get the answers each got alone, up to float rounding."""
    url = f"{endpoint}/lanes/score"
    assert httpx.get(f"{endpoint}/lanes/metadata").json()["lanes"] == 2
    bodies = [{"input_data": {"columns": ["image"], "data": [image]}, "params": {"tile_grid_size": "3x2"}}
              for image in _images(trained, "image_object_detection", 4)]
    alone = [httpx.post(url, json=body, timeout=120).json()[0] for body in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda body: httpx.post(url, json=body, timeout=120), bodies * 2))
    assert sum(len(_kept(answer)) for answer in alone) >= 2
    for response, single in zip(together, alone * 2):
        assert response.status_code == 200, response.text
        pooled = response.json()[0]
        assert [b["label"] for b in _kept(pooled)] == [b["label"] for b in _kept(single)]
        for a, b in zip(_kept(pooled), _kept(single)):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert [a["box"][k] for k in sorted(a["box"])] == pytest.approx([b["box"][k] for k in sorted(b["box"])],
                                                                            abs=1e-4)
