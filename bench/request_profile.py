"""Where one request's time goes on the default `visionserve serve` layout (resnet18 at 224, one 640x480 JPEG).

    uv run python bench/request_profile.py [--seconds 20] [--repeats 200] [--py-spy]

Three views of the same request, in one run:
- steps: each step the endpoint takes, timed in this process with the functions the replica calls (median of
  `--repeats`): the client's JSON body, the body's JSON parse, the cloud's schema and base64
  (serving.contract.parse_request), the image header probe, the settings, decoding (at the size the model needs:
  JPEG draft scaling), preprocessing, the forward pass on ONNX Runtime (the folder's model.onnx, as `auto` picks on a
  CPU), the answer's format and its JSON;
- endpoint: `visionserve serve DIR` with its default flags, one client sending one request after another, then 8
  clients: images/s, latency, and the CPU milliseconds each process of the endpoint spent per request (the
  replica, HAProxy, Ray Serve's proxy and controller, the raylet, ...), against the CPU the steps above take in one
  process (`cpu_beyond_steps_ms`: what serving adds). CPU time, unlike latency, hardly changes when other work
  shares the machine: the steps are timed both ways;
- py-spy (`--py-spy`, via `uvx py-spy`): the replica process sampled during the single-client load, its samples
  grouped by what they were doing.
Writes bench/results/request_profile.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# as in an ONNX Runtime replica (serving.backends.ONNX_REPLICA_ENV): torch's threads, which only preprocess here,
# wait without spinning; set before torch is imported
os.environ.update({"OMP_WAIT_POLICY": "PASSIVE"})

from bench._common import RESULTS, table, write  # noqa: E402
from bench.inference_throughput import _folder, _jpeg  # noqa: E402
from bench.serve_throughput import BIN, load, stop_server  # noqa: E402
from models.runtime import free_port, wait_until_ready  # noqa: E402


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of `fn` (CPU: every thread of this process, ONNX Runtime's included)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        started, used = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
    return round(statistics.median(wall) * 1000, 3), round(statistics.median(cpu) * 1000, 3)


def steps(folder: Path, jpeg: bytes, repeats: int) -> list[dict]:
    """Each step of one request, timed with the replica's own functions (in this process, one thread)."""
    import torch

    from models.data.images import decode_tensor
    from serving.contract import parse_json, request_rows
    from serving.predictor import Predictor
    from serving.scoring import Scoring

    predictor = Predictor.load(folder)  # backend auto: ONNX Runtime on a CPU
    scoring = Scoring(predictor)
    body = {"input_data": {"columns": ["image"], "data": [base64.b64encode(jpeg).decode()]}}
    raw = json.dumps(body).encode()
    request = scoring.read(raw, "score")
    settings = request.settings
    image = request.entries[0].image
    ops = predictor.task.ops
    size = ops.decode_size(settings, *image.size)
    pixels = decode_tensor(jpeg, predictor.limits, "cpu", size)
    preprocess = ops.preprocess(settings)
    crop = preprocess(pixels)
    scorer = predictor.loaded.scorer
    answer = scoring.answer_now(request)
    output = scorer.predict([crop], settings)[0]
    rows = [
        ("client: json.dumps of the body", lambda: json.dumps(body).encode()),
        ("parse_json (the body's JSON)", lambda: parse_json(raw)),
        ("request_rows (schema, base64)", lambda: request_rows(parse_json(raw), "score", 64)),
        ("Scoring.read (all of the above, settings, headers)", lambda: scoring.read(raw, "score")),
        ("settings_for (per-request settings)", lambda: predictor.settings_for({})),
        (f"decode_tensor (JPEG at {size})", lambda: decode_tensor(jpeg, predictor.limits, "cpu", size)),
        ("preprocess (resize, crop, normalise)", lambda: preprocess(pixels)),
        (f"forward ({predictor.plan.engine}, batch 1)", lambda: scorer.predict([crop], settings)),
        ("format + JSON of the answer", lambda: json.dumps([ops.format(output, (224, 224), predictor.labels,
                                                                      settings)])),
        ("answer_now (decode..format, all)", lambda: scoring.answer_now(request)),
    ]
    with torch.inference_mode():
        out = [dict(zip(("step", "ms", "cpu_ms"), (name, *_median_ms(fn, repeats)))) for name, fn in rows]
    forward = next(r["cpu_ms"] for r in out if r["step"].startswith("forward"))
    for r in out:
        r["cpu_vs_forward"] = round(r["cpu_ms"] / forward, 3)
    assert answer and "probs" in answer[0]
    return out


KINDS = (("replica", "ServeReplica"), ("haproxy", "haproxy"), ("serve proxy", "ProxyActor"),
         ("serve controller", "ServeController"), ("raylet", "raylet"), ("gcs", "gcs_server"))


def _cpu_by_kind(root) -> dict[str, float]:
    """CPU seconds used so far by `root` (the `visionserve serve` process) and every process under it, by kind."""
    import psutil

    out: Counter[str] = Counter()
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            times = p.cpu_times()
        except psutil.Error:
            continue
        kind = next((k for k, match in KINDS if match in cmd), "other Ray and driver processes")
        out[kind] += times.user + times.system
    return dict(out)


