"""The sections of bench/gpu.py: each takes the run (bench.gpu.Run) and returns what it measured."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.gpu import BIN, clients, jpeg, nvidia_smi
from bench.serve_throughput import stop_server

if TYPE_CHECKING:
    from bench.gpu import Run

LABELS = ["circle", "square", "star", "triangle"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Seconds of one call of `fn`, the best of `repeats` after a warm-up, the GPU synced."""
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - started)
    return best


def _rate(fn: Callable[[], Any], images: int, repeats: int = 5) -> float:
    """Images/s of `fn`, which handles `images` images (`_seconds`)."""
    return round(images / _seconds(fn, repeats), 2)


def _classifier(run: Run) -> tuple[Path, torch.nn.Module]:
    """resnet50 at 224 (random weights), exported with half_precision: its folder and the network."""
    from models.export import ModelSettings, export_model
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.registry import get_task, inference_settings

    def make() -> tuple[Path, torch.nn.Module]:
        task = get_task("image_classification")
        spec = ModelSettings(task, "resnet50", LABELS, inference_settings(task, {"half_precision": True,
                                                                                 "batch_size": 64}))
        torch.manual_seed(0)
        model = build_model(get_architecture("resnet50", task.family), len(LABELS), spec.settings).eval()
        return export_model(run.workdir / "resnet50", spec, model.state_dict()), model

    return run.shared("resnet50", make)


def environment(run: Run) -> dict:
    import onnxruntime as ort
    import torchvision
    from torchvision.io import decode_jpeg

    out: dict[str, Any] = {"torchvision": torchvision.__version__, "onnxruntime": ort.__version__,
                           "onnxruntime_providers": ort.get_available_providers(), "cpus": os.cpu_count()}
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update({"device": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "gpus": torch.cuda.device_count()})
    data = torch.frombuffer(bytearray(jpeg(0)), dtype=torch.uint8)
    try:
        pixels = decode_jpeg(data, device=run.device)
        out["nvjpeg"] = {"available": True, "decoded": list(pixels.shape), "on": str(pixels.device)}
    except Exception as exc:  # noqa: BLE001  (the answer to "is nvJPEG there" is its error)
        out["nvjpeg"] = {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    return out


def nvjpeg(run: Run) -> dict:
    from torchvision.io import ImageReadMode, decode_jpeg

    from models.data.images import decode, to_tensor

    jpegs = [jpeg(i) for i in range(run.big)]
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    return {"image": "640x480 JPEG", "images": len(jpegs),
            "pillow_cpu_images_per_s": _rate(lambda: [to_tensor(decode(j)) for j in jpegs], len(jpegs), 2),
            "nvjpeg_one_at_a_time_images_per_s": _rate(
                lambda: [decode_jpeg(d, mode=ImageReadMode.RGB, device=run.device) for d in data], len(jpegs)),
            "nvjpeg_batched_images_per_s": _rate(
                lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=run.device), len(jpegs)),
            "serving_decodes": "nvJPEG one image at a time on the replica's GPU (models.data.images.decode_tensor); "
                               "batched decoding in the serving path is phase 2"}


