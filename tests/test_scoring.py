"""The scoring core (serving.scoring) in process: a request is validated once and each image's header read once,
whatever the path (plain, explained, tiled, partial, analyze's already-read image); backends are a plan decided
once; a detector's per-request settings never change the shared network."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

LABELS = ["cat", "dog", "fox"]


def _png(size=(96, 72), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _scoring(task: str, model_name: str):
    """The scoring core around a freshly initialised model (scoring and explaining are real, the answers random)."""
    from models.export import ModelSettings
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.registry import get_task, inference_settings
    from serving.backends import ScoringPlan
    from serving.loading import LoadedModel
    from serving.predictor import Predictor
    from serving.scorers import TorchScorer
    from serving.scoring import Scoring

    task_ = get_task(task)
    sizes = {"valid_resize_size": 40, "valid_crop_size": 32} if task_.is_classification else {
        "min_size": 64, "max_size": 96, "box_score_thresh": 0.0}
    settings = inference_settings(task_, sizes)
    arch = get_architecture(model_name, task_.family)
    torch.manual_seed(0)
    model = build_model(arch, len(LABELS), settings).eval()
    loaded = LoadedModel(ModelSettings(task_, model_name, LABELS, settings), arch, model, TorchScorer(model, task_.ops),
                         torch.device("cpu"), ScoringPlan("torch", False, "cpu"))
    return Scoring(Predictor(loaded))


@pytest.fixture(scope="module")
def classifier():
    return _scoring("image_classification", "resnet18")


@pytest.fixture(scope="module")
def detector():
    return _scoring("image_object_detection", "fasterrcnn_resnet18_fpn")


@pytest.fixture
def counted(monkeypatch):
    """Calls of the header probe (models.data.images.image_size), of settings validation and of xai validation."""
    import models.data.images
    import serving.parameters
    import serving.predictor

    calls = {"header": 0, "settings": 0, "xai": 0}

    def counting(name, module, attribute):
        original = getattr(module, attribute)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, wrapper)

    counting("header", models.data.images, "image_size")
    counting("settings", serving.predictor, "inference_settings")
    counting("xai", serving.parameters, "parse_xai")
    return calls


def _body(*entries, params=None) -> bytes:
    return json.dumps({"input_data": {"columns": ["image"], "data": list(entries)},
                       **({"params": params} if params else {})}).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_each_image_header_is_read_once_and_the_request_validated_once(classifier, counted):
    explained = json.dumps({"image_base64": _b64(_png(seed=9)), "model_explainability": True,
                            "xai_parameters": {"xai_algorithm": "guided_backprop"}})
    body = _body(_b64(_png()), _b64(_png(seed=1)), explained, _b64(_png(seed=2)), params={"valid_resize_size": 48})
    answers = classifier.answer_now(classifier.read(body, "score"))
    assert [sorted(a) for a in answers] == [["labels", "probs"]] * 2 + [["labels", "probs", "visualizations"]] + [
        ["labels", "probs"]]
    assert counted == {"header": 4, "settings": 1, "xai": 1}


def test_a_partial_request_reads_each_good_header_once_and_answers_the_bad_rows(classifier, counted):
    body = _body(_b64(_png()), "not base64!!", _b64(b"not an image"), _b64(_png(seed=1)))
    answers = classifier.answer_now(classifier.read(body, "score", partial="true"))
    assert [a.get("error", {}).get("code") for a in answers] == [None, "invalid_base64", "not_an_image", None]
    assert counted["header"] == 3  # the two images and the bytes that turned out not to be one


def test_a_tiled_detector_request_reads_each_header_once(detector, counted):
    body = _body(_b64(_png((160, 120))), _b64(_png((120, 160), seed=1)), params={"tile_grid_size": "2x1"})
    answers = detector.answer_now(detector.read(body, "score"))
    assert all("boxes" in a for a in answers)
    assert counted == {"header": 2, "settings": 1, "xai": 0}


def test_an_image_whose_header_was_read_at_the_ingress_is_not_read_again(detector, counted):
    """What the hub's analyze does: the ingress reads the header (for the answer's width and height and its 400s),
    the model replica scores the carried `Probed`."""
    from models.data.images import Probed
    from serving.contract import Entry, ScoringRequest

    image = Probed.of(_png((128, 96)))
    assert counted["header"] == 1
    settings = detector.predictor.settings_for({"box_score_thresh": 0.05})
    [answer] = detector.answer_now(ScoringRequest((Entry("image", image),), settings))
    assert "boxes" in answer and counted["header"] == 1


def test_per_request_settings_do_not_change_the_shared_detector(detector):
    """Each request's settings score through a view of the network (models.tasks.detection.configured); the
    network itself keeps settings.json's values, so requests with different settings can run side by side."""
    network = detector.predictor.loaded.model
    before = (network.transform.min_size, network.roi_heads.score_thresh, network.roi_heads.detections_per_img)
    body = _body(_b64(_png()), params={"min_size": 80, "box_score_thresh": 0.3, "box_detections_per_img": 5})
    detector.answer_now(detector.read(body, "score"))
    assert (network.transform.min_size, network.roi_heads.score_thresh, network.roi_heads.detections_per_img) == before


