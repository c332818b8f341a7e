"""The hub's many-models serving: a model's first call (the very first on a fresh replica, a later one, one after
an eviction) vs warm calls; images/s with 3 models in rotation on one multiplexed deployment vs one `visionserve
serve` app per model on the same CPUs; and the memory budget at work, a detector among the classifiers.

    uv run python bench/hub.py [--seconds 15] [--concurrency 8] [--rounds 5]

Three resnet18 classifiers (224 crop) and a fasterrcnn_resnet18_fpn detector (random weights: speed does not
depend on them) are exported and registered in a private MLflow registry; one 640x480 JPEG per `POST /score`.
- first calls: on a fresh hub (one HubModels replica, a cache of 3), the very first call (the replica's first
  model), the first calls of the next two models, and the median of 20 warm calls after each;
- rotation: `--concurrency` closed-loop clients cycling over the 3 classifiers for `--seconds`: the hub (all
  CPUs, a cache of 3) vs three VisionService apps (a third of the CPUs each: the same CPUs in all), both up on
  one Serve instance and loaded in `--rounds` alternating rounds (the ratio: the medians'); then a hub with a
  cache of 2, which evicts and reloads, and whose first model's call after its eviction is timed;
- memory budget: the 3 classifiers and the detector, a cache of 4 but `--model-memory-mb` of the classifiers'
  footprints (measured by the first hub, shown by GET /models): the detector's load evicts by the policy; the
  4 models in rotation, with the loads the budget caused and what stays resident.
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
DETECTOR = "delta"


def _register(folders: dict[str, Path], uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    for name, folder in folders.items():
        mlflow.register_model(str(folder), name)


def _hub(work: Path, folders: dict[str, Path], cpus: float, **config) -> str:
    """A fresh hub (its own state and registry) on a port of its own, serving `folders` by name."""
    from ray import serve

    from serving.hub.app import build_hub

    state = Path(tempfile.mkdtemp(dir=work, prefix="state-"))
    _register(folders, f"sqlite:///{state / 'mlflow.db'}")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_hub({"state_dir": str(state), "model_cpus": cpus, **config}), name="hub", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def _call(client: httpx.Client, url: str, name: str, body: dict) -> float:
    started = time.perf_counter()
    answer = client.post(f"{url}/score", params={"model": name}, json=body)
    assert answer.status_code == 200, answer.text
    return time.perf_counter() - started


def _first_calls(client: httpx.Client, url: str, names: tuple[str, ...], body: dict, what: str) -> list[dict]:
    """Each model's first call (and, of it, the model's load as its replica measured it: GET /models), then the
    median of 20 warm ones."""
    rows = []
    for i, name in enumerate(names):
        cold = _call(client, url, name, body)
        loaded = {m["model"]: m for m in _residency(client, url)["models"]}[f"{name}/1"]
        warm = statistics.median(_call(client, url, name, body) for _ in range(20))
        case = "very first call (fresh replica)" if i == 0 else "first call"
        rows.append({"case": f"{what}: {case} {name}", "model": name, "cold_ms": cold * 1000,
                     "load_ms": loaded["load_s"] * 1000, "footprint_mb": loaded["footprint_mb"],
                     "warm_ms": warm * 1000})
    return rows


def _residency(client: httpx.Client, url: str) -> dict:
    [replica] = client.get(f"{url}/models").json()["cache"]["replicas"]
    return replica


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the hub and the apps")
    args = parser.parse_args()
    from ray import serve

    from models.runtime import ensure_ray

    cpus = float(os.cpu_count() or 1) - 0.1
    image = base64.b64encode(_jpeg(0)).decode()
    body = {"input_data": {"columns": ["image"], "data": [image]}}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=300) as client:
        work = Path(tmp)
        folders = {name: _folder("resnet18", work / name)[0] for name in NAMES}
        detector = {DETECTOR: _folder("fasterrcnn_resnet18_fpn", work / DETECTOR)[0]}
        # twice the CPUs in Ray's books, so that the hub and the apps, each given all the CPUs, are up side by
        # side and loaded in turn (a replica's threads follow what it asks for, not what the machine has)
        ensure_ray(num_cpus=2 * (os.cpu_count() or 1))
        url = _hub(work, folders, cpus, cache_size=3)
        rows += _first_calls(client, url, NAMES, body, "cache 3")
        footprints = {r["model"]: r["footprint_mb"] for r in rows}
        compared, comparison = _head_to_head(url, folders, cpus, body, args)
        rows += compared
        serve.shutdown()

        url = _hub(work, folders, cpus, cache_size=2)
        for name in NAMES:
            _call(client, url, name, body)
        rows.append({"case": f"cache 2: first call {NAMES[0]} after its eviction",
                     "cold_ms": _call(client, url, NAMES[0], body) * 1000})
        rows.append({"case": "hub, 3 models in rotation, cache 2", **_rotation(
            [(f"{url}/score?model={name}", body) for name in NAMES], args.concurrency, args.seconds)})
        serve.shutdown()

        budget = sum(footprints.values()) + 1  # the 3 classifiers fit; the detector needs room
        memory = _memory_budget(client, work, {**folders, **detector}, cpus, budget, body, args, rows)
    _report(rows, memory, comparison)


def _head_to_head(url: str, folders: dict[str, Path], cpus: float, body: dict,
                  args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The hub at `url` against three VisionService apps (a third of the CPUs each) deployed beside it on the
    same Serve instance, loaded in alternating rounds: a drift of the machine's speed (this one's moves by
    +-15 % over minutes) falls on both alike. → the rounds' rows, and the comparison (medians of the rounds)."""
    from ray import serve

    from serving.app import VisionService, service_config

    serve.run_many([serve.RunTarget(VisionService.options(ray_actor_options={"num_cpus": cpus / 3}).bind(
        asdict(service_config(model=str(folders[name]), compile=False))), name=name, route_prefix=f"/{name}")
        for name in NAMES])
    sides = {"hub": ("hub, 3 models in rotation, cache 3", [(f"{url}/score?model={n}", body) for n in NAMES]),
             "apps": ("3 visionserve serve apps, 1/3 of the CPUs each", [(f"{url}/{n}/score", body) for n in NAMES])}
    measured: dict[str, list[dict]] = {side: [] for side in sides}
    rows = []
    for i in range(args.rounds):
        for side, (case, targets) in sides.items():
            measured[side].append(_rotation(targets, args.concurrency, args.seconds))
            rows.append({"case": f"{case} (round {i + 1})", **measured[side][-1]})
            print(rows[-1], flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in measured[side])

    ratios = [h["images_per_s"] / a["images_per_s"] for h, a in zip(measured["hub"], measured["apps"])]
    return rows, {"rounds": args.rounds,
                  "ratio_hub_vs_apps": median("hub", "images_per_s") / median("apps", "images_per_s"),
                  "round_ratios": [round(r, 3) for r in ratios],
                  "cpu_ms_per_image": {side: median(side, "cpu_ms_per_image") for side in sides}}


