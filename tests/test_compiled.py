"""Compiled scoring (serving.compiled): the same answers as the eager model, a clear fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # compiling takes 10-20 s on 2 CPUs


@pytest.fixture(scope="module")
def predictors(trained):
    from serving.predictor import Predictor
    from serving.scoring import Scoring

    model_dir = trained("image_classification")[0].model_dir
    return Scoring(Predictor.load(model_dir, backend="torch")), Scoring(Predictor.load(model_dir, compile=True,
                                                                                       backend="torch"))


@pytest.fixture(scope="module")
def images(trained) -> list[bytes]:
    data = trained("image_classification")[1]
    lines = [json.loads(line) for line in Path(data.train_jsonl).read_text().splitlines()]
    return [(Path(data.train_jsonl).parent / line["image_url"]).read_bytes() for line in lines]


def _probs(answers: list[dict]) -> np.ndarray:
    return np.array([a["probs"] for a in answers])


@pytest.mark.parametrize("count", [1, 3, 7, 12])
def test_compiled_classifier_scores_like_the_eager_one_for_any_batch_size(predictors, images, count):
    eager, compiled = predictors
    assert compiled.predictor.compiled and not eager.predictor.compiled
    assert np.allclose(_probs(compiled.score_bytes(images[:count])), _probs(eager.score_bytes(images[:count])),
                       atol=1e-5)


def test_an_input_of_another_size_is_scored_eagerly_without_compiling_again(predictors, images):
    eager, compiled = predictors
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    params = {"valid_resize_size": 56, "valid_crop_size": 48}
    answers = compiled.score_bytes(images[:3], params)
    assert np.allclose(_probs(answers), _probs(eager.score_bytes(images[:3], params)), atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_without_a_cpp_compiler_the_eager_model_scores(caplog):
    import torch._inductor.config as inductor_config

    from serving.compiled import compile_for_cpu

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}), \
            caplog.at_level(logging.WARNING, logger="serving.compiled"):
        assert compile_for_cpu(model, (3, 9, 11)) is model
    assert "torch.compile failed, scoring with the eager model" in caplog.text


@pytest.mark.parametrize("how", ["model_config", "environment"])
def test_the_pyfunc_compiles_when_its_model_config_asks(trained, images, predictors, how, monkeypatch):
    """`load_model(..., model_config={"compile": True})`, or for `mlflow models serve` (which loads the
    model with load_model) the environment's MLFLOW_PYFUNC_INFERENCE_CONFIG."""
    import base64

    import mlflow.pyfunc
    import pandas as pd

    model_dir = str(trained("image_classification")[0].model_dir)
    assert not mlflow.pyfunc.load_model(model_dir).unwrap_python_model().predictor.compiled
    if how == "environment":
        monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"compile": true}')
        model = mlflow.pyfunc.load_model(model_dir)
    else:
        model = mlflow.pyfunc.load_model(model_dir, model_config={"compile": True})
    assert model.unwrap_python_model().predictor.compiled
    rows = pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images[:5]]})
    assert np.allclose(_probs(model.predict(rows)), _probs(predictors[0].score_bytes(images[:5])), atol=1e-5)