def _cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    return {k: round((after.get(k, 0) - before.get(k, 0)) * 1000 / max(requests, 1), 2)
            for k in sorted(after, key=lambda k: before.get(k, 0) - after[k])}


def _threads(process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def _thread_shares(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Each of the replica's busiest threads' share of its CPU time (Ray names them all ray::IDLE: the two
    busiest are the model thread, which decodes, preprocesses and calls ONNX Runtime, and ONNX Runtime's own)."""
    used = sorted((after[k] - before.get(k, 0.0) for k in after), reverse=True)
    total = sum(used) or 1.0
    return [round(u / total, 3) for u in used[:6]]


def _py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    if shutil.which("uvx") is None:
        return None
    return subprocess.Popen(["uvx", "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--format", "raw", "--rate", "200", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


GROUPS = (  # the first group one of a sample's innermost 12 frames matches names it
    ("forward (ONNX Runtime)", r"Session\.run|OnnxScorer"),
    ("decode (Pillow)", r"decode_tensor|ImageFile|to_rgb|exif_transpose"),
    ("preprocess (torchvision)", r"torchvision/transforms|Normalize|ToDtype|Resize\.|CenterCrop"),
    ("JSON / schema / base64", r"parse_json|parse_request|decode_base64|json/|JSONResponse|pydantic"),
    ("HTTP / ASGI (body read, middleware)", r"uvicorn|h11|httptools|starlette|_body|Middleware|_direct_ingress"),
    ("Ray Serve (batcher, metrics, routing)", r"ray/serve"),
    ("asyncio", r"asyncio"),
)
NATIVE = "in native code (Ray's core worker loop, threads with no Python frame below Thread.run)"


def _spy_groups(raw: Path) -> list[dict]:
    """py-spy's samples of the replica by what they were doing (its non-idle samples only)."""
    counts: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")[::-1]
        name = next((g for g, pattern in GROUPS if any(re.search(pattern, f) for f in frames[:12])), None)
        if name is None:
            native = frames[0].startswith(("Thread.run", "Worker.main_loop"))
            name = NATIVE if native else "other"
        counts[name] += int(n)
    total = sum(counts.values()) or 1
    return [{"doing": k, "share": round(v / total, 3), "samples": v} for k, v in counts.most_common()]


def endpoint(folder: Path, jpeg: bytes, seconds: float, spy: bool, workdir: Path) -> dict:
    """The default `visionserve serve`: client latency vs the replica's handler time, at 1 and 8 clients."""
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = workdir / "serve.log"
    proc = subprocess.Popen([str(BIN / "visionserve"), "serve", str(folder), "--port", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(f"{url}/health/ready", proc, log, timeout=600)
        bodies = [{"input_data": {"columns": ["image"], "data": [base64.b64encode(jpeg).decode()]}}]
        load(f"{url}/score", bodies, 2, 3)  # warm-up
        replica = next(p for p in psutil.process_iter(["cmdline"]) if "ServeReplica" in " ".join(p.info["cmdline"]
                                                                                                  or []))
        out: dict = {"layout": next((line for line in log.read_text().splitlines() if line.startswith("layout")), "")}
        spy_out = workdir / "replica.spy"
        root = psutil.Process(proc.pid)
        for concurrency in (1, 8):  # CPU per request, by process: what a shared machine's load does not change much
            before, threads = _cpu_by_kind(root), _threads(replica)
            row = load(f"{url}/score", bodies, concurrency, seconds)
            row["cpu_ms_per_request"] = _cpu_per_request(before, _cpu_by_kind(root), row["requests"])
            row["replica_threads_cpu_share"] = _thread_shares(threads, _threads(replica))
            out[f"c{concurrency}"] = row
        spying = _py_spy(replica.pid, seconds, spy_out) if spy else None
        load(f"{url}/score", bodies, 1, seconds)  # what py-spy samples
        if spying is not None:
            spying.wait(timeout=seconds + 60)
            out["py_spy"] = _spy_groups(spy_out) if spy_out.exists() else "py-spy wrote nothing"
            if spy_out.exists():
                shutil.copy(spy_out, RESULTS / "request_profile.spy.txt")  # the raw stacks, for a closer look
        return out
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--py-spy", action="store_true", help="sample the replica with py-spy (uvx py-spy)")
    args = parser.parse_args()
    jpeg = _jpeg(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, _, _ = _folder("resnet18", Path(tmp))
        rows = steps(folder, jpeg, args.repeats)
        print(table(rows, ["step", "ms", "cpu_ms", "cpu_vs_forward"]), flush=True)
        served = endpoint(folder, jpeg, args.seconds, args.py_spy, Path(tmp))
    steps_cpu = sum(r["cpu_ms"] for r in rows if r["step"].startswith(("parse_request", "probe_images",
                                                                        "predict_bytes")))
    served["steps_cpu_ms"] = round(steps_cpu, 2)
    for level in ("c1", "c8"):  # CPU the endpoint spends per request beyond the replica's own steps
        cpu = served[level]["cpu_ms_per_request"]
        served[level]["cpu_ms_total"] = round(sum(cpu.values()), 2)
        served[level]["cpu_beyond_steps_ms"] = round(sum(cpu.values()) - steps_cpu, 2)
    print(json.dumps(served, indent=2))
    print(f"\nwritten {write('request_profile', {'steps': rows, 'endpoint': served})}")


if __name__ == "__main__":
    main()
