"""One request contract on every surface that scores: the same cases sent to a real `visionserve serve` app and
to a real hub (its `/score` and `/invocations` with the model named by header) over HTTP, and to the MLflow pyfunc
where a case applies. Limits, `?partial=`, error codes and bodies, explanation entries (a classifier's, and a
detector's D-RISE), per-request settings and bad images are answered the same."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serve_on_free_port, tracking_at

pytestmark = pytest.mark.slow
LIMITS = {"max_images_per_request": 4, "max_request_mb": 1.0, "max_image_mb": 0.25, "max_batch_size": 8}
NAME = "contract-classifier"
DETECTOR = "contract-detector"  # the cases whose `model` is "detector" go to this one


def _jpeg(size=(96, 72), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _noise_png(side: int) -> bytes:
    """A PNG that compresses badly: over max_image_mb once side is large."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _explain(data: bytes, **xai) -> str:
    return json.dumps({"image_base64": _b64(data), "model_explainability": True,
                       "xai_parameters": {"xai_algorithm": "guided_backprop", **xai}})


def _d_rise(data: bytes, **xai) -> str:
    """A detector's explanation entry, cheap: few masks, one map (a box named, so there is one to explain)."""
    wishes = {"number_of_masks": 16, "mask_resolution": 4, "max_explained_detections": 1, "attributions": True,
              "target_box": {"label": "circle", "topX": 0.2, "topY": 0.2, "bottomX": 0.7, "bottomY": 0.8}, **xai}
    return json.dumps({"image_base64": _b64(data), "model_explainability": True, "xai_parameters": wishes})


def _score(*entries, params=None) -> dict:
    body = {"input_data": {"columns": ["image"], "data": list(entries)}}
    return {**body, "params": params} if params is not None else body


GOOD = _b64(_jpeg())


@dataclass(frozen=True)
class Case:
    name: str
    route: str
    body: bytes
    query: str = ""
    pyfunc: bool = False  # the case applies to the pyfunc too (a DataFrame of the same entries)
    model: str = "classifier"  # or "detector"


def _json(doc) -> bytes:
    return json.dumps(doc).encode()


CASES = [
    Case("a good image", "score", _json(_score(GOOD)), pyfunc=True),
    Case("two images, in order", "score", _json(_score(GOOD, _b64(_jpeg(seed=3)))), pyfunc=True),
    Case("dataframe_split", "invocations", _json({"dataframe_split": {"columns": ["image"], "data": [[GOOD]]}})),
    Case("instances", "invocations", _json({"instances": [GOOD]})),
    Case("malformed JSON", "score", b'{"input_data": '),
    Case("nested too deeply", "score", b"[" * 100_000 + b"]" * 100_000),
    Case("not an object", "score", b"[1, 2]"),
    Case("input_data missing", "score", _json({"data": [GOOD]})),
    Case("a misspelt key", "score", _json({**_score(GOOD), "parms": {}})),
    Case("two invocation formats", "invocations", _json({"instances": [GOOD], "inputs": [GOOD]})),
    Case("too many images", "score", _json(_score(*[GOOD] * 5))),
    Case("a body over max_request_mb", "score", _json(_score("A" * 1_200_000))),
    Case("bad base64", "score", _json(_score(GOOD, "not base64!!"))),
    Case("bad base64, partial", "score", _json(_score(GOOD, "not base64!!")), "partial=true", pyfunc=True),
    Case("partial is not a yes or no", "score", _json(_score(GOOD)), "partial=maybe"),
    Case("not an image", "score", _json(_score(_b64(b"hello world, not an image")))),
    Case("too small", "score", _json(_score(_b64(_jpeg((20, 20)))))),
    Case("over max_image_mb", "score", _json(_score(_b64(_noise_png(400)))), "partial=1", pyfunc=False),
    Case("a per-request setting", "score", _json(_score(GOOD, params={"valid_resize_size": 80})), pyfunc=True),
    Case("a setting out of range", "score", _json(_score(GOOD, params={"valid_crop_size": 0})), pyfunc=True),
    Case("a load-time setting per request", "score", _json(_score(GOOD, params={"half_precision": True}))),
    # (not the pyfunc's: MLflow drops params its signature does not declare before the pyfunc sees them)
    Case("an unknown setting", "score", _json(_score(GOOD, params={"box_score_thres": 0.5}))),
    Case("an explanation entry", "score", _json(_score(_explain(_jpeg()), GOOD)), pyfunc=True),
    Case("an explanation parameter out of range", "score", _json(_score(_explain(_jpeg(), n_steps=1)))),
    Case("an unknown explanation algorithm, partial", "score",
         _json(_score(GOOD, _explain(_jpeg(), xai_algorithm="shap"))), "partial=true", pyfunc=True),
    Case("an entry that is not a string", "score", _json(_score(12345))),
    Case("a detector's explanation entry (d_rise)", "score", _json(_score(_d_rise(_jpeg()), GOOD)), pyfunc=True,
         model="detector"),
    Case("a d_rise parameter out of range", "score", _json(_score(GOOD, _d_rise(_jpeg(), number_of_masks=7))),
         model="detector"),
    Case("a d_rise target box the model has no label for, partial", "score",
         _json(_score(_d_rise(_jpeg(), target_box={"label": "pallet"}), GOOD)), "partial=true", pyfunc=True,
         model="detector"),
    Case("a classifier's xai_algorithm asked of a detector", "invocations",
         _json({"instances": [_d_rise(_jpeg(), xai_algorithm="xrai")]}), model="detector"),
]


