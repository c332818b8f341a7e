"""`visionserve serve` as a user runs it: its own local Ray instance, HAProxy on the port, Ctrl-C to stop."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import free_port
from models.runtime import wait_until_ready

VISIONSERVE = str(Path(sys.executable).parent / "visionserve")


def _listener(proc: subprocess.Popen, port: int, tries: int = 10) -> str:
    """The command line of the process (among `proc`'s descendants) that listens on `port` (HAProxy
    hands its sockets from process to process as replicas come and go: asked again a moment later)."""
    for _ in range(tries):
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                       for c in child.net_connections("tcp")):
                    return " ".join(child.cmdline())
            except psutil.Error:
                continue
        time.sleep(1)
    return ""


@pytest.mark.parametrize("flags, cpus", [
    ([], os.cpu_count()), (["--replicas", "2"], (os.cpu_count() or 1) / 2), (["--cpus-per-replica", "0.5"], 0.5),
    (["--autoscale", "1:4"], 1.0), (["--gpus-per-replica", "0.5"], 1.0), (["--address", "ray://head:10001"], 1.0),
])
def test_replicas_share_the_local_cpus_unless_told(flags, cpus, monkeypatch):
    from serving.cli import build_parser
    from serving.cli.serve import deployment_options

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    options = deployment_options(build_parser().parse_args(["serve", "model", *flags]))
    assert options["ray_actor_options"]["num_cpus"] == pytest.approx(cpus)


def test_onnx_runtime_replicas_let_torchs_threads_wait_without_spinning(monkeypatch):
    """Their torch runs only the preprocessing; its spinning OpenMP threads would take the CPUs from ONNX
    Runtime's (measured in serving/backends.py: 29.0 -> 22.4 ms per image)."""
    from serving.cli import build_parser
    from serving.cli.serve import deployment_options

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = build_parser().parse_args(["serve", "model"])
    from serving.backends import ScoringPlan

    assert deployment_options(args, ScoringPlan("onnx", False, "cpu"))["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    assert "runtime_env" not in deployment_options(args, ScoringPlan("torch", False, "cpu"))["ray_actor_options"]


def _start(result, port: int, log: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([VISIONSERVE, "serve", str(result.model_dir), "--port", str(port), *flags],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()



@pytest.mark.parametrize("command", ["serve", "hub"])
@pytest.mark.parametrize("flag, value", [("--max-batch-size", "0"), ("--max-request-mb", "-1"),
                                         ("--max-images-per-request", "0"), ("--max-image-mb", "0"),
                                         ("--batch-wait-ms", "-5"), ("--max-concurrent-explanations", "0"),
                                         ("--explanation-timeout-s", "0")])
def test_scoring_flags_out_of_range_are_refused_naming_the_flag_before_anything_starts(command, flag, value, tmp_path,
                                                                                       capsys):
    """The limits both servers share (serving.cli.flags.SCORING_FLAGS): refused before a model is read or Ray
    starts, the flag named, exit code 2."""
    from serving.cli import main

    target = [str(tmp_path / "no-such-model")] if command == "serve" else ["--state-dir", str(tmp_path / "state")]
    assert main([command, *target, flag, value]) == 2
    error = capsys.readouterr().err
    assert f"{flag} {float(value):g}: must be" in error and "Traceback" not in error
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("value", ["0", "-64", "nan", "inf", "-inf", "lots"])
def test_a_bad_model_memory_budget_is_refused_naming_the_flag_before_anything_starts(value, tmp_path, capsys):
    from serving.cli import main

    try:
        code = main(["hub", "--state-dir", str(tmp_path / "state"), "--model-memory-mb", value])
    except SystemExit as exc:  # argparse refuses what is not a number
        code = exc.code
    assert code == 2
    error = capsys.readouterr().err
    assert "--model-memory-mb" in error and "Traceback" not in error
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("value, named", [
    ("gpu_pool", "expected NAME=AMOUNT"), ("gpu_pool=0", "positive number"), ("gpu_pool=-1", "positive number"),
    ("gpu_pool=nan", "positive number"), ("gpu_pool=inf", "positive number"), ("gpu_pool=lots", "positive number"),
    ("CPU=1", "custom resource's name"), ("GPU=1", "custom resource's name"), ("=1", "custom resource's name"),
    ("node:10.0.0.1=1", "custom resource's name")])
def test_a_bad_training_resource_is_refused_naming_the_flag_before_anything_starts(value, named, tmp_path, capsys):
    from serving.cli import main

    assert main(["hub", "--state-dir", str(tmp_path / "state"), "--training-resources", value]) == 2
    error = capsys.readouterr().err
    assert "--training-resources" in error and named in error and "Traceback" not in error
    assert not (tmp_path / "state").exists()


def test_a_serve_config_with_a_bad_training_resource_is_refused_naming_the_field(tmp_path):
    from serving.hub.app import build_hub

    with pytest.raises(ValueError, match="training_resources gpu_pool='many'"):
        build_hub({"state_dir": str(tmp_path / "state"), "training_resources": {"gpu_pool": "many"}})
    assert not (tmp_path / "state").exists()  # refused before anything is written


@pytest.mark.slow
def test_serve_command_answers_through_haproxy_and_stops_on_ctrl_c(trained, tmp_path, ray_session):
    """Beside it, a second `visionserve serve` on the same machine (its own Ray instance and HAProxy), on the
    default backend (ONNX Runtime for a classifier on CPUs): both answer, each says its layout as it starts, and
    stopping one leaves the other serving. Both are started by a process that has a local Ray instance of its
    own (ray_session), whose ports they must not inherit."""
    result, data = trained("image_classification")
    port, log = free_port(), tmp_path / "serve.log"
    other_port, other_log = free_port(), tmp_path / "other.log"
    proc = _start(result, port, log, "--replicas", "2", "--cpus-per-replica", "0.5", "--backend", "torch",
                  "--no-compile")  # tests/test_serve.py has a compiled one
    other = _start(result, other_port, other_log, "--cpus-per-replica", "0.5")  # the default backend
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/health/ready", proc, log)
        wait_until_ready(f"http://127.0.0.1:{other_port}/health/ready", other, other_log)
        line = json.loads(Path(data.train_jsonl).read_text().splitlines()[0])
        image = base64.b64encode((Path(data.train_jsonl).parent / line["image_url"]).read_bytes()).decode()
        body = {"input_data": {"columns": ["image"], "data": [image]}}
        answer = httpx.post(f"http://127.0.0.1:{port}/score", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert set(answer.json()[0]) == {"probs", "labels"} and answer.headers["x-request-id"]
        assert httpx.get(f"http://127.0.0.1:{port}/metadata").json()["compiled"] is False
        assert "haproxy" in _listener(proc, port)  # HAProxy has the port and sends requests straight to replicas
        from serving.loading import ModelFolder

        planned = ModelFolder.open(result.model_dir).plan("auto", "cpu", None)  # INT8 when its record allows
        assert planned.backend in ("onnx", "onnx-int8")
        assert httpx.get(f"http://127.0.0.1:{other_port}/metadata").json()["backend"] == planned.backend
        assert ("layout: 2 replicas x 0.5 CPUs each, scoring on torch; change with --replicas, --cpus-per-replica, "
                "--backend") in log.read_text()
        assert (f"layout: 1 replica x 0.5 CPUs each, scoring on {planned.engine} ({planned.why}); change with "
                "--replicas") in other_log.read_text()
        from_onnx = httpx.post(f"http://127.0.0.1:{other_port}/score", json=body, timeout=60)
        assert from_onnx.status_code == 200 and from_onnx.json()[0]["labels"] == answer.json()[0]["labels"]
        other.send_signal(signal.SIGINT)
        assert other.wait(timeout=90) == 0, other_log.read_text()[-3000:]
        assert httpx.post(f"http://127.0.0.1:{port}/score", json=body, timeout=60).status_code == 200

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        assert "shutting down the endpoint" in log.read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5)
    finally:
        _stop(proc)
        _stop(other)


@pytest.mark.slow
def test_hub_command_answers_the_image_analysis_routes_and_stops_on_ctrl_c(tmp_path):
    port, log, state = free_port(), tmp_path / "hub.log", tmp_path / "state"
    proc = subprocess.Popen([VISIONSERVE, "hub", "--state-dir", str(state), "--port", str(port),
                             "--model-cpus", "0.25"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/health/ready", proc, log)
        deadline = time.monotonic() + 60  # ready answers a moment before serve.run returns and the line is printed
        while f"visionserve hub at http://127.0.0.1:{port}" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        listed = httpx.get(f"http://127.0.0.1:{port}/computervision/datasets", params={"api-version": "2023-04-01-preview"})
        assert listed.status_code == 200 and listed.json()["value"] == [], listed.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "shutting down the hub" in log.read_text() and state.is_dir()
    finally:
        _stop(proc)


def test_only_a_detector_on_torch_on_cpus_scores_batches_side_by_side():
    from serving.backends import plan

    assert plan("auto", "detection", "cpu", True).side_by_side
    assert plan("torch", "segmentation", "cpu", False).side_by_side
    assert not plan("onnx", "detection", "cpu", True).side_by_side  # ONNX Runtime's threads are fixed per session
    assert not plan("auto", "detection", "cuda", True).side_by_side
    assert not plan("torch", "classification", "cpu", True, compile=False).side_by_side
