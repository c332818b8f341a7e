"""The GPU check: what one GPU gives, measured from a fresh clone after `uv sync`, in under 8 minutes.

    uv run python bench/gpu.py [--output bench/results/gpu.json] [--time-limit 420] [--sections ...] [--seconds 10]

Everything it uses is made here (random-weight models: speed does not depend on the weights; synthetic JPEGs;
nothing is downloaded). Sections, each in its own try: a failure is recorded in the JSON as its error and the
next section runs; the JSON is rewritten after every section, so a run cut short still leaves what it measured:
- environment: CUDA, the device, torch / torchvision / onnxruntime versions and ONNX Runtime's providers, and
  whether nvJPEG decodes (torchvision.io.decode_jpeg on device="cuda");
- nvjpeg: 640x480 JPEGs decoded per second by Pillow on the CPU, by nvJPEG one at a time (what a serve replica
  does today: models.data.images.decode_tensor on the replica's GPU) and by nvJPEG in batches;
- forward: resnet50 at 224 in the process, FP32 and FP16 (channels_last), batch 1 and 64, images/s;
- onnxruntime_cuda: the exported resnet50 model.onnx on ONNX Runtime's CUDA provider vs torch FP32, batch 1 and 64
  ("not available" with the reason when the installed onnxruntime has no CUDA provider);
- detector: fasterrcnn_resnet50_fpn on one 640x480 image (min_size 600 / max_size 1333), FP32 and FP16, s/image;
- tiles: the detector tiled 3x2 on four 1600x1200 images in one call (their tiles pooled, as the endpoint's
  batcher pools concurrent requests) vs one image at a time, images/s;
- xrai: seconds per XRAI explanation of resnet50 at 224 (the spec's defaults: 50 steps);
- d_rise: seconds per D-RISE explanation (1000 masks, a box the request names) through the Predictor;
- serve: `visionserve serve` on the resnet50 folder in FP16 (settings.json half_precision), one replica with the
  GPU, one 640x480 JPEG per `POST /score`, at concurrency 1 and 64 (images/s, p50, p99; the clients run in 4
  processes), and the GPU memory each replica process holds (nvidia-smi).
Without CUDA it writes JSON saying so and exits 0. A global `--time-limit` bounds the whole run: a section that
would start with too little time left is skipped (and says so), one that overruns is stopped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
SECTIONS = ("environment", "nvjpeg", "forward", "onnxruntime_cuda", "detector", "tiles", "xrai", "d_rise", "serve")
# seconds a section needs at least: it is skipped when less is left
MIN_SECONDS = {"environment": 5, "nvjpeg": 20, "forward": 30, "onnxruntime_cuda": 30, "detector": 30, "tiles": 30,
               "xrai": 30, "d_rise": 30, "serve": 120}
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "gpu.json"


class SectionTimeout(BaseException):
    """The global time limit ran out during a section (a BaseException: a section's own `except Exception`, which
    records a failed measurement and goes on, does not swallow it)."""


def _bounded(flag: str, low: float, high: float, kind: type = float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{flag} {text}: expected a number from {low:g} to {high:g}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON file written")
    parser.add_argument("--time-limit", type=_bounded("--time-limit", 10, 3600), default=420.0,
                        help="seconds for the whole run (default 420: under 8 minutes with start-up)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"which sections run (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--seconds", type=_bounded("--seconds", 1, 120), default=10.0,
                        help="seconds of load per concurrency level in the serve section")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run every section on the CPU with batches and concurrency of 4 instead of 64, to "
                             "check the script on a machine without a GPU (its figures mean nothing)")
    args = parser.parse_args(argv)
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a"):
            pass
    except OSError as exc:
        parser.error(f"--output {args.output}: cannot be written ({exc.strerror or exc})")
    return args


class Run:
    """The results so far, the deadline, and the models the sections share (made on first use)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.time_limit
        self.results: dict[str, Any] = {"benchmark": "gpu", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                        "time_limit_s": args.time_limit, "sections": {}}
        self.workdir = Path(tempfile.mkdtemp(prefix="visionserve-gpu-"))
        self.cache: dict[str, Any] = {}
        import torch

        self.device = torch.device(args.device)
        self.big = 64 if args.device == "cuda" else 4  # the large batch and the high concurrency

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.results["elapsed_s"] = round(self.args.time_limit - self.left(), 1)
        part = self.args.output.with_name(self.args.output.name + ".part")
        part.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(part, self.args.output)

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def _on_alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout("the global --time-limit ran out during this section")


def run_section(run: Run, name: str, fn: Callable[[Run], dict]) -> None:
    left = run.left()
    if left < MIN_SECONDS[name]:
        run.results["sections"][name] = {"skipped": f"time limit: {left:.0f} s left, the section needs "
                                                    f"{MIN_SECONDS[name]} s"}
        run.write()
        return
    started = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, left))
    try:
        result = fn(run)
    except BaseException as exc:  # noqa: BLE001  (every failure is this section's, recorded; the next one runs)
        if isinstance(exc, KeyboardInterrupt):
            raise
        result = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}",
                  "traceback": traceback.format_exc().splitlines()[-8:]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    result["seconds"] = round(time.monotonic() - started, 1)
    run.results["sections"][name] = result
    print(f"{name}: {json.dumps(result, default=str)[:400]}", flush=True)
    run.write()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    import torch

    from bench import _gpu_sections as sections

    cuda = torch.cuda.is_available()
    run.results["cuda"] = {"available": cuda, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    run.results["device"] = args.device
    if not cuda and args.device == "cuda":
        run.results["cuda"]["reason"] = ("torch sees no CUDA device (torch.cuda.is_available() is False): nothing "
                                         "measured")
        run.results["sections"] = {name: {"skipped": "no CUDA device"} for name in args.sections}
        run.write()
        run.workdir.rmdir()
        print(f"no CUDA device: wrote {args.output}")
        return 0
    try:
        for name in args.sections:
            run_section(run, name, getattr(sections, name))
    finally:
        sections.cleanup(run)
        run.write()
    print(f"wrote {args.output}")
    return 0


def jpeg(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A smooth random 640x480 JPEG (what a camera frame compresses like, more or less)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def clients(url: str, concurrency: int, start_at: float, seconds: float, bodies: list[dict]) -> list[float]:
    """Latencies (s; NaN: a failed request) of `concurrency` threads posting `bodies` in turn from the wall-clock
    time `start_at` for `seconds` (one client process of the serve section; light: it runs in fresh processes)."""
    import threading

    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = k
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    ok = client.post(url, json=bodies[i % len(bodies)]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - started if ok else float("nan"))
                i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def nvidia_smi() -> list[dict[str, Any]]:
    """GPU memory of each process on the GPU (nvidia-smi), MiB."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True)
    rows = []
    for line in out.stdout.strip().splitlines():
        pid, name, used = (part.strip() for part in line.split(",", 2))
        rows.append({"pid": int(pid), "process": name, "used_mib": float(used)})
    return rows


if __name__ == "__main__":
    sys.exit(main())
