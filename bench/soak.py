"""Soak: does a replica's memory stay flat under steady load?

    uv run python bench/soak.py [--case resnet18|fasterrcnn_resnet18_fpn] [--users 8] [--warmup 60s] [--duration 5m]

One model (random weights; memory does not depend on them) served by `visionserve serve` (one replica),
loaded by a headless locust run (`loadtests.run.run_loadtest`, `--users` clients sending requests of one
to two 640x480 JPEGs back to back) for `--warmup`, then for `--duration`. The replica's resident memory
is sampled every `--every` seconds. Baseline: its memory at the end of the warm-up. Target: every
sample of the measured run within 10 % of it. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table, write  # noqa: E402
from bench.inference_throughput import CASES, _folder, _jpeg  # noqa: E402
from bench.serve_throughput import _rss_mb, stop_server  # noqa: E402
from loadtests.run import parse_duration, run_loadtest  # noqa: E402
from models.runtime import free_port, wait_until_ready  # noqa: E402

BIN = Path(sys.executable).parent
TARGET = 0.10


def _replica(cmd: str) -> bool:
    return "ServeReplica:visionserve:" in cmd  # this endpoint's replica only


def _load_while_sampling(url: str, images: Path, args, duration: str, out: Path) -> tuple[dict, list[float]]:
    """Run locust for `duration` in a thread; sample the replica's RSS meanwhile."""
    result: dict = {}

    def load() -> None:
        summary = run_loadtest(url, images, users=args.users, spawn_rate=args.users, duration=duration,
                               images_per_request=args.images_per_request, out_dir=out, echo=False)
        result.update(requests=summary.total.requests, failures=summary.total.failures,
                      rps=round(summary.total.requests / parse_duration(duration), 2))

    thread = threading.Thread(target=load)
    thread.start()
    samples = []
    while thread.is_alive():
        samples.append(_rss_mb(_replica))
        thread.join(args.every)
    return result, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="resnet18")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--images-per-request", type=int, default=2)
    parser.add_argument("--warmup", default="60s")
    parser.add_argument("--duration", default="5m")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="visionserve-soak-"))
    folder = _folder(args.case, workdir)[0]
    images = workdir / "images"
    images.mkdir()
    for seed in range(8):
        (images / f"{seed}.jpg").write_bytes(_jpeg(seed))
    port = free_port()
    log = workdir / "serve.log"
    proc = subprocess.Popen([str(BIN / "visionserve"), "serve", str(folder), "--port", str(port), "--replicas", "1"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/health/ready", proc, log, timeout=600)
        print(f"warm-up: {args.warmup} at {args.users} users", flush=True)
        warm, warm_samples = _load_while_sampling(url, images, args, args.warmup, workdir / "warmup")
        baseline = _rss_mb(_replica)
        print(f"replica after warm-up: {baseline:.0f} MB; soak: {args.duration}", flush=True)
        soak, samples = _load_while_sampling(url, images, args, args.duration, workdir / "soak")
        final = _rss_mb(_replica)
    finally:
        stop_server(proc)
    samples.append(final)
    peak = max(samples)
    row = {"case": args.case, "users": args.users, "warmup": args.warmup, "duration": args.duration,
           "requests": soak["requests"], "failures": soak["failures"], "requests_per_s": soak["rps"],
           "warmup_requests": warm["requests"], "baseline_mb": baseline, "peak_mb": peak, "final_mb": final,
           "min_mb": min(samples), "peak_over_baseline": round(peak / baseline - 1, 4),
           "final_over_baseline": round(final / baseline - 1, 4)}
    row["within_target"] = abs(row["peak_over_baseline"]) <= TARGET and min(samples) >= baseline * (1 - TARGET)
    print(table([row], ["case", "users", "duration", "requests", "failures", "requests_per_s", "baseline_mb",
                        "peak_mb", "final_mb", "peak_over_baseline", "within_target"]))
    path = write("soak", {"target_within": TARGET, "rows": [row], "samples_mb": samples,
                          "warmup_samples_mb": warm_samples})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
