"""Studio (/studio): the page in a real headless Chromium (Debian's, driven by Playwright) against real Ray Serve
apps over HTTP on 127.0.0.1. What the page draws is counted against what the API answers for the same image and
settings. Screenshots of every view at 1280x800 and 390x844 go to $VISIONSERVE_SCREENSHOTS (default:
<tmp>/visionserve-studio-screenshots), printed at the end of the module."""

from __future__ import annotations

import base64
import http.client
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from conftest import serve_on_free_port

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDE, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
SHOTS = Path(os.environ.get("VISIONSERVE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "visionserve-studio-screenshots")
API_KEY = "studio-key-for-tests"
PREFIX = {"image_classification": "/cls", "image_object_detection": "/det", "image_instance_segmentation": "/seg"}


@pytest.fixture(scope="module")
def endpoint(ray_session, trained):
    """A classifier, a detector and a segmenter, each under its own prefix, and `/secure`: the classifier behind
    an API key."""
    from ray import serve

    from serving.access import key_digest
    from serving.app import VisionService, service_config

    with serve_on_free_port() as url:
        small = {"ray_actor_options": {"num_cpus": 0.1}}
        configs = {name: service_config(model=str(trained(task)[0].model_dir), compile=False) for task, name in PREFIX.items()}
        configs["/secure"] = service_config(model=str(trained("image_classification")[0].model_dir), compile=False,
                                           api_key_sha256=key_digest(API_KEY))
        serve.run_many([serve.RunTarget(VisionService.options(**small).bind(asdict(config)), name=prefix.strip("/"),
                                        route_prefix=prefix) for prefix, config in configs.items()])
        yield url
    print(f"\nstudio screenshots: {SHOTS}")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (Debian's package; `playwright install` is never needed)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (.ci/run does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh tab (its own sessionStorage); the test fails on any uncaught script error or CSP violation."""
    context = browser.new_context(viewport=WIDE, accept_downloads=True)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    tab.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    yield tab
    context.close()
    assert not problems, problems


def _image(trained, task: str, index: int = 0) -> Path:
    data = trained(task)[1]
    line = json.loads(Path(data.train_jsonl).read_text().splitlines()[index])
    return Path(data.train_jsonl).parent / line["image_url"]


def _api(endpoint: str, prefix: str, image: Path, params: dict | None = None) -> dict:
    """The API's own answer for the image, called directly."""
    body = {"input_data": {"columns": ["image"], "data": [base64.b64encode(image.read_bytes()).decode()]}}
    if params:
        body["params"] = params
    response = httpx.post(f"{endpoint}{prefix}/score", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()[0]


def _open(page, endpoint: str, prefix: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{endpoint}{prefix}/studio")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)


def _is_score(prefix: str):
    """A predicate of the page's POST <prefix>/score requests (or of their responses)."""
    def match(event) -> bool:
        request = getattr(event, "request", event)
        return urlsplit(request.url).path == f"{prefix}/score" and request.method == "POST"

    return match


def _scored(page, prefix: str, act) -> dict:
    """Runs `act` (which makes the page score), waits until the answer is drawn; → the request the page sent."""
    from playwright.sync_api import expect

    with page.expect_request(_is_score(prefix)) as request, page.expect_response(_is_score(prefix), timeout=120_000):
        act()
    expect(page.locator("#summary")).to_contain_text("shown", timeout=30_000)
    return request.value.post_data_json


def _shoot(page, name: str) -> None:
    """The page at both widths (whole page); at phone width nothing may stick out sideways."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}-1280.png", full_page=True)
    page.set_viewport_size(PHONE)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], f"{name}: wider than a phone"
        page.screenshot(path=SHOTS / f"{name}-390.png", full_page=True)
    finally:
        page.set_viewport_size(WIDE)


def _visible(page, selector: str) -> int:
    return page.locator(selector).evaluate_all("nodes => nodes.filter(n => n.getAttribute('display') !== 'none' "
                                               "&& !n.hidden).length")


# ---------------------------------------------------------------- the routes


def _raw_get(endpoint: str, path: str) -> tuple[int, str, dict]:
    """GET `path` exactly as written (no client normalises its dots or escapes)."""
    url = urlsplit(endpoint)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace"), dict(response.getheaders())
    finally:
        connection.close()


def test_the_page_is_public_and_its_route_serves_only_its_own_files(endpoint):
    status, html, headers = _raw_get(endpoint, "/secure/studio")
    assert status == 200 and "<script type=\"module\"" in html
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    status, _, headers = _raw_get(endpoint, "/secure/studio/static/studio.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert _raw_get(endpoint, "/secure/metadata")[0] == 401  # what the page shows needs the key
    assert _raw_get(endpoint, "/det/studio/")[2].get("location") == "../studio"
    for path in ("/det/studio/static/../../app.py", "/det/studio/static/..%2F..%2Fapp.py",
                 "/det/studio/static/%2e%2e%2f__init__.py", "/det/studio/static/..%5C__init__.py",
                 "/det/studio/static/__init__.py", "/det/studio/static/", "/det/studio/static/%00index.html"):
        status, body, _ = _raw_get(endpoint, path)
        assert status == 404, (path, status)
        assert "import" not in body and "def " not in body, path


def test_metadata_describes_the_per_request_parameters_from_the_settings_declaration(endpoint):
    from models.tasks.fields import is_per_request
    from models.tasks.settings import DetectionInference

    meta = httpx.get(f"{endpoint}/det/metadata", timeout=30).json()
    declared = [n for n, f in DetectionInference.model_fields.items() if is_per_request(f)]
    assert [p["name"] for p in meta["parameters"]] == declared  # half_precision is fixed at load: not offered
    by_name = {p["name"]: p for p in meta["parameters"]}
    assert {k: by_name["box_score_thresh"][k] for k in ("type", "minimum", "maximum")} == {
        "type": "number", "minimum": 0, "maximum": 1}
    assert by_name["min_size"]["default"] == meta["settings"]["min_size"]  # the model's value, not the class's
    assert by_name["tile_grid_size"]["nullable"] and by_name["tile_merge"]["choices"] == ["nms", "greedy_nmm"]
    xai = {p["name"]: p for p in meta["xai_parameters"]}  # D-RISE's
    assert xai["xai_algorithm"]["choices"] == ["d_rise"] and xai["target_box"]["type"] == "object"
    assert {k: xai["number_of_masks"][k] for k in ("type", "minimum", "maximum")} == {
        "type": "integer", "minimum": 8, "maximum": 20000}
    xai = httpx.get(f"{endpoint}/cls/metadata", timeout=30).json()["xai_parameters"]
    assert next(p for p in xai if p["name"] == "xai_algorithm")["choices"] == [
        "xrai", "integrated_gradients", "guided_gradcam", "guided_backprop"]


# ---------------------------------------------------------------- try a model


def test_detection_draws_what_the_api_answers_and_the_slider_hides_the_boxes_under_it(endpoint, trained, page):
    image = _image(trained, "image_object_detection")
    expected = _api(endpoint, "/det", image)
    scores = sorted(b["score"] for b in expected["boxes"])
    assert scores, "the memorised image has objects"
    _open(page, endpoint, "/det")
    sent = _scored(page, "/det", lambda: page.set_input_files("#file", str(image)))
    assert "params" not in sent  # untouched settings are the model's own
    assert _visible(page, "#overlay g.det") == len(expected["boxes"])
    assert sorted(float(s) for s in page.locator("#overlay g.det").evaluate_all(
        "nodes => nodes.map(n => n.dataset.score)")) == pytest.approx(scores)
    assert page.inner_text("#latency").endswith(" ms")
    _shoot(page, "try-detection")

    steps = int(scores[0] * 100) + 1  # just above the lowest score: it goes, the others above it stay
    page.focus("#confidence")
    for _ in range(steps):
        page.keyboard.press("ArrowRight")
    assert float(page.input_value("#confidence")) == pytest.approx(steps / 100)
    shown = sum(s >= steps / 100 for s in scores)
    assert _visible(page, "#overlay g.det") == shown < len(scores)
    assert page.inner_text("#summary").startswith(f"{shown} of {len(scores)} boxes shown")
    page.keyboard.press("Home")
    assert _visible(page, "#overlay g.det") == len(scores)

    page.click("#raw summary")
    assert json.loads(page.inner_text("#raw-json")) == [expected]
    with page.expect_download() as download:
        page.click("#download")
    drawn = Image.open(download.value.path())
    assert drawn.format == "PNG" and drawn.size == Image.open(image).size
    assert drawn.convert("RGB").tobytes() != Image.open(image).convert("RGB").tobytes()  # the boxes are on it


def test_a_tiling_setting_changes_the_request_and_draws_the_tiles(endpoint, trained, page):
    image = _image(trained, "image_object_detection")
    _open(page, endpoint, "/det")
    _scored(page, "/det", lambda: page.set_input_files("#file", str(image)))
    assert page.locator("#overlay .tile").count() == 0
    page.fill("#param-tile_grid_size", "2x2")
    sent = _scored(page, "/det", lambda: page.click("#score-button"))
    assert sent["params"] == {"tile_grid_size": "2x2"}
    assert page.locator("#overlay .tile").count() == 4
    expected = _api(endpoint, "/det", image, {"tile_grid_size": "2x2"})
    assert _visible(page, "#overlay g.det") == len(expected["boxes"])
    _shoot(page, "try-detection-tiled")


def test_segmentation_draws_every_polygon(endpoint, trained, page):
    image = _image(trained, "image_instance_segmentation")
    expected = _api(endpoint, "/seg", image)
    assert expected["boxes"]
    _open(page, endpoint, "/seg")
    _scored(page, "/seg", lambda: page.set_input_files("#file", str(image)))
    assert _visible(page, "#overlay g.det") == len(expected["boxes"])
    assert page.locator("#overlay polygon.mask").count() == sum(len(b["polygon"]) for b in expected["boxes"])
    _shoot(page, "try-segmentation")


def test_a_classifier_gets_one_bar_per_class_whether_the_image_is_chosen_dropped_or_pasted(endpoint, trained, page):
    from playwright.sync_api import expect

    image = _image(trained, "image_classification")
    expected = _api(endpoint, "/cls", image)
    _open(page, endpoint, "/cls")
    _scored(page, "/cls", lambda: page.set_input_files("#file", str(image)))
    ranked = [label for _, label in sorted(zip(expected["probs"], expected["labels"]), key=lambda t: -t[0])]
    assert page.locator("#bars li.bar").evaluate_all("nodes => nodes.map(n => n.dataset.label)") == ranked
    assert _visible(page, "#bars li.bar") == len(expected["labels"])
    _shoot(page, "try-classification")

    # the same image dropped on the page, then pasted: each is scored like a chosen file
    for event, name in (("drop", "dropped.png"), ("paste", "pasted.png")):
        with page.expect_response(_is_score("/cls")):
            page.evaluate(_DROP_OR_PASTE, [event, name, base64.b64encode(image.read_bytes()).decode()])
        expect(page.locator("#picked")).to_contain_text("{}: {} × {} pixels".format(name, *Image.open(image).size))
        expect(page.locator("#summary")).to_contain_text(f"{len(expected['labels'])} of {len(expected['labels'])}")
        assert page.locator("#bars li.bar").evaluate_all("nodes => nodes.map(n => n.dataset.label)") == ranked


# a file dropped on the drop zone, or pasted into the page, as the browser delivers it
_DROP_OR_PASTE = """([event, name, b64]) => {
    const data = new DataTransfer();
    data.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"}));
    const target = document.getElementById("drop");
    target.dispatchEvent(event === "drop"
        ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
        : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
}"""


def test_api_errors_are_shown_in_the_apis_words(endpoint, trained, page, tmp_path):
    from playwright.sync_api import expect

    _open(page, endpoint, "/det")
    _scored(page, "/det", lambda: page.set_input_files("#file", str(_image(trained, "image_object_detection"))))
    page.fill("#param-tile_grid_size", "9x9")
    page.click("#score-button")
    expect(page.locator("#error")).to_contain_text("is 81 tiles; at most 25 per image")
    expect(page.locator("#error")).to_contain_text("HTTP 400")
    page.click("#settings-reset")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are words, not pixels")
    page.set_input_files("#file", str(not_an_image))
    expect(page.locator("#error")).to_contain_text("not a readable image")
    expect(page.locator("#picked")).to_contain_text("the browser cannot show this file")
    page.click("#raw summary")
    assert json.loads(page.inner_text("#raw-json"))["error"]["details"][0]["code"] == "not_an_image"
    _shoot(page, "try-error")


# ---------------------------------------------------------------- explain


def _explain_tab(page, endpoint, trained) -> None:
    _open(page, endpoint, "/cls")
    _scored(page, "/cls", lambda: page.set_input_files("#file", str(_image(trained, "image_classification"))))
    page.focus("#tab-try")
    page.keyboard.press("ArrowRight")  # the tabs work from the keyboard
    assert page.get_attribute("#tab-explain", "aria-selected") == "true" and page.is_visible("#view-explain")


def test_an_explanation_can_be_cancelled(endpoint, trained, page):
    from playwright.sync_api import expect

    _explain_tab(page, endpoint, trained)
    page.select_option("#xai-xai_algorithm", "integrated_gradients")
    page.fill("#xai-n_steps", "300")
    page.click("#explain-button")
    expect(page.locator("#xai-progress")).to_be_visible()
    page.click("#xai-cancel")
    expect(page.locator("#xai-status")).to_contain_text("Cancelled after")
    expect(page.locator("#xai-progress")).to_be_hidden()
    expect(page.locator("#explain-button")).to_be_enabled()
    assert page.locator("#xai-figure").is_hidden()


def test_an_explanation_shows_the_heat_map_and_the_apis_picture(endpoint, trained, page):
    from playwright.sync_api import expect

    _explain_tab(page, endpoint, trained)
    page.select_option("#xai-xai_algorithm", "guided_backprop")
    with page.expect_request(_is_score("/cls")) as request:
        page.click("#explain-button")
    entry = json.loads(request.value.post_data_json["input_data"]["data"][0])
    assert entry["model_explainability"] is True and entry["xai_parameters"]["xai_algorithm"] == "guided_backprop"
    expect(page.locator("#xai-figure")).to_be_visible(timeout=120_000)
    assert page.get_attribute("#xai-grid", "src").startswith("data:image/png;base64,")
    assert page.eval_on_selector("#xai-grid", "img => img.complete && img.naturalWidth") > 0
    assert page.locator("#xai-overlay image.heat").count() == 1
    page.focus("#heat-opacity")
    page.keyboard.press("End")
    assert page.get_attribute("#xai-overlay image.heat", "opacity") == "1"
    _shoot(page, "explain")


def _explain_detections(page, *, masks: int, resolution: int, most: int) -> tuple[dict, dict]:
    """D-RISE's fields filled in the Explain view of `/det` and Explain clicked: the xai_parameters the page sent
    and the API's answer for the image."""
    page.fill("#xai-number_of_masks", str(masks))
    page.fill("#xai-mask_resolution", str(resolution))
    page.fill("#xai-max_explained_detections", str(most))
    with page.expect_request(_is_score("/det")) as request, \
            page.expect_response(_is_score("/det"), timeout=240_000) as response:
        page.click("#explain-button")
    wishes = json.loads(request.value.post_data_json["input_data"]["data"][0])["xai_parameters"]
    return wishes, response.value.json()[0]


def test_a_detections_d_rise_map_is_drawn_over_the_image_with_its_box(endpoint, trained, page):
    """The detector's Explain view: D-RISE's parameters from /metadata, one map per explained detection, each
    drawn over the whole image with the box the API explained, chosen in a list; the API's picture beside."""
    from playwright.sync_api import expect

    _open(page, endpoint, "/det")
    _scored(page, "/det", lambda: page.set_input_files("#file", str(_image(trained, "image_object_detection"))))
    page.click("#tab-explain")
    wishes, answer = _explain_detections(page, masks=24, resolution=6, most=2)
    assert wishes["number_of_masks"] == 24 and wishes["attributions"] is True
    explained = answer["explained_boxes"]
    assert explained, "the memorised image has detections to explain"
    expect(page.locator("#xai-figure")).to_be_visible(timeout=30_000)
    assert page.locator("#xai-class option").count() == len(explained)
    assert page.eval_on_selector("#xai-grid", "img => img.complete && img.naturalWidth") > 0
    assert page.locator("#xai-overlay image.heat").count() == 1
    width = float(page.eval_on_selector("#xai-overlay", "svg => svg.viewBox.baseVal.width"))
    drawn = float(page.get_attribute("#xai-overlay rect.explained-box", "x"))
    assert drawn == pytest.approx(explained[0]["box"]["topX"] * width, abs=0.5)
    if len(explained) > 1:
        first = page.get_attribute("#xai-overlay image.heat", "href")
        page.select_option("#xai-class", "1")
        assert page.get_attribute("#xai-overlay image.heat", "href") != first
        drawn = float(page.get_attribute("#xai-overlay rect.explained-box", "x"))
        assert drawn == pytest.approx(explained[1]["box"]["topX"] * width, abs=0.5)
    _shoot(page, "explain-detection")


def test_a_box_dragged_over_the_image_is_explained_as_the_target_box(endpoint, trained, page):
    """Explaining a miss: a box dragged over the detector's image, with a label, goes as
    `xai_parameters.target_box` (fractions of the image); the answer's first map is that box's, listed as the
    target box and drawn where it was dragged."""
    from playwright.sync_api import expect

    _open(page, endpoint, "/det")
    _scored(page, "/det", lambda: page.set_input_files("#file", str(_image(trained, "image_object_detection"))))
    page.click("#tab-explain")
    expect(page.locator("#xai-target")).to_be_visible()
    label = page.locator("#xai-target-label option").nth(1).get_attribute("value")
    page.select_option("#xai-target-label", label)
    area = page.locator("#xai-overlay").bounding_box()
    page.mouse.move(area["x"] + 0.2 * area["width"], area["y"] + 0.25 * area["height"])
    page.mouse.down()
    page.mouse.move(area["x"] + 0.6 * area["width"], area["y"] + 0.75 * area["height"], steps=5)
    page.mouse.up()
    expect(page.locator("#xai-target-box")).to_contain_text("fractions of the image")
    assert page.locator("#xai-overlay rect.target-box").count() == 1
    wishes, answer = _explain_detections(page, masks=16, resolution=6, most=0)
    target = wishes["target_box"]
    assert target["label"] == label
    assert [target[k] for k in ("topX", "topY", "bottomX", "bottomY")] == pytest.approx([0.2, 0.25, 0.6, 0.75],
                                                                                     abs=0.02)
    explained = answer["explained_boxes"]
    assert explained[0]["score"] is None and explained[0]["label"] == label
    expect(page.locator("#xai-figure")).to_be_visible(timeout=30_000)
    expect(page.locator("#xai-class option").first).to_contain_text("(target box)")
    width = float(page.eval_on_selector("#xai-overlay", "svg => svg.viewBox.baseVal.width"))
    drawn = float(page.get_attribute("#xai-overlay rect.explained-box", "x"))
    assert drawn == pytest.approx(target["topX"] * width, abs=0.5)
    page.click("#xai-target-clear")
    expect(page.locator("#xai-target-box")).to_have_text("no box drawn")
    _shoot(page, "explain-target-box")


# ---------------------------------------------------------------- the API key


def test_a_wrong_key_is_refused_in_words_and_the_right_one_is_kept_for_the_tab(endpoint, page):
    from playwright.sync_api import expect

    page.goto(f"{endpoint}/secure/studio")
    expect(page.locator("#key-dialog")).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text("needs an API key")
    _shoot(page, "key")
    page.fill("#key-input", "not-the-key")
    page.click("#key-ok")
    expect(page.locator("#key-message")).to_contain_text("The API key was refused: a valid API key is required")
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    _shoot(page, "key-refused")
    with page.expect_request(lambda r: urlsplit(r.url).path == "/secure/metadata") as request:
        page.fill("#key-input", API_KEY)
        page.click("#key-ok")
    assert request.value.headers["authorization"] == f"Bearer {API_KEY}"
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('visionserve.studio.key')") == API_KEY
    page.reload()  # the tab keeps the key: no question asked again
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    assert not page.locator("#key-dialog").is_visible()