def test_views_of_a_detector_share_its_weights_and_follow_their_settings(detector):
    from models.tasks.detection import configured
    from models.tasks.registry import get_task, inference_settings

    network = detector.predictor.loaded.model
    settings = inference_settings(get_task("image_object_detection"), {"min_size": 70, "box_detections_per_img": 3})
    view = configured(network, settings, proposal_share=0.25)
    assert view.transform.min_size == (70,) and view.roi_heads.detections_per_img == 3
    assert view.rpn._post_nms_top_n["testing"] == max(100, int(network.rpn._post_nms_top_n["testing"] * 0.25))
    assert view.backbone is network.backbone and view.roi_heads.box_head is network.roi_heads.box_head
    assert network.transform.min_size != (70,) and network.rpn._post_nms_top_n is not view.rpn._post_nms_top_n


@pytest.mark.parametrize("asked, family, device, onnx, compile, expected", [
    ("auto", "classification", "cpu", True, None, ("onnx", False)),
    ("auto", "classification", "cpu", False, None, ("torch", True)),
    ("auto", "classification", "cpu", True, True, ("torch", True)),
    ("auto", "classification", "cpu", True, False, ("onnx", False)),
    ("auto", "detection", "cpu", True, None, ("torch", False)),
    ("auto", "classification", "cuda", True, None, ("torch", False)),
    ("torch", "classification", "cpu", True, False, ("torch", False)),
    ("onnx", "segmentation", "cpu", True, None, ("onnx", False)),
])
def test_what_scores_is_one_rule(asked, family, device, onnx, compile, expected):
    from serving.backends import plan

    decided = plan(asked, family, device, onnx, compile=compile)
    assert (decided.backend, decided.compiled) == expected
    assert decided.why.startswith("auto: ") if asked == "auto" else not decided.why


def test_a_backend_that_cannot_score_the_model_is_refused_saying_why():
    from serving.backends import NoPlan, plan

    with pytest.raises(NoPlan, match="backend onnx: no model.onnx here; use the torch backend"):
        plan("onnx", "detection", "cpu", False, onnx_missing_why="no model.onnx here")
    with pytest.raises(NoPlan, match="backend 'tensorrt': expected one of auto, torch, onnx"):
        plan("tensorrt", "detection", "cpu", True)


def test_every_task_has_ops_that_satisfy_the_task_interface():
    from models.tasks.ops import ScoringOps, TaskOps, TrainingOps
    from models.tasks.registry import TASKS

    for task in TASKS.values():
        assert isinstance(task.ops, TaskOps), task.name
        wanted = {n for proto in (TrainingOps, ScoringOps) for n in (*vars(proto), *proto.__annotations__)
                  if not n.startswith("_")}
        missing = sorted(n for n in wanted if not hasattr(task.ops, n))
        assert not missing, (task.name, missing)


def test_the_openapi_parameter_schemas_come_from_the_task_registry():
    from models.tasks.registry import TASKS
    from serving.contract import openapi_components

    components = openapi_components()
    families = {t.family for t in TASKS.values()}
    assert {f"{f.capitalize()}Params" for f in families} <= set(components)
    assert "box_score_thresh" in components["DetectionParams"]["properties"]
    assert "valid_crop_size" in components["ClassificationParams"]["properties"]