def forward(run: Run) -> dict:
    _, model = _classifier(run)
    out: dict[str, Any] = {"model": "resnet50", "crop": 224, "memory_format": "channels_last"}
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        net = model.to(run.device, dtype).to(memory_format=torch.channels_last)
        for batch in (1, run.big):
            x = torch.rand(batch, 3, 224, 224, device=run.device, dtype=dtype).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                out[f"{name}_b{batch}_images_per_s"] = _rate(lambda: net(x), batch, 10 if batch == 1 else 5)
    if run.device.type == "cuda":  # what one replica's model needs at its largest batch, besides the CUDA context
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            net(torch.rand(run.big, 3, 224, 224, device=run.device, dtype=torch.float16)
                .to(memory_format=torch.channels_last))
        out[f"fp16_b{run.big}_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    _release(model)
    return out


def _release(model: torch.nn.Module) -> None:
    """`model` back on the CPU in float32 (the next section's starting point), the GPU's cache emptied."""
    model.to("cpu", torch.float32).to(memory_format=torch.contiguous_format)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def onnxruntime_cuda(run: Run) -> dict:
    import onnxruntime as ort

    folder, model = _classifier(run)
    providers = ort.get_available_providers()
    provider = "CUDAExecutionProvider" if run.device.type == "cuda" else "CPUExecutionProvider"
    if provider not in providers:
        return {"available": False, "reason": f"onnxruntime {ort.__version__} (the CPU build pinned in uv.lock) has "
                f"providers {providers}; onnxruntime-gpu brings CUDAExecutionProvider"}
    session = ort.InferenceSession(str(folder / "artifacts" / "model.onnx"), providers=[provider])
    out: dict[str, Any] = {"available": True, "providers": session.get_providers()}
    net = model.to(run.device).eval()
    for batch in (1, run.big):
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        out[f"ort_fp32_b{batch}_images_per_s"] = _rate(lambda: session.run(None, {"input1": x}), batch)
        t = torch.from_numpy(x).to(run.device)  # torch from host memory too, as ONNX Runtime's session.run is fed
        with torch.inference_mode():
            out[f"torch_fp32_b{batch}_images_per_s"] = _rate(lambda: net(t.cpu().to(run.device)).cpu(), batch)
        out[f"b{batch}_ort_vs_torch"] = round(out[f"ort_fp32_b{batch}_images_per_s"]
                                              / out[f"torch_fp32_b{batch}_images_per_s"], 3)
    _release(model)
    return out


def _detector(run: Run) -> tuple[Path, torch.nn.Module, Any]:
    """fasterrcnn_resnet50_fpn (random weights) at its default settings: its folder, the network and the
    settings."""
    from models.export import ModelSettings, export_model
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.registry import get_task, inference_settings

    def make():
        task = get_task("image_object_detection")
        spec = ModelSettings(task, "fasterrcnn_resnet50_fpn", LABELS, inference_settings(task, {}))
        torch.manual_seed(0)
        model = build_model(get_architecture("fasterrcnn_resnet50_fpn", task.family), len(LABELS),
                            spec.settings).eval()
        return export_model(run.workdir / "fasterrcnn_resnet50_fpn", spec, model.state_dict()), model, spec.settings

    return run.shared("detector", make)


def detector(run: Run) -> dict:
    from models.tasks.detection import configured

    _, model, settings = _detector(run)
    image = torch.rand(3, 480, 640, device=run.device)
    out: dict[str, Any] = {"model": "fasterrcnn_resnet50_fpn", "image": "640x480", "min_size": settings.min_size,
                           "max_size": settings.max_size}
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        try:
            net = configured(model.to(run.device, dtype), settings)
            x = image.to(dtype)
            with torch.inference_mode():
                out[f"{name}_seconds_per_image"] = round(_seconds(lambda: net([x]), 5 if run.big > 4 else 1), 4)
        except Exception as exc:  # noqa: BLE001  (FP16 may fail in an op: recorded, FP32 kept)
            out[f"{name}_error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    _release(model)
    return out


def tiles(run: Run) -> dict:
    """Tiled detection (3x2 on 1600x1200) of 4 images in one call, their tiles pooled, against one image at a time
    (models.tasks.detection.predict): what pooling tiles across requests buys on this device."""
    from models.tasks import detection

    _, model, settings = _detector(run)
    net = model.to(run.device)
    gpu = run.device.type == "cuda"
    # on a CPU (checking the script) small images at small sizes: the figures mean nothing there
    width, height = (1600, 1200) if gpu else (320, 240)
    tiled = settings.model_copy(update={"tile_grid_size": "3x2", "batch_size": 16,
                                        **({} if gpu else {"min_size": 128, "max_size": 256})})
    images = [torch.rand(3, height, width, device=run.device) for _ in range(4)]
    with torch.inference_mode():
        pooled = _rate(lambda: detection.predict(net, images, tiled), len(images), 3 if gpu else 1)
        alone = _rate(lambda: [detection.predict(net, [image], tiled) for image in images], len(images),
                      3 if gpu else 1)
    _release(model)
    return {"model": "fasterrcnn_resnet50_fpn", "image": f"{width}x{height}", "tile_grid_size": "3x2",
            "images_per_pass": tiled.images_per_pass(), "pooled_images_per_s": round(pooled, 3),
            "one_at_a_time_images_per_s": round(alone, 3), "x_one_at_a_time": round(pooled / alone, 3)}


def xrai(run: Run) -> dict:
    from explain import attribute, make_explainer, parse_xai

    _, model = _classifier(run)
    explainer = make_explainer(model, "resnet50", multilabel=False, device=run.device)
    pixels = torch.rand(1, 3, 224, 224, device=run.device)
    # the spec's defaults (50 steps) on a GPU; 4 steps where the script is only being checked on a CPU
    xai = parse_xai({"xai_algorithm": "xrai", **({} if run.device.type == "cuda" else {"n_steps": 4})})
    attribute(explainer, pixels, 0, xai.model_copy(update={"n_steps": 2}))  # warm-up
    seconds = []
    for _ in range(3 if run.device.type == "cuda" else 1):
        started = time.perf_counter()
        attribute(explainer, pixels, 0, xai)
        _sync()
        seconds.append(time.perf_counter() - started)
    return {"model": "resnet50", "crop": 224, "n_steps": xai.n_steps, "internal_batch_size": xai.internal_batch_size,
            "seconds_per_image": round(min(seconds), 3), "runs": [round(s, 3) for s in seconds]}


def d_rise(run: Run) -> dict:
    """D-RISE through the Predictor (the endpoint's path) on a 640x480 image: the spec's 1000 masks for a box the
    request names (random weights may detect nothing of their own), `internal_batch_size` masks per pass."""
    from explain import parse_xai
    from models.data.images import Probed
    from serving.predictor import Predictor

    folder, _, _ = _detector(run)
    predictor = Predictor.load(folder, backend="torch", device=str(run.device))
    image = Probed.of(jpeg(0, (640, 480)))
    masks = 1000 if run.device.type == "cuda" else 8  # 8: the fewest allowed, where the script is checked
    xai = parse_xai({"number_of_masks": masks, "max_explained_detections": 0, "time_budget_s": 300,
                     "target_box": {"label": LABELS[0], "topX": 0.3, "topY": 0.3, "bottomX": 0.6, "bottomY": 0.7}},
                    "image_object_detection")
    started = time.perf_counter()
    [answer] = predictor.explain([image], [xai], predictor.model_settings.settings, [0])
    _sync()
    seconds = time.perf_counter() - started
    return {"algorithm": "d_rise", "image": "640x480", "number_of_masks": masks,
            "internal_batch_size": xai.internal_batch_size, "masks_used": answer.get("masks_used"),
            "seconds_per_explained_detection": round(seconds, 3), **({"error": answer["error"]} if "error" in answer
                                                                     else {})}


def _bodies() -> list[dict]:
    return [{"input_data": {"columns": ["image"], "data": [base64.b64encode(jpeg(i)).decode()]}} for i in range(16)]


def _load(url: str, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients spread over up to 4 processes (one Python process's threads cannot keep 64 requests
    in flight against a GPU): images/s, p50, p99, errors."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    processes = min(4, concurrency)
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    start_at = time.time() + 5  # every client process starts together, once its interpreter is up
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(clients, [url] * processes, shares, [start_at] * processes, [seconds] * processes,
                              [_bodies()] * processes))
    all_ = np.array([x for part in parts for x in part])
    ok = all_[~np.isnan(all_)] * 1000
    return {"concurrency": concurrency, "requests": int(ok.size), "errors": int(np.isnan(all_).sum()),
            "images_per_s": round(ok.size / seconds, 1),
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok.size else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok.size else None}


def serve(run: Run) -> dict:
    from models.runtime import free_port, wait_until_ready

    folder, _ = _classifier(run)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gpus = "1" if run.device.type == "cuda" else "0"
    command = [str(BIN / "visionserve"), "serve", str(folder), "--port", str(port), "--gpus-per-replica", gpus,
               "--max-batch-size", str(run.big), "--batch-wait-ms", "5", "--max-ongoing-requests", "128",
               "--max-queued-requests", "512"]
    log = run.workdir / "serve.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    run.cache["server"] = proc
    wait_until_ready(f"{url}/health/ready", proc, log, timeout=max(30.0, min(240.0, run.left() - 60)))
    out: dict[str, Any] = {"command": " ".join(command[1:]), "ready_s": round(time.perf_counter() - started, 1),
                           "model": "resnet50, 224, FP16 (settings.json half_precision)", "image": "640x480 JPEG",
                           "decoding": "nvJPEG, one image at a time on the replica's GPU (decode_tensor)"}
    _load(f"{url}/score", 4, 3)  # warm-up: cuDNN's algorithm search, the batcher
    out["levels"] = [_load(f"{url}/score", c, run.args.seconds) for c in (1, run.big)]
    try:
        mine = os.getpid()
        out["gpu_memory"] = [row for row in nvidia_smi() if row["pid"] != mine]
        out["gpu_memory_per_replica_mib"] = max((r["used_mib"] for r in out["gpu_memory"]), default=None)
    except Exception as exc:  # noqa: BLE001
        out["gpu_memory"] = f"nvidia-smi: {type(exc).__name__}: {exc}"
    out["log_tail"] = log.read_text()[-1500:].splitlines()[-10:]
    _stop(run)
    return out


def _stop(run: Run) -> None:
    proc = run.cache.pop("server", None)
    if proc is not None and proc.poll() is None:
        stop_server(proc)


def cleanup(run: Run) -> None:
    """Whatever a section left running (a server cut by the time limit) is stopped, the models made are removed."""
    import shutil

    signal.setitimer(signal.ITIMER_REAL, 0)
    _stop(run)
    shutil.rmtree(run.workdir, ignore_errors=True)
