"""Compatibility with MLflow's own scoring server: a real `mlflow models serve` process per task."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import TASKS, free_port
from models.runtime import wait_until_ready

pytestmark = pytest.mark.slow

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """`served(task)` → (base URL, synthetic data) of `mlflow models serve` running that task's model; the
    four servers start side by side."""
    processes, urls = {}, {}
    env = {**os.environ, "PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its uvicorn
    for task in TASKS:
        result, data = trained(task)
        port = free_port()
        log = tmp_path_factory.mktemp("mlflow-serve") / "server.log"
        processes[task] = (subprocess.Popen([MLFLOW, "models", "serve", "-m", str(result.model_dir), "--env-manager",
                                             "local", "-h", "127.0.0.1", "-p", str(port)], stdout=log.open("w"),
                                            stderr=subprocess.STDOUT, env=env), log)
        urls[task] = (f"http://127.0.0.1:{port}", data)

    def get(task: str):
        proc, log = processes[task]
        wait_until_ready(f"{urls[task][0]}/ping", proc, log, timeout=180)
        return urls[task]

    yield get
    for proc, _ in processes.values():
        proc.terminate()
        proc.wait(timeout=30)


def _images(data, n: int = 2) -> list[str]:
    lines = [json.loads(line) for line in Path(data.train_jsonl).read_text().splitlines()][:n]
    return [base64.encodebytes((Path(data.train_jsonl).parent / line["image_url"]).read_bytes()).decode("utf-8")
            for line in lines]


@pytest.mark.parametrize("task", TASKS)
def test_dataframe_split_request_gets_the_spec_response(served, task):
    url, data = served(task)
    body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in _images(data)]}}
    response = httpx.post(f"{url}/invocations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    if "classification" in task:
        assert all(set(p) == {"probs", "labels"} and len(p["probs"]) == len(data.labels) for p in predictions)
    else:
        assert all(set(p) == {"boxes"} and p["boxes"] for p in predictions)
        keys = {"box", "label", "score"} | ({"polygon"} if task == "image_instance_segmentation" else set())
        assert all(set(b) == keys for p in predictions for b in p["boxes"])


def test_params_are_forwarded_per_request(served):
    url, data = served("image_object_detection")
    rows = [[b] for b in _images(data, 1)]
    plain = httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": rows}},
                       timeout=120).json()["predictions"][0]
    capped = httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": rows},
                                                    "params": {"box_score_thresh": 0.01, "box_detections_per_img": 2}},
                        timeout=120).json()["predictions"][0]
    assert len(capped["boxes"]) == 2 and len(plain["boxes"]) >= 1
    assert all(b["score"] >= 0.3 for b in plain["boxes"])


def test_bad_params_are_a_400_naming_them(served):
    url, data = served("image_object_detection")
    rows = [[b] for b in _images(data, 1)]
    response = httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": rows},
                                                      "params": {"tile_grid_size": "1x1"}}, timeout=120)
    assert response.status_code == 400
    assert "tile_grid_size" in response.text and "Traceback" not in response.text
