"""Explanations (scoring.md, Explanations): parameters, every method on real architectures, the
attribution landing on the evidence, errors, and the pyfunc path. Models are built, not trained."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from explain import make_explainer
from explain.params import ALGORITHMS, XaiParameters, parse_xai
from explain.methods import attribute, path_integrated_gradients
from explain.visualize import heat
from models.errors import SettingsError

LABELS = ["cat", "dog", "fox"]


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _noise(size=(64, 56), seed=0) -> str:
    return _png(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _row(image: str, **xai) -> str:
    return json.dumps({"image_base64": image, "model_explainability": True, "xai_parameters": xai})


def _predictor(task: str, model_name: str, crop: int = 32, labels=LABELS):
    """A Predictor around a freshly initialised (untrained) model: scoring and explaining are real."""
    from models.tasks.architectures import build_model, get_architecture
    from models.export import ModelSettings
    from models.tasks.registry import get_task, inference_settings
    from serving.backends import ScoringPlan
    from serving.loading import LoadedModel
    from serving.predictor import Predictor
    from serving.scorers import TorchScorer
    from serving.scoring import Scoring

    task_ = get_task(task)
    sizes = {"valid_resize_size": crop + 4, "valid_crop_size": crop} if task_.is_classification else {
        "min_size": 64, "max_size": 96}
    settings = inference_settings(task_, sizes)
    arch = get_architecture(model_name, task_.family)
    torch.manual_seed(0)
    model = build_model(arch, len(labels), settings).eval()
    loaded = LoadedModel(ModelSettings(task_, model_name, list(labels), settings), arch, model,
                         TorchScorer(model, task_.ops), torch.device("cpu"), ScoringPlan("torch", False, "cpu"))
    return Scoring(Predictor(loaded))


# ---------------------------------------------------------------- parameters


def test_defaults_are_the_specs():
    xai = parse_xai({})
    assert xai == parse_xai(None) == XaiParameters()
    assert (xai.xai_algorithm, xai.visualizations, xai.attributions, xai.confidence_score_threshold_multilabel,
            xai.n_steps, xai.xrai_fast, xai.approximation_method) == (
        "xrai", True, False, 0.5, 50, True, "riemann_middle")


@pytest.mark.parametrize("raw, expected", [
    ({"n_steps": 1}, "xai_parameters.n_steps=1 is out of range: must be an integer in [2, 1000]"),
    ({"xai_algorithm": "shap"}, "xai_parameters.xai_algorithm=shap is out of range: must be one of 'xrai'"),
    ({"approximation_method": "trapezoid"}, "xai_parameters.approximation_method=trapezoid"),
    ({"nsteps": 5}, "xai_parameters.nsteps: unknown parameter; did you mean 'n_steps'"),
    ({"confidence_score_threshold_multilabel": 2}, "xai_parameters.confidence_score_threshold_multilabel=2"),
])
def test_bad_parameters_are_named(raw, expected):
    with pytest.raises(SettingsError) as caught:
        parse_xai(raw)
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


# ---------------------------------------------------------------- every method, real architectures


def _check_png(text: str) -> None:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    assert image.format == "PNG" and min(image.size) >= 200


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("task", ["image_classification", "image_classification_multilabel"])
def test_every_algorithm_answers_the_schema(task, model_name):
    from serving.pyfunc import VisionModel

    import pandas as pd

    predictor = _predictor(task, model_name, labels=LABELS[:2])
    image = _noise()
    plain = predictor.score_rows([image])[0]
    rows = [image] + [_row(image, xai_algorithm=a, n_steps=3, attributions=True,
                           confidence_score_threshold_multilabel=0.0) for a in ALGORITHMS]
    pyfunc = VisionModel()
    pyfunc.scoring = predictor
    answers = pyfunc.predict(None, pd.DataFrame({"image": rows}))
    assert answers[0] == plain
    multilabel = task.endswith("multilabel")
    for algorithm, answer in zip(ALGORITHMS, answers[1:]):
        assert set(answer) == {"probs", "labels", "visualizations", "attributions"}, algorithm
        assert answer["labels"] == plain["labels"]
        assert np.allclose(answer["probs"], plain["probs"], atol=1e-5), algorithm  # same crop, same model
        pictures, arrays = answer["visualizations"], answer["attributions"]
        if multilabel:  # threshold 0: every label is explained
            assert isinstance(pictures, list) and len(pictures) == len(arrays) == 2
        else:
            pictures, arrays = [pictures], [arrays]
        for picture, array in zip(pictures, arrays):
            _check_png(picture)
            array = np.asarray(array)
            assert array.shape == (3, 32, 32) and np.isfinite(array).all(), algorithm


def test_defaults_apply_when_xai_parameters_are_absent_and_multilabel_threshold_filters():
    predictor = _predictor("image_classification_multilabel", "resnet18", labels=LABELS[:2])
    image = _noise()
    probs = predictor.score_rows([image])[0]["probs"]
    bare = json.dumps({"image_base64": image, "model_explainability": True})
    high = _row(image, xai_algorithm="guided_backprop", confidence_score_threshold_multilabel=1.0)
    scored = json.dumps({"image_base64": image, "model_explainability": False})
    default, none_explained, plain = predictor.score_rows([bare, high, scored])
    assert set(default) == {"probs", "labels", "visualizations"}  # xrai, pictures only
    assert len(default["visualizations"]) == sum(p >= 0.5 for p in probs)
    assert none_explained["visualizations"] == []
    assert set(plain) == {"probs", "labels"}


# ---------------------------------------------------------------- correctness: attribution on the evidence


class RedDetector(nn.Module):
    """A hand-set classifier: class 0 = "a red patch somewhere", class 1 = "a blue patch". Grey
    pixels (R = G = B, any brightness) and green ones carry no evidence for either class."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():  # on normalised input: red minus blue, blue minus red, at the centre tap
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1], conv.weight[0, 2, 1, 1] = 1.0, -1.0
            conv.weight[1, 2, 1, 1], conv.weight[1, 0, 1, 1] = 1.0, -1.0
            conv.bias.fill_(-0.5)  # grey and green stay below zero: R_n - B_n in [-0.4, -0.3]
        self.features = nn.Sequential(conv, nn.ReLU(inplace=True))
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2) * 20)
            self.head.bias.copy_(torch.tensor([0.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _evidence_image(size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """Textured grey background, a green distractor bottom-left, the red evidence top-right."""
    rng = np.random.default_rng(1)
    grey = rng.integers(40, 220, (size, size), dtype=np.uint8)
    pixels = np.repeat(grey[..., None], 3, axis=2)
    region = np.zeros((size, size), dtype=bool)
    region[6:30, 36:60] = True  # off the diagonal, so a swapped height/width shows
    pixels[region] = (230, 20, 25)
    pixels[40:60, 4:24] = (20, 200, 30)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), region


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_attribution_mass_lands_on_the_evidence(algorithm):
    crop, region = _evidence_image()
    explainer = make_explainer(RedDetector(), "red_detector", multilabel=False, device=torch.device("cpu"))
    pixels = (crop.float() / 255).unsqueeze(0)
    assert explainer.model(pixels)[0].argmax() == 0  # it does see the red patch
    xai = parse_xai({"xai_algorithm": algorithm, "n_steps": 8})
    mass = heat(attribute(explainer, pixels, 0, xai))
    inside, outside = mass[region].sum(), mass[~region].sum()
    assert inside > outside, (algorithm, inside, outside)


def test_explainer_sees_what_scoring_sees():
    """No off-by-255: the explainer's [0, 1] crop, normalised, gives the scoring probabilities."""
    predictor = _predictor("image_classification", "resnet18")
    image = _noise(seed=3)
    answer = predictor.score_rows([_row(image, xai_algorithm="guided_backprop")])[0]
    assert np.allclose(answer["probs"], predictor.score_rows([image])[0]["probs"], atol=1e-5)


def test_batched_integrated_gradients_equal_salienys_one_step_at_a_time():
    import saliency.core as saliency

    from explain.methods import saliency_call_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    explainer = make_explainer(model, "tiny", multilabel=False, device=torch.device("cpu"))
    x = torch.rand(3, 12, 12)
    baselines = torch.stack([torch.zeros_like(x), torch.ones_like(x)])
    with torch.enable_grad():
        ours = path_integrated_gradients(explainer.model, x, baselines, 2, n_steps=5, batch=4)
    call = saliency_call_model(explainer.model, torch.device("cpu"))
    for b, baseline in enumerate(baselines):
        theirs = saliency.IntegratedGradients().GetMask(
            x.permute(1, 2, 0).numpy().astype(np.float64), call, call_model_args={"target": 2},
            x_baseline=baseline.permute(1, 2, 0).numpy().astype(np.float64), x_steps=5, batch_size=1)
        assert np.allclose(ours[b].permute(1, 2, 0).numpy(), theirs, atol=1e-5)


# ---------------------------------------------------------------- the serving model is left alone


def test_the_scoring_model_is_not_modified():
    predictor = _predictor("image_classification", "mobilenetv2")
    before = [type(m).__name__ for m in predictor.predictor.loaded.model.modules()]
    image = _noise()
    plain = predictor.score_rows([image])[0]
    predictor.score_rows([_row(image, xai_algorithm="guided_gradcam")])
    assert [type(m).__name__ for m in predictor.predictor.loaded.model.modules()] == before
    assert any(getattr(m, "inplace", False) for m in predictor.predictor.loaded.model.modules())
    assert predictor.score_rows([image])[0] == plain


def test_vit_guided_gradcam_uses_the_patch_grid():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=3).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: nothing to explain
    explainer = make_explainer(vit, "vits16r224", multilabel=False, device=torch.device("cpu"))
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        from models.tasks.classification import normalize

        assert torch.allclose(explainer.model(pixels), torch.softmax(vit(normalize(pixels)), 1), atol=1e-6)
    for algorithm in ("guided_gradcam", "guided_backprop"):
        attr = attribute(explainer, pixels, 1, parse_xai({"xai_algorithm": algorithm}))
        assert attr.shape == (3, 32, 32) and attr.abs().sum() > 0, algorithm


# ---------------------------------------------------------------- errors


def test_bad_rows_get_errors_naming_row_and_parameter_and_others_are_answered():
    predictor = _predictor("image_classification", "resnet18")
    image = _noise()
    answers = predictor.score_rows([
        image,
        _row(image, xai_algorithm="gradcam++"),
        _row(image, xai_algorithm="integrated_gradients", n_steps=1),
        _row("not base64!!", xai_algorithm="guided_backprop"),
        _row(image, xai_algorithm="guided_backprop"),
    ])
    assert set(answers[0]) == {"probs", "labels"}
    assert answers[1]["error"]["code"] == "invalid_xai_parameters"
    assert answers[1]["error"]["message"].startswith("image 1: xai_parameters.xai_algorithm=gradcam++")
    assert answers[2]["error"]["message"].startswith("image 2: xai_parameters.n_steps=1 is out of range")
    assert answers[3]["error"]["row"] == 3 and answers[3]["error"]["code"] == "invalid_base64"
    assert set(answers[4]) == {"probs", "labels", "visualizations"}


def test_detection_models_say_explanations_are_for_classification_only():
    predictor = _predictor("image_object_detection", "fasterrcnn_resnet18_fpn")
    answer = predictor.score_rows([_row(_noise())])[0]
    assert answer["error"]["code"] == "explanations_unsupported"
    assert "classification models only" in answer["error"]["message"]
