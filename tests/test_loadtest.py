"""The load-test runner and locustfile against a stand-in scoring server (FastAPI in a subprocess).
locust itself only ever runs in a subprocess: it monkey-patches with gevent. The runs against the
stand-in are marked slow (about 20 s in all)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from PIL import Image

from loadtests.run import LoadtestError, add_loadtest_command, parse_duration, run_loadtest

KEY = "test-key"

STANDIN = textwrap.dedent('''
    """Stand-in for the scoring endpoint: /score in the cloud's format, one answer per image."""
    import base64, json, sys
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    KEY = sys.argv[2]
    app = FastAPI()
    state = {"received": [], "fail_every": 0, "count": 0}

    @app.get("/health/ready")
    def ready():
        return {"status": "ready"}

    @app.post("/_control")
    async def control(request: Request):
        state.update(await request.json(), received=[], count=0)
        return {}

    @app.get("/_received")
    def received():
        return state["received"]

    @app.post("/score")
    async def score(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        state["count"] += 1
        if state["fail_every"] and state["count"] % state["fail_every"] == 0:
            return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": "1"})
        body = await request.json()
        rows, explained = body["input_data"]["data"], []
        for row in rows:
            if row.lstrip().startswith("{"):
                entry = json.loads(row)
                explained.append(entry)
                row = entry["image_base64"]
            base64.b64decode(row)  # encodebytes output (with newlines) decodes
        state["received"].append({"images": len(rows), "explain": explained, "params": body.get("params"),
                                  "newlines": all("\\n" in (json.loads(r)["image_base64"] if r.startswith("{") else r)
                                                  for r in rows)})
        return [{"probs": [0.25, 0.75], "labels": ["cat", "dog"]} for _ in rows]

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    (root / "standin.py").write_text(STANDIN)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(root / "standin.py"), str(port), KEY])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the stand-in server did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def control(url: str, **state) -> None:
    httpx.post(f"{url}/_control", json={"fail_every": 0, **state}).raise_for_status()


def received(url: str) -> list[dict]:
    return httpx.get(f"{url}/_received").json()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):  # big enough for encodebytes to insert newlines
        Image.effect_noise((64, 48), 40 + i * 10).convert("RGB").save(folder / f"{i}.png")
    return folder


@pytest.mark.slow  # starts a server and runs locust for a few seconds
def test_clean_run(server, images, tmp_path, capsys):
    control(server)
    summary = run_loadtest(server, images, users=2, spawn_rate=2, duration="5s", api_key=KEY, out_dir=tmp_path)
    assert summary.ok and summary.failures == 0 and summary.locust_exit_code == 0
    assert summary.requests > 10 and summary.rps > 0
    assert None not in (summary.p50_ms, summary.p95_ms, summary.p99_ms)
    assert summary.p50_ms <= summary.p95_ms <= summary.p99_ms
    assert [r.name for r in summary.rows] == ["/score"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["requests"] == summary.requests and saved["total"]["name"] == "Aggregated"
    assert (tmp_path / "report.html").stat().st_size > 0
    # locust's CSV is final (the locustfile rewrites it at exit): the server saw every request counted
    seen = received(server)
    assert abs(len(seen) - summary.requests) <= 2  # requests in flight when the users were stopped
    assert all(r["images"] == 1 and not r["explain"] and r["params"] is None and r["newlines"] for r in seen)
    out = capsys.readouterr().out
    assert "Aggregated" in out and "p95 ms" in out


@pytest.mark.slow  # starts a server and runs locust for a few seconds
def test_wrong_api_key_is_reported(server, images, tmp_path, capsys):
    control(server)
    parser = argparse.ArgumentParser()
    add_loadtest_command(parser.add_subparsers(dest="command"))
    (tmp_path / "key").write_text("wrong-key\n")
    args = parser.parse_args(["loadtest", "--host", server, "--images", str(images), "--users", "1",
                              "--duration", "2s", "--api-key-file", str(tmp_path / "key"),
                              "--out", str(tmp_path / "report")])
    assert args.func(args) == 1
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == summary["requests"] and summary["failure_pct"] == 100
    assert summary["locust_exit_code"] != 0 and not summary["ok"]
    assert [e["error"] for e in summary["errors"]] == ["HTTP 401 unauthorized (check VISIONSERVE_API_KEY)"]
    assert "HTTP 401" in capsys.readouterr().out
    assert received(server) == []


@pytest.mark.slow  # starts a server and runs locust for a few seconds
def test_explanations_get_their_own_row_and_params_are_sent(server, images, tmp_path):
    control(server)
    summary = run_loadtest(server, images, users=2, duration="3s", api_key=KEY, explain_share=0.5,
                           params={"box_score_thresh": 0.5}, out_dir=tmp_path, echo=False)
    assert summary.ok
    rows = {r.name: r for r in summary.rows}
    assert set(rows) == {"/score", "/score [explain]"}
    assert rows["/score"].requests > 0 and rows["/score [explain]"].requests > 0
    assert summary.requests == rows["/score"].requests + rows["/score [explain]"].requests
    seen = received(server)
    explained = [e for r in seen for e in r["explain"]]
    assert explained and all(e["model_explainability"] is True and e["xai_parameters"] ==
                             {"xai_algorithm": "xrai", "visualizations": True, "attributions": False}
                             for e in explained)
    assert all(r["params"] == {"box_score_thresh": 0.5} for r in seen)


@pytest.mark.slow  # starts a server and runs locust for a few seconds
def test_images_per_request(server, images, tmp_path):
    control(server)
    summary = run_loadtest(server, images, users=2, duration="2s", api_key=KEY, images_per_request=3,
                           out_dir=tmp_path, echo=False)
    assert summary.ok
    seen = received(server)
    assert seen and {r["images"] for r in seen} == {3}
    assert json.loads((tmp_path / "summary.json").read_text())["images_per_s"] == pytest.approx(3 * summary.rps)


@pytest.mark.slow  # starts a server and runs locust for a few seconds
def test_over_capacity_is_a_named_failure(server, images, tmp_path):
    control(server, fail_every=3)
    summary = run_loadtest(server, images, users=2, duration="2s", api_key=KEY, out_dir=tmp_path, echo=False)
    assert not summary.ok and 0 < summary.failures < summary.requests
    assert [e["error"] for e in summary.errors] == ["HTTP 503 over capacity (Retry-After: 1)"]


def test_locust_that_cannot_start_raises(images, tmp_path, monkeypatch):
    broken = tmp_path / "locustfile.py"
    broken.write_text("raise ValueError('broken locustfile')\n")
    monkeypatch.setattr("loadtests.run.LOCUSTFILE", broken)
    with pytest.raises(LoadtestError, match=r"(?s)wrote no statistics.*broken locustfile"):
        run_loadtest("http://127.0.0.1:9", images, duration="1s", out_dir=tmp_path / "out", echo=False)


def test_argument_checks(images, tmp_path):
    assert parse_duration("30s") == 30 and parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    for bad in ("", "30x", "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError, match="no images"):
        run_loadtest("http://127.0.0.1:9", tmp_path, echo=False)
    with pytest.raises(ValueError, match="explain_share"):
        run_loadtest("http://127.0.0.1:9", images, explain_share=2, echo=False)


def test_runner_does_not_import_locust():
    code = "import sys, loadtests.run; assert not {'locust', 'gevent'} & set(sys.modules), 'locust imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
