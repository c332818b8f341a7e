"""D-RISE on the endpoint and the pyfunc: a trained tiny detector and instance segmenter served by real Ray Serve
apps over HTTP, and the MLflow pyfunc of the same folder, answer explanation entries through the scoring core in
the documented shape, refuse parameters out of bounds naming them, and keep their time budget (capped by the
replica's explanation_timeout_s). The hub answers as `visionserve serve` does: tests/test_contract.py."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serve_on_free_port

pytestmark = pytest.mark.slow
QUICK = {"number_of_masks": 24, "mask_resolution": 6, "internal_batch_size": 8, "attributions": True}
TIMEOUT_S = 12.0  # /det-short's explanation_timeout_s: the budget test asks for far more


@pytest.fixture(scope="module")
def endpoint(ray_session, trained):
    """`/det` (the detector), `/det-short` (the same, explanation_timeout_s=TIMEOUT_S) and `/seg` (the instance
    segmenter)."""
    from ray import serve

    from serving.app import VisionService, service_config

    with serve_on_free_port() as url:
        small = {"ray_actor_options": {"num_cpus": 0.1}}
        detector = str(trained("image_object_detection")[0].model_dir)
        configs = {"/det": service_config(model=detector),
                   "/det-short": service_config(model=detector, explanation_timeout_s=TIMEOUT_S),
                   "/seg": service_config(model=str(trained("image_instance_segmentation")[0].model_dir))}
        serve.run_many([serve.RunTarget(VisionService.options(**small).bind(asdict(config)), name=prefix.strip("/"),
                                        route_prefix=prefix) for prefix, config in configs.items()])
        yield url


def _image(trained, task: str, index: int = 0) -> tuple[str, list[dict]]:
    """A training image of the tiny model (base64) and its objects."""
    data = trained(task)[1]
    line = json.loads(Path(data.train_jsonl).read_text().splitlines()[index])
    return base64.b64encode((Path(data.train_jsonl).parent / line["image_url"]).read_bytes()).decode(), line["label"]


def _entry(image: str, **xai) -> str:
    return json.dumps({"image_base64": image, "model_explainability": True, "xai_parameters": xai})


def _score(url: str, *rows, query: str = "") -> httpx.Response:
    return httpx.post(f"{url}/score{query}", json={"input_data": {"columns": ["image"], "data": list(rows)}},
                      timeout=300)


def _png(text: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(text)))
    assert picture.format == "PNG"
    return picture


def _documented(answer: dict, plain: dict, explained: int, masks: int) -> None:
    """The documented shape (README, OpenAPI's DetectionExplanation): the plain answer's boxes, then one
    explained box, picture and map per explained detection, in the same order."""
    assert answer["boxes"] == plain["boxes"]
    assert set(answer) == {"boxes", "explained_boxes", "visualizations", "attributions", "masks_used"}
    assert len(answer["explained_boxes"]) == len(answer["visualizations"]) == len(answer["attributions"]) == explained
    assert answer["masks_used"] == masks
    for item, picture, saliency in zip(answer["explained_boxes"], answer["visualizations"], answer["attributions"]):
        assert set(item) == {"detection", "label", "score", "box", "similarity", "mean_similarity"}
        detection = plain["boxes"][item["detection"]]
        assert (item["label"], item["score"]) == (detection["label"], pytest.approx(detection["score"]))
        assert item["box"] == pytest.approx(detection["box"])
        assert 0 < item["similarity"] <= 1
        _png(picture)
        assert np.asarray(saliency).shape == (96, 128)  # the 128x96 image as scored (min_size 96, max_size 128)


@pytest.mark.parametrize("task, prefix", [("image_object_detection", "/det"), ("image_instance_segmentation", "/seg")])
def test_d_rise_on_the_endpoint_answers_the_detections_and_their_maps(endpoint, trained, task, prefix):
    image, objects = _image(trained, task)
    plain = _score(endpoint + prefix, image).json()[0]
    assert plain["boxes"], "the tiny model finds its training objects"
    response = _score(endpoint + prefix, image, _entry(image, **QUICK, max_explained_detections=2))
    assert response.status_code == 200, response.text
    again, answer = response.json()
    assert again == plain  # a plain entry beside it is scored as usual
    _documented(answer, plain, min(2, len(plain["boxes"])), QUICK["number_of_masks"])
    if task == "image_instance_segmentation":
        assert all(box["polygon"] for box in answer["boxes"])  # the answer keeps its polygons
    meta = httpx.get(f"{endpoint}{prefix}/metadata", timeout=30).json()
    form = {p["name"]: p for p in meta["xai_parameters"]}
    assert form["xai_algorithm"]["choices"] == ["d_rise"] and "Petsiuk" in form["xai_algorithm"]["doc"]
    assert (form["number_of_masks"]["minimum"], form["number_of_masks"]["maximum"]) == (8, 20000)


def test_d_rise_explains_a_box_the_request_names_where_the_model_found_nothing(endpoint, trained):
    image, objects = _image(trained, "image_object_detection")
    label = objects[0]["label"]
    corner = {"label": label, "topX": 0.0, "topY": 0.0, "bottomX": 0.1, "bottomY": 0.1}
    response = _score(endpoint + "/det", _entry(image, **QUICK, max_explained_detections=0, target_box=corner))
    assert response.status_code == 200, response.text
    [answer] = response.json()
    [missed] = answer["explained_boxes"]
    assert (missed["detection"], missed["score"], missed["label"]) == (None, None, label)
    assert missed["box"] == {k: v for k, v in corner.items() if k != "label"}
    assert missed["similarity"] < 0.05  # nothing there: the map says what would support a detection
    assert len(answer["attributions"]) == len(answer["visualizations"]) == 1


def test_d_rise_parameters_out_of_bounds_are_refused_naming_the_parameter(endpoint, trained):
    image, _ = _image(trained, "image_object_detection")
    response = _score(endpoint + "/det", image, _entry(image, number_of_masks=7))
    assert response.status_code == 400
    [detail] = response.json()["error"]["details"]
    assert detail["field"] == "input_data.data[1].xai_parameters.number_of_masks" and detail["index"] == 1
    unknown = _score(endpoint + "/det", _entry(image, target_box={"label": "pallet"}))
    assert unknown.status_code == 400
    assert unknown.json()["error"]["details"][0]["field"] == "input_data.data[0].xai_parameters.target_box.label"
    partial = _score(endpoint + "/det", image, _entry(image, mask_resolution=65), query="?partial=true")
    assert partial.status_code == 200
    plain, refused = partial.json()
    assert plain["boxes"] and refused["error"]["code"] == "invalid_xai_parameters"
    assert "xai_parameters.mask_resolution=65 is out of range" in refused["error"]["message"]
    classifier_words = _score(endpoint + "/det", _entry(image, xai_algorithm="xrai"))
    assert classifier_words.status_code == 400 and "xai_algorithm" in classifier_words.text


def test_d_rise_keeps_its_time_budget_and_the_replicas_explanation_timeout(endpoint, trained):
    """time_budget_s ends sampling with the masks done; a budget past the replica's explanation_timeout_s is
    capped by it: an answer (fewer masks), not a 504."""
    image, _ = _image(trained, "image_object_detection")
    many = {**QUICK, "number_of_masks": 20000, "max_explained_detections": 1}
    started = time.monotonic()
    response = _score(endpoint + "/det-short", _entry(image, **many, time_budget_s=1.0))
    assert response.status_code == 200, response.text
    assert 1 <= response.json()[0]["masks_used"] < 20000
    capped = _score(endpoint + "/det-short", _entry(image, **many, time_budget_s=3600))
    elapsed = time.monotonic() - started
    assert capped.status_code == 200, capped.text
    assert 1 <= capped.json()[0]["masks_used"] < 20000
    assert elapsed < 2 * TIMEOUT_S + 10, elapsed


def test_the_pyfunc_explains_detections_as_the_endpoint_does(endpoint, trained):
    import mlflow.pyfunc
    import pandas as pd

    model_dir = trained("image_instance_segmentation")[0].model_dir
    image, _ = _image(trained, "image_instance_segmentation")
    rows = [image, _entry(image, **QUICK, max_explained_detections=1), _entry(image, number_of_masks=20001)]
    plain, answer, refused = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": rows}))
    served = _score(endpoint + "/seg", *rows[:2]).json()
    _documented(answer, plain, 1, QUICK["number_of_masks"])
    for mine, theirs in zip(answer["explained_boxes"], served[1]["explained_boxes"], strict=True):
        # the same, up to float noise (the replica runs torch on other threads than this process)
        assert mine == {**theirs, "box": pytest.approx(theirs["box"], abs=1e-4),
                        "score": pytest.approx(theirs["score"], abs=1e-4),
                        "similarity": pytest.approx(theirs["similarity"], abs=1e-3),
                        "mean_similarity": pytest.approx(theirs["mean_similarity"], abs=1e-3)}
    assert np.allclose(answer["attributions"], served[1]["attributions"], atol=1e-4)
    assert refused["error"]["code"] == "invalid_xai_parameters" and "number_of_masks=20001" in refused["error"]["message"]