def _memory_budget(client: httpx.Client, work: Path, folders: dict[str, Path], cpus: float, budget: float,
                   body: dict, args: argparse.Namespace, rows: list[dict]) -> dict:
    """The classifiers and the detector on a hub whose count cap (4) never evicts but `budget` does: their first
    calls, then all in rotation; rows added to `rows`, → what the budget did."""
    from ray import serve

    url = _hub(work, folders, cpus, cache_size=4, model_memory_mb=budget)
    names = tuple(folders)
    rows += _first_calls(client, url, names, body, f"budget {budget:.0f} MB")
    replica = _residency(client, url)
    before, resident = len(replica["loads"]), [m["model"] for m in replica["models"]]
    rows.append({"case": f"hub, 3 classifiers + detector in rotation, budget {budget:.0f} MB", **_rotation(
        [(f"{url}/score?model={name}", body) for name in names], args.concurrency, args.seconds)})
    replica = _residency(client, url)
    rows[-1]["loads"] = len(replica["loads"]) - before
    serve.shutdown()
    return {"budget_mb": budget, "footprints_mb": {r["model"]: r["footprint_mb"] for r in rows if "model" in r},
            "resident_after_first_calls": resident, "resident_at_end": [m["model"] for m in replica["models"]]}


def _report(rows: list[dict], memory: dict, comparison: dict) -> None:
    cpu = comparison["cpu_ms_per_image"]
    print(table(rows, ["case", "cold_ms", "load_ms", "footprint_mb", "warm_ms", "images_per_s", "p50_ms", "p99_ms",
                       "errors", "cpu_ms_per_image", "loads"]))
    print(f"\nmemory budget {memory['budget_mb']:.0f} MB; footprints (MB): {memory['footprints_mb']}; resident "
          f"after the first calls: {memory['resident_after_first_calls']}; at the end: "
          f"{memory['resident_at_end']}")
    print(f"hub / one app per model, images/s, median of {comparison['rounds']} alternating rounds each: "
          f"{comparison['ratio_hub_vs_apps']:.2f} (round by round: {comparison['round_ratios']}); machine CPU ms "
          f"per image, medians: hub {cpu['hub']:.1f}, apps {cpu['apps']:.1f} (apps / hub "
          f"{cpu['apps'] / cpu['hub']:.2f})")
    print(f"written {write('hub', {'rows': rows, 'memory': memory, **comparison})}")


def _busy_seconds() -> float:
    """The machine's CPU seconds spent so far, all processes (idle, I/O wait and time stolen by the host aside)."""
    import psutil

    times = psutil.cpu_times()
    spent = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)  # guest: in user already
    return spent - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "steal", 0.0)


def _rotation(targets: list[tuple[str, dict]], concurrency: int, seconds: float) -> dict:
    """Closed-loop clients, each request to the next model in turn (bench.serve_throughput.load), after 3 s of
    the same load unmeasured (every lane and session has run once: all cases start warm). Besides images/s, the
    machine's CPU milliseconds per image (the clients' share included, the same for both sides): what a server
    spends, which moves less than its images/s when the machine's speed drifts."""
    urls, bodies = [url for url, _ in targets], [body for _, body in targets]
    load(urls, bodies, concurrency, 3)
    busy = _busy_seconds()
    result = load(urls, bodies, concurrency, seconds)
    cpu_ms = (_busy_seconds() - busy) * 1000 / max(1, result["requests"])
    return {**{k: result[k] for k in ("images_per_s", "p50_ms", "p99_ms", "errors")}, "cpu_ms_per_image": cpu_ms}


if __name__ == "__main__":
    main()