@pytest.fixture(scope="module")
def apps(ray_session, trained, tmp_path_factory):
    """One Serve instance: `visionserve serve` for the classifier at /serve and for the detector at /serve-det, and a
    hub at / serving the same model folders by name from its Model Registry; all with the same limits."""
    import mlflow
    from ray import serve

    from serving.app import deployment, service_config
    from serving.hub.app import build_hub

    model_dir = trained("image_classification")[0].model_dir
    detector_result, detector_data = trained("image_object_detection")
    assert "circle" in detector_data.labels  # the label the d_rise cases name
    root = tmp_path_factory.mktemp("contract-hub")
    with serve_on_free_port() as url:
        small = {"ray_actor_options": {"num_cpus": 0.1}}
        serve.run(deployment(service_config(model_dir, **LIMITS), **small), name="contract-serve", route_prefix="/serve")
        serve.run(deployment(service_config(detector_result.model_dir, **LIMITS), **small), name="contract-serve-det",
                  route_prefix="/serve-det")
        serve.run(build_hub({"state_dir": str(root / "state"), "model_cpus": 0.1, **LIMITS}), name="contract-hub",
                  route_prefix="/")
        with tracking_at(f"sqlite:///{root / 'state' / 'mlflow.db'}"):
            mlflow.register_model(str(model_dir), NAME)
            mlflow.register_model(str(detector_result.model_dir), DETECTOR)
        yield {"serve": f"{url}/serve", "serve-det": f"{url}/serve-det",
               "hub": url, "model_dir": model_dir, "detector_dir": detector_result.model_dir}


def _on_serve(apps, case: Case) -> httpx.Response:
    return _send(apps["serve-det" if case.model == "detector" else "serve"], case)


def _on_hub(apps, case: Case) -> httpx.Response:
    return _send(apps["hub"], case, {"azureml-model-deployment": DETECTOR if case.model == "detector" else NAME})


def _send(url: str, case: Case, headers: dict | None = None) -> httpx.Response:
    query = f"?{case.query}" if case.query else ""
    return httpx.post(f"{url}/{case.route}{query}", content=case.body, timeout=300,
                      headers={"content-type": "application/json", **(headers or {})})


def _comparable(response: httpx.Response):
    """Status and body, less what differs by nature between two servers (request ids, float noise)."""
    body = response.json()
    if isinstance(body, dict) and "error" in body:
        body["error"].pop("request_id", None)
        return response.status_code, body
    answers = body["predictions"] if isinstance(body, dict) else body
    return response.status_code, [_rounded(a) for a in answers]


def _rounded(answer: dict) -> dict:
    if "probs" in answer:
        return {**answer, "probs": [round(p, 4) for p in answer["probs"]],
                **({"visualizations": "<png>"} if "visualizations" in answer else {})}
    if "explained_boxes" in answer:  # D-RISE's maps: their shape and rough values (float noise across processes)
        return {**answer, "boxes": [{**b, "score": round(b["score"], 3)} for b in answer["boxes"]],
                "explained_boxes": [{**e, "similarity": round(e["similarity"], 2),
                                     "mean_similarity": round(e["mean_similarity"], 2)} for e in answer["explained_boxes"]],
                "visualizations": ["<png>"] * len(answer.get("visualizations", [])),
                "attributions": [[np.asarray(a).shape, round(float(np.abs(a).mean()), 2)]
                                 for a in answer.get("attributions", [])]}
    return answer


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_serve_and_the_hub_answer_every_case_the_same(apps, case):
    on_serve = _on_serve(apps, case)
    on_hub = _on_hub(apps, case)
    assert on_serve.status_code < 500, on_serve.text[:500]
    assert _comparable(on_serve) == _comparable(on_hub)
    assert "Traceback" not in on_serve.text and "/work/" not in on_serve.text


def test_the_cases_cover_successes_and_each_refusal_code(apps):
    codes = {}
    for case in CASES:
        response = _on_serve(apps, case)
        body = response.json()
        codes[case.name] = body["error"]["code"] if isinstance(body, dict) and "error" in body else response.status_code
    assert {"malformed_json", "invalid_request", "too_many_images", "request_too_large", "invalid_image",
            "invalid_parameter", 200} <= set(codes.values()), codes


@pytest.mark.parametrize("case", [c for c in CASES if c.pyfunc], ids=[c.name for c in CASES if c.pyfunc])
def test_the_pyfunc_answers_what_the_servers_answer(apps, pyfuncs, case):
    """The pyfunc answers every row (it is always partial): a server's 200 is its answer; a refused parameter is
    the MlflowException a 400 becomes on `mlflow models serve`."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = pyfuncs[case.model]
    doc = json.loads(case.body)
    frame = pd.DataFrame({"image": doc["input_data"]["data"]})
    partial = Case(case.name, case.route, case.body, "partial=true", model=case.model)
    status, answers = _comparable(_on_serve(apps, partial))
    if status == 400:
        with pytest.raises(MlflowException):
            model.predict(frame, params=doc.get("params"))
        return
    assert [_rounded(a) for a in model.predict(frame, params=doc.get("params"))] == answers


@pytest.fixture(scope="module")
def pyfuncs(apps):
    import mlflow.pyfunc

    return {"classifier": mlflow.pyfunc.load_model(str(apps["model_dir"])),
            "detector": mlflow.pyfunc.load_model(str(apps["detector_dir"]))}
