"""Studio on the hub (/studio on `visionserve hub`): the page in a real headless Chromium (Debian's, driven by
Playwright) against a real hub on Ray Serve over HTTP on 127.0.0.1, with its real MLflow store. What the page draws
is counted against the COCO files, MLflow and the API's answers; the routes only the studio reads refuse what
they must. Screenshots of each hub view at 1280x800 and 390x844 go where tests/test_studio.py puts its own."""

from __future__ import annotations

import base64
import http.client
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import serve_on_free_port, tracking_at
from test_hub import write_coco
from test_studio import browser, page, _shoot, _visible  # noqa: F401  (the module's browser and its tabs)

pytestmark = pytest.mark.slow
KEY = "studio-hub-key"
V = {"api-version": "2023-10-01"}
TRAINING_S = 900


@pytest.fixture(scope="module")
def hub(ray_session, tmp_path_factory):
    """A hub with an API key; its --image-root holds the datasets' files (and nothing of the hub's own state)."""
    from ray import serve

    from serving.hub.app import build_hub

    root = tmp_path_factory.mktemp("studio-hub")
    (root / "key").write_text(KEY)
    images = root / "images"
    images.mkdir()
    with serve_on_free_port() as url:
        state = root / "state"
        serve.run(build_hub({"state_dir": str(state), "image_root": str(images), "api_key_file": str(root / "key"),
                             "cache_size": 2, "model_cpus": 0.3}), name="hub", route_prefix="/")
        yield {"url": url, "root": root, "images": images, "tracking": f"sqlite:///{state / 'mlflow.db'}"}


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Ocp-Apim-Subscription-Key": KEY}, timeout=120, params=V)


def _register(client: httpx.Client, name: str, coco: Path, kind: str) -> None:
    answer = client.put(f"/computervision/datasets/{name}", json={"annotationKind": kind,
                                                                   "annotationFileUris": [str(coco)]})
    assert answer.status_code == 201, answer.text


@pytest.fixture(scope="module")
def datasets(hub, tmp_path_factory):
    """cls and det as registered; `unreadable`: an image that is not one (registration reads no image); `spoiled`
    and `escaped` registered sound, then their files changed on disk (a bad box and an unreadable image; an image
    outside the root); `linked`: an image that became a link leading out of the root."""
    images = hub["images"]
    outside = tmp_path_factory.mktemp("outside")
    secret = write_coco(outside, "imageClassification", per_class=1).parent / "red-0.png"
    coco = {name: write_coco(images / name, kind) for name, kind in (
        ("cls", "imageClassification"), ("det", "imageObjectDetection"), ("spoiled", "imageObjectDetection"),
        ("escaped", "imageObjectDetection"), ("linked", "imageObjectDetection"))}
    coco["unreadable"] = write_coco(images / "unreadable", "imageObjectDetection", bad_image=True)
    with _client(hub["url"]) as client:
        for name, path in coco.items():
            _register(client, name, path, "imageClassification" if name == "cls" else "imageObjectDetection")
    write_coco(images / "spoiled", "imageObjectDetection", bad_box=True, bad_image=True)
    doc = json.loads(coco["escaped"].read_text())
    doc["images"][0]["absolute_url"] = str(secret)
    coco["escaped"].write_text(json.dumps(doc))
    first = images / "linked" / "red-0.png"
    first.unlink()
    first.symlink_to(secret)
    return coco


def _open(page, hub) -> None:
    """The page, the key given once (kept for the tab), every view ready."""
    from playwright.sync_api import expect

    page.goto(f"{hub['url']}/studio")
    expect(page.locator("#key-dialog")).to_be_visible(timeout=30_000)
    page.fill("#key-input", KEY)
    page.click("#key-ok")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)


