"""bench/gpu.py, the GPU check kept ready for the day a GPU is lent: its flags are checked before anything runs,
and without CUDA it writes JSON saying so and exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def _run(*args: str, cuda: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # as a machine without a GPU (this one has none anyway)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_without_cuda_it_writes_json_saying_so_and_exits_cleanly(tmp_path):
    output = tmp_path / "results" / "gpu.json"
    done = _run("--output", str(output), "--sections", "environment", "serve", cuda=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    assert result["cuda"]["available"] is False and "no CUDA device" in result["cuda"]["reason"]
    assert result["sections"] == {"environment": {"skipped": "no CUDA device"}, "serve": {"skipped": "no CUDA device"}}
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, named", [
    (["--time-limit", "5"], "--time-limit 5: expected a number from 10 to 3600"),
    (["--time-limit", "soon"], "--time-limit 'soon': expected a number"),
    (["--time-limit", "nan"], "--time-limit nan: expected a number from 10 to 3600"),
    (["--seconds", "0"], "--seconds 0: expected a number from 1 to 120"),
    (["--seconds", "1e9"], "--seconds 1e9: expected a number from 1 to 120"),
    (["--sections", "everything"], "argument --sections: invalid choice: 'everything'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--output", "/proc/no-such-folder/gpu.json"], "--output /proc/no-such-folder/gpu.json: cannot be written"),
    (["--unknown"], "unrecognized arguments: --unknown"),
])
def test_bad_flags_are_refused_before_anything_runs_naming_the_flag(args, named, tmp_path, capsys):
    from bench.gpu import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(args if args[0] == "--output" else ["--output", str(tmp_path / "gpu.json"), *args])
    assert exited.value.code == 2 and named in capsys.readouterr().err


def test_a_section_that_fails_or_overruns_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    from bench import gpu

    run = gpu.Run(gpu.parse_args(["--output", str(tmp_path / "gpu.json"), "--time-limit", "10", "--device", "cpu"]))

    def broken(_):
        raise RuntimeError("no such kernel\nsecond line")

    def slow(_):
        time.sleep(60)

    gpu.run_section(run, "environment", broken)
    monkeypatch.setitem(gpu.MIN_SECONDS, "nvjpeg", 1)
    gpu.run_section(run, "nvjpeg", slow)  # stopped by the global time limit (10 s)
    gpu.run_section(run, "serve", lambda _: {"ran": True})  # no time left for it: skipped, in words
    result = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    assert result["environment"]["error"] == "RuntimeError: no such kernel"
    assert result["nvjpeg"]["error"].startswith("SectionTimeout") and result["nvjpeg"]["seconds"] <= 12
    assert result["serve"]["skipped"].startswith("time limit")
    run.workdir.rmdir()


def test_its_sections_run_on_the_cpu_where_the_script_is_checked(tmp_path):
    """--device cpu: the environment, pooled tiles and D-RISE (through the Predictor, a box the request names) run
    for real, on small inputs."""
    output = tmp_path / "gpu.json"
    done = _run("--device", "cpu", "--output", str(output), "--sections", "environment", "tiles", "d_rise",
                cuda=False)
    assert done.returncode == 0, done.stderr[-2000:]
    sections = json.loads(output.read_text())["sections"]
    assert "CPUExecutionProvider" in sections["environment"]["onnxruntime_providers"]
    assert sections["environment"]["nvjpeg"]["available"] is True  # decode_jpeg, here on the CPU
    assert sections["tiles"]["pooled_images_per_s"] > 0 and sections["tiles"]["one_at_a_time_images_per_s"] > 0
    assert sections["d_rise"]["masks_used"] == 8 and "error" not in sections["d_rise"], sections["d_rise"]
    assert not list(Path(tempfile.gettempdir()).glob("visionserve-gpu-*"))  # its models are removed
