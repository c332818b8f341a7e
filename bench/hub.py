"""The hub's many-models serving: a cold model's first call vs warm calls, and images/s with 3 models in
rotation on one multiplexed deployment vs one `visionserve serve` app per model on the same CPUs.

    uv run python bench/hub.py [--seconds 15] [--concurrency 8]

Three resnet18 classifiers (224 crop, random weights: speed does not depend on them) are exported and
registered in a private MLflow registry; one 640x480 JPEG per `POST /score` request.
- cold vs warm: the first call of each model on a fresh hub (it loads the model) against the median of
  20 calls after it;
- rotation: `--concurrency` closed-loop clients cycling over the 3 models for `--seconds`: the hub
  (HubModels, one replica with all CPUs, a cache of 3; then a cache of 2, which evicts and reloads) vs three
  VisionService apps (one replica each, a third of the CPUs each: the same CPUs in all).
Writes bench/results/hub.json.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table, write  # noqa: E402
from bench.inference_throughput import _folder, _jpeg  # noqa: E402
from bench.serve_throughput import load  # noqa: E402
from models.runtime import free_port  # noqa: E402

NAMES = ("alpha", "beta", "gamma")


def _register(folders: dict[str, Path], uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    for name, folder in folders.items():
        mlflow.register_model(str(folder), name)


def _hub(state: Path, cache: int, cpus: float, port: int) -> str:
    from ray import serve

    from serving.hub.app import build_hub

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_hub({"state_dir": str(state), "cache_size": cache, "model_cpus": cpus}), name="hub",
              route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    from ray import serve

    from models.runtime import ensure_ray
    from serving.app import VisionService, service_config

    cpus = float(os.cpu_count() or 1)
    image = base64.b64encode(_jpeg(0)).decode()
    body = {"input_data": {"columns": ["image"], "data": [image]}}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = {name: _folder("resnet18", work / name)[0] for name in NAMES}
        ensure_ray()
        for cache in (3, 2):
            state = work / f"state-{cache}"
            state.mkdir()
            _register(folders, f"sqlite:///{state / 'mlflow.db'}")
            url = _hub(state, cache, cpus - 0.1, free_port())
            with httpx.Client(timeout=300) as client:
                for name in NAMES:
                    started = time.perf_counter()
                    assert client.post(f"{url}/score", params={"model": name}, json=body).status_code == 200
                    cold = time.perf_counter() - started
                    warm = []
                    for _ in range(20):
                        started = time.perf_counter()
                        client.post(f"{url}/score", params={"model": name}, json=body)
                        warm.append(time.perf_counter() - started)
                    if cache == 3:
                        rows.append({"case": f"first call {name}", "cold_ms": cold * 1000,
                                     "warm_ms": statistics.median(warm) * 1000})
            bodies = [(f"{url}/score?model={name}", body) for name in NAMES]
            rows.append({"case": f"hub, 3 models in rotation, cache {cache}",
                         **_rotation(bodies, args.concurrency, args.seconds)})
            serve.shutdown()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([serve.RunTarget(VisionService.options(ray_actor_options={"num_cpus": (cpus - 0.1) / 3}).bind(
            asdict(service_config(model=str(folders[name]), compile=False))), name=name, route_prefix=f"/{name}")
            for name in NAMES])
        bodies = [(f"http://127.0.0.1:{port}/{name}/score", body) for name in NAMES]
        rows.append({"case": "3 visionserve serve apps, 1/3 of the CPUs each",
                     **_rotation(bodies, args.concurrency, args.seconds)})
        serve.shutdown()
    hub_rate = next(r["images_per_s"] for r in rows if r["case"].endswith("cache 3"))
    apps_rate = rows[-1]["images_per_s"]
    print(table(rows, ["case", "cold_ms", "warm_ms", "images_per_s", "p50_ms", "p99_ms", "errors"]))
    print(f"\nhub / one app per model, images/s: {hub_rate / apps_rate:.2f}")
    print(f"written {write('hub', {'rows': rows, 'ratio_hub_vs_apps': hub_rate / apps_rate})}")


def _rotation(targets: list[tuple[str, dict]], concurrency: int, seconds: float) -> dict:
    """Closed-loop clients, each request to the next model in turn (bench.serve_throughput.load)."""
    result = load([url for url, _ in targets], [body for _, body in targets], concurrency, seconds)
    return {k: result[k] for k in ("images_per_s", "p50_ms", "p99_ms", "errors")}


if __name__ == "__main__":
    main()