def _tab(page, name: str) -> None:
    """Moves to a tab from the keyboard (arrow keys along the tab list)."""
    page.focus("[role=tab][aria-selected=true]")
    for _ in range(4):
        if page.get_attribute(f"#tab-{name}", "aria-selected") == "true":
            return
        page.keyboard.press("ArrowRight")
    assert page.get_attribute(f"#tab-{name}", "aria-selected") == "true", name


def _raw(hub, path: str, key: bool = True) -> tuple[int, dict, bytes]:
    """GET `path` exactly as written (no client normalises its dots or escapes)."""
    url = urlsplit(hub["url"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.request("GET", path, headers={"Ocp-Apim-Subscription-Key": KEY} if key else {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _wait(client: httpx.Client, name: str, timeout: float = TRAINING_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/computervision/models/{name}").json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        time.sleep(2)
    raise AssertionError(f"{name} still {record['status']} after {timeout} s")


# ---------------------------------------------------------------- the routes only the studio reads


def test_the_hubs_page_is_public_and_its_routes_are_keyed_and_refuse_what_they_must(hub, datasets):
    status, headers, body = _raw(hub, "/studio", key=False)
    assert status == 200 and b'data-server="hub"' in body and "script-src 'self'" in headers["content-security-policy"]
    status, headers, body = _raw(hub, "/datasets/det/images/0")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    refused = {
        ("/datasets/det/images/0", False): (401, "Unauthorized"),
        ("/datasets/det/contents", False): (401, "Unauthorized"),
        ("/models/anything/progress", False): (401, "Unauthorized"),
        ("/datasets/escaped/images/0", True): (409, "datasetCorrupt"),  # the COCO file now names a file outside
        ("/datasets/escaped/images/1", True): (409, "datasetCorrupt"),
        ("/datasets/linked/images/0", True): (409, "datasetCorrupt"),  # a link leading out: as a path leading out
        ("/datasets/det/images/99", True): (404, "NotFound"),
        ("/datasets/det/images/-1", True): (400, "InvalidArgument"),
        ("/datasets/det/images/0x1", True): (400, "InvalidArgument"),
        ("/datasets/det/images/..%2F..%2F..%2Fkey", True): (404, "NotFound"),
        ("/datasets/det/images/../../../key", True): (404, "NotFound"),
        ("/datasets/%2e%2e/images/0", True): (400, "InvalidArgument"),
        ("/datasets/..%2Fstate/contents", True): (404, "NotFound"),
        ("/datasets/nope/contents", True): (404, "NotFound"),
        ("/datasets/det/contents?top=1000", True): (400, "InvalidRequest"),
        ("/models/nope/progress", True): (404, "NotFound"),
        ("/models/nope/metadata", True): (404, "NotFound"),
        ("/models/x'or'1'='1/progress", True): (400, "InvalidArgument"),
    }
    for (path, key), (code, error) in refused.items():
        status, headers, body = _raw(hub, path, key)
        assert status == code, (path, status, body[:300])
        answer = json.loads(body)
        assert answer["error"]["code"] == error and answer["error"]["message"], (path, answer)
        assert b"Traceback" not in body and b"\xff\xd8" not in body[:2], path
    status, _, body = _raw(hub, "/datasets/escaped/images/0")
    assert b"outside the image root" in body


def _image_at(hub, url: str, key: bool = True) -> httpx.Response:
    """GET /image?url=URL, the route the page's URL field reads."""
    with httpx.Client(base_url=hub["url"], timeout=60, params=V,
                      headers={"Ocp-Apim-Subscription-Key": KEY} if key else {}) as client:
        return client.get("/image", params={"url": url})


def test_the_image_route_serves_what_analyze_reads_of_a_url_and_refuses_the_rest(hub, datasets):
    image = hub["images"] / "det" / "blue-1.png"
    for url in (str(image), image.as_uri(), "det/blue-1.png",  # a path, file://, relative to the root
                "https://acct.blob.core.windows.net/container/det/blue-1.png?sv=2022&sig=x"):  # a blob, mapped
        answer = _image_at(hub, url)
        assert answer.status_code == 200, (url, answer.text)
        assert answer.content == image.read_bytes() and answer.headers["content-type"] == "image/png"
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert (hub["root"] / "key").is_file()  # what the escapes below would reach
    refused = {
        "file:///etc/passwd": ("InvalidImageUrl", "lies outside the image root; refused"),
        "../key": ("InvalidImageUrl", "lies outside"),
        "det/../../key": ("InvalidImageUrl", "lies outside"),
        str(hub["root"] / "key"): ("InvalidImageUrl", "lies outside"),
        "https://acct.blob.core.windows.net/container/../../key": ("InvalidImageUrl", "outside the image root"),
        "linked/red-0.png": ("InvalidImageUrl", "lies outside"),  # a link inside the root that leads out of it
        "det/nope.png": ("InvalidImageUrl", "no such file"),
        "det": ("InvalidImageUrl", "no such file"),
        "spoiled/red-0.png": ("InvalidImageFormat", "not a readable image"),  # not an image, named .png
        str(datasets["det"]): ("InvalidImageFormat", "not a readable image"),
        "": ("InvalidRequest", "no image URL"),
    }
    for url, (code, words) in refused.items():
        answer = _image_at(hub, url)
        assert answer.status_code == 400, (url, answer.status_code, answer.text[:300])
        assert answer.json()["error"]["code"] == code == answer.headers["x-ms-error-code"], (url, answer.text)
        assert words in answer.json()["error"]["message"], (url, answer.text)
        assert b"Traceback" not in answer.content and b"secret" not in answer.content
        if not url.startswith(str(hub["root"])):  # the server's own paths are never in a message
            assert str(hub["root"]) not in answer.text, (url, answer.text)
    denied = _image_at(hub, str(image), key=False)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "Unauthorized"


def test_a_dataset_reports_its_problems_with_their_ids_and_counts_per_category(hub, datasets):
    with _client(hub["url"]) as client:
        det = client.get("/datasets/det/contents").json()
        spoiled = client.get("/datasets/spoiled/contents").json()
    coco = json.loads(datasets["det"].read_text())
    assert det["valid"] and det["problems"] == [] and det["annotations"] == len(coco["annotations"])
    assert det["counts"] == {"red": 3, "blue": 3} and det["images"]["total"] == len(coco["images"])
    assert not spoiled["valid"]
    assert {(p.get("annotationId"), p.get("imageId")) for p in spoiled["problems"]} >= {(1, None), (None, 1)}


# ---------------------------------------------------------------- the API key


def test_a_wrong_key_is_refused_in_words_and_the_right_one_opens_the_hub(hub, page):
    from playwright.sync_api import expect

    page.goto(f"{hub['url']}/studio")
    expect(page.locator("#key-message")).to_contain_text("needs an API key")
    page.fill("#key-input", "not-the-key")
    page.click("#key-ok")
    expect(page.locator("#key-message")).to_contain_text("The API key was refused: a valid key is required")
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    _shoot(page, "hub-key-refused")
    page.fill("#key-input", KEY)
    page.click("#key-ok")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#model")).to_contain_text("hub ·")
    assert page.is_visible("#tab-models") and page.is_visible("#tab-datasets") and page.is_hidden("#tab-explain")


# ---------------------------------------------------------------- datasets


def test_the_dataset_grid_draws_every_annotation_of_the_coco_file(hub, datasets, page):
    from playwright.sync_api import expect

    _open(page, hub)
    _tab(page, "datasets")
    assert page.is_hidden("#picker")  # the image picker belongs to the Try view
    page.click("#datasets-table tr[data-name=det] button")
    expect(page.locator("#dataset-grid")).to_have_attribute("data-ready", "true", timeout=60_000)
    coco = json.loads(datasets["det"].read_text())
    assert page.locator("#dataset-grid g.ann").count() == len(coco["annotations"])
    per_image = page.locator("#dataset-grid li").evaluate_all("items => items.map(i => i.querySelectorAll('g.ann').length)")
    assert per_image == [sum(a["image_id"] == image["id"] for a in coco["annotations"]) for image in coco["images"]]
    assert page.locator("#dataset-grid img").evaluate_all("imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
    counts = page.locator("#dataset-counts tbody tr").evaluate_all("rows => rows.map(r => r.innerText.split('\\t'))")
    assert {name.strip(): int(n) for name, n in counts} == {"red": 3, "blue": 3}
    assert page.locator("#dataset-problems").is_hidden()
    _shoot(page, "hub-datasets")

    page.click("#datasets-table tr[data-name=spoiled] button")
    expect(page.locator("#dataset-summary")).to_have_attribute("data-valid", "false", timeout=60_000)
    rows = page.locator("#problems-table tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
    assert ["1", "–"] in [row[:2] for row in rows] and ["–", "1"] in [row[:2] for row in rows]
    assert any("bbox" in row[2] for row in rows if row[0] == "1")
    assert any("not a readable image" in row[2] for row in rows if row[1] == "1")
    assert page.locator("#dataset-grid li").count() == 0  # annotations that do not parse: nothing to draw
    expect(page.locator("#dataset-summary")).to_contain_text("its images can be shown once they are fixed")
    _shoot(page, "hub-datasets-problems")

    page.click("#datasets-table tr[data-name=unreadable] button")
    expect(page.locator("#dataset-grid")).to_have_attribute("data-ready", "true", timeout=60_000)
    assert page.locator("#dataset-grid g.ann").count() == 6
    expect(page.locator("#dataset-grid .thumb.broken")).to_have_count(1)  # the image that is not one says so
    assert "cannot be shown" in page.inner_text("#dataset-grid li:first-child")
    assert page.locator("#problems-table tbody tr").count() == 1


# ---------------------------------------------------------------- models


def _curve_in_mlflow(hub, name: str) -> int:
    """The epochs the model's training logged its validation metric at, over all its trials, read from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=hub["tracking"])
    experiment = client.get_experiment_by_name("visionserve-hub")
    [sweep] = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}' and "
                                 "tags.sweep = '1'")
    trials = client.search_runs([experiment.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    return sum(len({m.step for m in client.get_metric_history(t.info.run_id, "accuracy")}) for t in trials)


def test_a_training_started_from_the_form_succeeds_with_its_curve_drawn(hub, datasets, page):
    from playwright.sync_api import expect

    _open(page, hub)
    _tab(page, "models")
    expect(page.locator("#train-dataset option")).to_have_count(len(datasets))
    page.fill("#train-name", "from-form")
    page.select_option("#train-dataset", "cls")
    page.select_option("#train-kind", "Generic-Classifier")
    page.fill("#train-budget", "0.05")
    with page.expect_request(lambda r: r.method == "PUT") as request:
        page.click("#train-button")
    assert urlsplit(request.value.url).path == "/computervision/models/from-form"
    assert request.value.post_data_json == {"trainingParameters": {
        "trainingDatasetName": "cls", "timeBudgetInHours": 0.05, "modelKind": "Generic-Classifier"}}
    expect(page.locator("#model-title")).to_have_text("from-form")
    expect(page.locator("#models-table tr[data-name=from-form] .status")).not_to_have_text("", timeout=30_000)
    deadline = time.monotonic() + TRAINING_S
    while time.monotonic() < deadline:  # a live curve: the chart grows while it trains
        state = page.get_attribute("#model-status", "data-status")
        if state not in (None, "notStarted", "training") or page.locator("#model-chart circle.point").count():
            break
        time.sleep(1)
    if state == "training":
        _shoot(page, "hub-models-training")
    expect(page.locator("#model-status")).to_have_attribute("data-status", "succeeded", timeout=TRAINING_S * 1000)
    expect(page.locator("#model-chart")).to_have_attribute("data-points", str(_curve_in_mlflow(hub, "from-form")))
    assert page.locator("#model-chart circle.point").count() == _curve_in_mlflow(hub, "from-form") > 0
    assert page.locator("#model-chart g.trial").count() >= 1
    performance = page.locator("#model-performance tbody th").all_inner_texts()
    assert {"accuracyTop1", "accuracyTop5", "averagePrecision", "calibrationECE"} <= set(performance)
    assert sorted(page.locator("#model-tags tbody tr td:first-child").all_inner_texts()) == ["blue", "red"]
    assert page.is_disabled("#model-cancel") and page.is_enabled("#model-delete")
    _shoot(page, "hub-models")
    page.fill("#train-name", "from-form")  # the API's refusal, in its words
    page.click("#train-button")
    expect(page.locator("#error")).to_contain_text("model 'from-form' already exists (HTTP 409)")
    expect(page.locator("#train-status")).to_have_text("The hub refused to train from-form.")


def test_a_training_is_cancelled_from_the_page(hub, datasets, page):
    from playwright.sync_api import expect

    _open(page, hub)
    _tab(page, "models")
    page.fill("#train-name", "to-cancel")
    page.select_option("#train-dataset", "cls")
    page.fill("#train-budget", "1")
    page.click("#train-button")
    expect(page.locator("#model-title")).to_have_text("to-cancel")
    # its sweep has started (cancelled through Ray Tune, so that its trial's CPU is given back)
    expect(page.locator("#model-message")).to_contain_text("sweep", timeout=300_000)
    expect(page.locator("#model-cancel")).to_be_enabled()
    page.click("#model-cancel")
    expect(page.locator("#model-status")).to_have_attribute("data-status", "cancelled", timeout=120_000)
    assert page.is_disabled("#model-cancel")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#model-delete")
    expect(page.locator("#models-table tr[data-name=to-cancel]")).to_have_count(0)
    expect(page.locator("#model-detail")).to_be_hidden()


# ---------------------------------------------------------------- try a model


def _classifier(hub) -> str:
    """The hub's classifier: the one the form trained, else trained now through the API."""
    with _client(hub["url"]) as client:
        if client.get("/computervision/models/from-form").status_code == 404:
            client.put("/computervision/models/from-form", json={"trainingParameters": {
                "trainingDatasetName": "cls", "timeBudgetInHours": 0.05, "modelKind": "Generic-Classifier"}})
        assert _wait(client, "from-form")["status"] == "succeeded"
    return "from-form"


@pytest.fixture(scope="module")
def detector(hub, trained) -> tuple[str, Path]:
    """A detector trained by `visionserve train`, registered in the hub's MLflow registry; an image it knows."""
    import mlflow

    result, data = trained("image_object_detection")
    with tracking_at(hub["tracking"]):
        mlflow.register_model(str(result.model_dir), "det-model")
    line = json.loads(Path(data.train_jsonl).read_text().splitlines()[0])
    return "det-model", Path(data.train_jsonl).parent / line["image_url"]


def _score(hub, model: str, image: Path) -> dict:
    body = {"input_data": {"columns": ["image"], "data": [base64.b64encode(image.read_bytes()).decode()]}}
    with _client(hub["url"]) as client:
        answer = client.post("/score", params={"model": model}, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()[0]


def _is_score(model: str, image: Path | None = None):
    """A POST /score for `model` (of `image`'s bytes, when given: choosing a model scores the image shown before
    with it again, and that answer must not be taken for the new image's)."""
    sent = base64.b64encode(image.read_bytes()).decode() if image is not None else ""

    def match(event) -> bool:
        request = getattr(event, "request", event)
        url = urlsplit(request.url)
        return (request.method == "POST" and url.path == "/score" and url.query == f"model={model}"
                and sent in (request.post_data or ""))

    return match


def test_the_model_picker_scores_with_the_chosen_model(hub, datasets, detector, page):
    from playwright.sync_api import expect

    classifier = _classifier(hub)
    detector, image = detector
    expected = _score(hub, detector, image)
    assert expected["boxes"], "the memorised image has objects"
    _open(page, hub)
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/models/{detector}/metadata"):
        page.select_option("#hub-model", detector)
    expect(page.locator("#model")).to_contain_text(f"{detector} (version 1) · image_object_detection")
    assert page.locator("#param-box_score_thresh").count() == 1  # the detector's own settings form
    with page.expect_response(_is_score(detector), timeout=120_000):
        page.set_input_files("#file", str(image))
    expect(page.locator("#summary")).to_contain_text("shown", timeout=30_000)
    assert _visible(page, "#overlay g.det") == len(expected["boxes"])
    assert page.is_hidden("#hub-explain-note")
    _shoot(page, "hub-try-detection")

    cls_image = datasets["cls"].parent / "red-0.png"
    expected = _score(hub, classifier, cls_image)
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/models/{classifier}/metadata"):
        page.select_option("#hub-model", classifier)
    with page.expect_response(_is_score(classifier, cls_image), timeout=120_000):
        page.set_input_files("#file", str(cls_image))
    expect(page.locator("#summary")).to_contain_text(f"{len(expected['labels'])} of {len(expected['labels'])} classes")
    ranked = [label for _, label in sorted(zip(expected["probs"], expected["labels"]), key=lambda t: -t[0])]
    assert page.locator("#bars li.bar").evaluate_all("nodes => nodes.map(n => n.dataset.label)") == ranked
    expect(page.locator("#hub-explain-note")).to_contain_text(f"visionserve serve models:/{classifier}/")
    assert page.locator("#param-box_score_thresh").count() == 0
    _shoot(page, "hub-try-classification")


def test_an_image_url_is_scored_and_drawn_as_a_dropped_image_and_a_refused_one_is_said_in_the_apis_words(
        hub, datasets, detector, page):
    from playwright.sync_api import expect

    name, memorised = detector
    image = hub["images"] / "by-url" / memorised.name  # under the image root, where a blob URL maps
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(memorised.read_bytes())
    expected = _score(hub, name, image)
    assert expected["boxes"], "the memorised image has objects"
    _open(page, hub)
    with page.expect_response(lambda r: urlsplit(r.url).path == f"/models/{name}/metadata"):
        page.select_option("#hub-model", name)
    expect(page.locator("#model")).to_contain_text(f"{name} (version")
    page.fill("#image-url", f"https://acct.blob.core.windows.net/container/by-url/{image.name}?sv=2022&sig=x")
    with page.expect_request(_is_score(name)) as request, page.expect_response(_is_score(name), timeout=120_000):
        page.press("#image-url", "Enter")
    # the bytes the URL names, scored as a dropped file is: the same body, the same drawing
    assert request.value.post_data_json["input_data"]["data"] == [base64.b64encode(image.read_bytes()).decode()]
    expect(page.locator("#summary")).to_contain_text(f"{len(expected['boxes'])} of {len(expected['boxes'])} boxes",
                                                     timeout=30_000)
    assert _visible(page, "#overlay g.det") == len(expected["boxes"])
    expect(page.locator("#picked")).to_contain_text(f"{image.name}: ")
    assert page.is_enabled("#download") and json.loads(page.text_content("#raw-json"))[0] == expected
    _shoot(page, "hub-try-url")

    for url in ("file:///etc/passwd", "../key", "by-url/nope.png", "spoiled/red-0.png"):
        words = _image_at(hub, url).json()["error"]["message"]
        page.fill("#image-url", url)
        page.click("#url-button")
        expect(page.locator("#error")).to_have_text(f"{words} (HTTP 400)")
        assert _visible(page, "#overlay g.det") == len(expected["boxes"])  # the image scored before stays
    _shoot(page, "hub-try-url-refused")
