"""Locust user for a visionserve online endpoint (`POST /score`, the cloud's request format).

Run headless through `visionserve loadtest` (loadtests/run.py), or with locust's web UI:
    VISIONSERVE_IMAGES=path/to/images uv run locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

Configuration (environment variables):
  VISIONSERVE_IMAGES              folder of images (searched recursively; required). Each is read and
                                  base64-encoded once at start with `base64.encodebytes`, exactly like
                                  the cloud's client; every request picks its images at random.
  VISIONSERVE_IMAGES_PER_REQUEST  images per request (default 1)
  VISIONSERVE_API_KEY             API key; when set, requests carry `Authorization: Bearer <key>`
  VISIONSERVE_EXPLAIN_SHARE       0..1, share of requests that are explanation requests (default 0); they
                                  are named `<route> [explain]` in locust's stats
  VISIONSERVE_XAI_PARAMETERS      JSON object, the explanations' `xai_parameters` (default: scoring.md's
                                  defaults, {"xai_algorithm": "xrai", "visualizations": true, "attributions": false})
  VISIONSERVE_PARAMS              JSON object of per-request params, sent as `"params"` next to `input_data`
  VISIONSERVE_ROUTE               scoring route (default /score)
  VISIONSERVE_TIMEOUT             seconds to wait for a response (default 180, the cloud's maximum)

A response counts as a success only when it is HTTP 200 with a JSON list holding one object per image
sent, none of them with an `error` key. 429/503 (over capacity) are failures named with their status and
Retry-After.

Only this file imports locust: locust monkey-patches the process with gevent, so it must never share
a process with Ray or torch (loadtests/run.py starts it as a subprocess).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import random
import re
from pathlib import Path

from locust import HttpUser, constant, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from models.data.formats import IMAGE_EXTENSIONS, image_files

DEFAULT_XAI_PARAMETERS = {"xai_algorithm": "xrai", "visualizations": True, "attributions": False}


def _json_object(name: str, default: dict | None) -> dict | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return value


def _load_images(folder: str) -> list[str]:
    if not folder:
        raise ValueError("set VISIONSERVE_IMAGES to a folder of images")
    root = Path(folder)
    paths = image_files(root)
    if not paths:
        raise ValueError(f"VISIONSERVE_IMAGES={folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return [base64.encodebytes(p.read_bytes()).decode("utf-8") for p in paths]


IMAGES = _load_images(os.environ.get("VISIONSERVE_IMAGES", ""))
IMAGES_PER_REQUEST = int(os.environ.get("VISIONSERVE_IMAGES_PER_REQUEST") or 1)
API_KEY = os.environ.get("VISIONSERVE_API_KEY") or None
EXPLAIN_SHARE = float(os.environ.get("VISIONSERVE_EXPLAIN_SHARE") or 0)
XAI_PARAMETERS = _json_object("VISIONSERVE_XAI_PARAMETERS", DEFAULT_XAI_PARAMETERS)
PARAMS = _json_object("VISIONSERVE_PARAMS", None)
ROUTE = os.environ.get("VISIONSERVE_ROUTE") or "/score"
TIMEOUT = float(os.environ.get("VISIONSERVE_TIMEOUT") or 180)
if IMAGES_PER_REQUEST < 1:
    raise ValueError(f"VISIONSERVE_IMAGES_PER_REQUEST must be >= 1, got {IMAGES_PER_REQUEST}")
if not 0 <= EXPLAIN_SHARE <= 1:
    raise ValueError(f"VISIONSERVE_EXPLAIN_SHARE must be within 0..1, got {EXPLAIN_SHARE}")


def build_body(images: list[str], explain: bool) -> dict:
    """The cloud's request body; explanation entries are JSON strings (scoring.md, "Explanations")."""
    if explain:
        images = [json.dumps({"image_base64": b64, "model_explainability": True, "xai_parameters": XAI_PARAMETERS})
                  for b64 in images]
    body: dict = {"input_data": {"columns": ["image"], "data": images}}
    if PARAMS is not None:
        body["params"] = PARAMS
    return body


def _short_error(error) -> str:
    """`ConnectionError: [Errno 111] Connection refused` rather than urllib3's whole chain."""
    text = str(error)
    m = re.search(r"\[Errno -?\d+\][^\"')]*|Read timed out\.[^\"]*?\)|timed out", text)
    return f"{type(error).__name__}: {m.group(0) if m else text[:200]}"


def check_response(response, expected: int) -> str | None:
    """Why the response is a failure, or None when it is a good answer for `expected` images."""
    status = response.status_code
    if status == 0:
        return f"no response: {_short_error(response.error)}"
    if status in (429, 503):
        return f"HTTP {status} over capacity (Retry-After: {response.headers.get('Retry-After', 'not set')})"
    if status == 401:
        return "HTTP 401 unauthorized (check VISIONSERVE_API_KEY)"
    if status != 200:
        return f"HTTP {status}: {response.text[:200]}"
    try:
        answer = response.json()
    except ValueError:
        return f"HTTP 200 but not JSON: {response.text[:200]}"
    if not isinstance(answer, list):
        return f"HTTP 200 but not a JSON list: {response.text[:200]}"
    if len(answer) != expected:
        return f"HTTP 200 with {len(answer)} responses for {expected} images"
    for item in answer:
        if not isinstance(item, dict):
            return f"HTTP 200 with a response that is not an object: {json.dumps(item)[:200]}"
        if "error" in item:
            return f"HTTP 200 with an error item: {json.dumps(item['error'])[:200]}"
    return None


class ScoringUser(HttpUser):
    """Sends requests back to back (no think time): each user is one closed-loop client."""

    wait_time = constant(0)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task
    def score(self) -> None:
        explain = EXPLAIN_SHARE > 0 and random.random() < EXPLAIN_SHARE
        images = random.choices(IMAGES, k=IMAGES_PER_REQUEST)
        name = f"{ROUTE} [explain]" if explain else ROUTE
        with self.client.post(ROUTE, json=build_body(images, explain), name=name, timeout=TIMEOUT,
                              catch_response=True) as response:
            problem = check_response(response, len(images))
            if problem is None:
                response.success()
            else:
                response.failure(problem)


@events.quitting.add_listener
def _final_csv(environment, **_kwargs) -> None:
    """Locust rewrites its `--csv` files only once a second and not at the end, so they can miss the
    last second of a run; rewrite them from the final statistics (same columns) before it exits."""
    options = environment.parsed_options
    prefix = getattr(options, "csv_prefix", None) if options else None
    if not prefix or environment.stats is None:
        return
    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv),
                          ("_exceptions.csv", writer.exceptions_csv)):
        path = f"{prefix}{suffix}"
        with open(path + ".tmp", "w", newline="") as f:
            write(csv.writer(f))
        os.replace(path + ".tmp", path)  # a new file: locust's own writer keeps its handle on the old one
