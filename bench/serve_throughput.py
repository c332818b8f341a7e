"""Online endpoint throughput: visionserve on Ray Serve vs LitServe vs `mlflow models serve`, same model and images.

    uv run python bench/serve_throughput.py [--seconds 15] [--rounds 2] [--concurrency 1 8 32] [--servers ...]

One resnet18 classifier (224 crop, random weights: speed does not depend on them) exported once;
requests of one 640x480 JPEG each, sent by `concurrency` client threads for `--seconds`. Servers:
- `default`: `visionserve serve DIR` with no layout or backend flag, what a user gets (on a local CPU
  instance: one replica with every CPU, the classifier on ONNX Runtime; see serving.backends), `@serve.batch`
  across requests, HAProxy in front (models.runtime.serve_environment), `POST /score` with `input_data`;
- `torch-2x1`: `--replicas 2 --cpus-per-replica 1 --backend torch`, the classifier compiled as each replica
  starts (serving.compiled): the fastest layout at concurrency 8 before ONNX Runtime;
- `onnx-2x1`: the same two replicas on ONNX Runtime;
- `litserve-2x1`, `litserve-1x2`: LitServe (bench/_litserve.py: its own environment), 2 workers x 1 thread or
  1 worker x 2 threads, batching 16 with a 10 ms wait, each worker scoring with visionserve's Predictor (the
  same model, preprocessing and ONNX Runtime), the cloud's body on `POST /predict`;
- `mlflow`: `mlflow models serve -m DIR --env-manager local` (one uvicorn worker, its default),
  `POST /invocations` with `dataframe_split`.
Also in-process: `mlflow.pyfunc.load_model(DIR).predict` on 16 images at a time, no HTTP: the ceiling a
server could reach (measured before and after the servers, the best of the two), and one at a time.
`--baseline TREE` adds `baseline`: `visionserve serve DIR` as `default` but with the code of another checkout (a
`git worktree` of an earlier commit) on PYTHONPATH, in this environment, so a change is measured against what came
before in the same run (`x_baseline` in the targets).
Each server runs alone (the others are stopped), in `--rounds` rounds, in turn; each server's best round at
each concurrency is reported, the same rule for all, so a slow spell of a shared machine does not decide a
ratio (every round is kept in the JSON). Targets for `default`: >= 2x mlflow's images/s at concurrency 8 and
>= mlflow at concurrency 1, >= 1.3x the best LitServe layout at concurrency 8. Also reports each server's
seconds from start to ready and its resident memory. Writes bench/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _litserve  # noqa: E402
from bench._common import table, write  # noqa: E402
from bench.inference_throughput import _folder, _jpeg  # noqa: E402
from models.runtime import free_port, wait_until_ready  # noqa: E402

BIN = Path(sys.executable).parent


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _rss_mb(match) -> float:
    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            if match(" ".join(p.info["cmdline"] or [])):
                total += p.info["memory_info"].rss
        except (psutil.Error, TypeError):
            continue
    return round(total / 2**20, 1)


def load(url: str | list[str], bodies: list[dict], concurrency: int, seconds: float) -> dict:
    """`concurrency` threads sending one request after another for `seconds`; latency of each. Several
    URLs (models behind different routes) are cycled like the bodies."""
    urls = url if isinstance(url, list) else [url]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = k
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    ok = client.post(urls[i % len(urls)], json=bodies[i % len(bodies)]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                i += concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": len(latencies), "images_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "errors": errors[0]}


def run_server(name: str, command: list[str], ready: str, route: str, bodies: list[dict], args, log: Path,
               rss_match, env: dict[str, str] | None = None, cwd: str | None = None) -> list[dict]:
    """`cwd`: where the server runs (a baseline's checkout: `python -c` imports from the working directory before
    PYTHONPATH, and Ray's workers import from the driver's)."""
    env = dict(env or os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow runs `uvicorn`
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
                            cwd=cwd)
    try:
        wait_until_ready(ready, proc, log, timeout=600)
        ready_s = time.perf_counter() - started
        load(route, bodies, 2, 3)  # warm-up
        rows = []
        for c in args.concurrency:
            row = {"server": name, **load(route, bodies, c, args.seconds)}
            row["ready_s"] = round(ready_s, 1)
            row["rss_mb"] = _rss_mb(rss_match)
            print(table([row], list(row)), flush=True)
            rows.append(row)
        return rows
    finally:
        stop_server(proc)


def in_process(folder: Path, jpegs: list[bytes], batches: tuple[int, ...] = (1, 16),
               repeats: int = 5) -> dict[int, float]:
    """Images/s of `mlflow.pyfunc.load_model(folder).predict` on `b` images at a time for each `b` in
    `batches`, no HTTP; one model, the batch sizes alternating within each repeat, the best repeat each."""
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(str(folder))
    frames = {b: [pd.DataFrame({"image": [base64.b64encode(j).decode() for j in jpegs[i:i + b]]})
                  for i in range(0, len(jpegs), b)] for b in batches}
    for b in batches:
        model.predict(frames[b][0])
    best = {b: float("inf") for b in batches}
    for _ in range(repeats):
        for b in batches:
            best[b] = min(best[b], _seconds(lambda: [model.predict(f) for f in frames[b]]))
    return {b: len(jpegs) / best[b] for b in batches}


def _best_rounds(runs: list[dict]) -> list[dict]:
    """Per server and concurrency, the round with the most images/s, in first-seen order."""
    best: dict[tuple[str, int], dict] = {}
    for run in runs:
        key = (run["server"], run["concurrency"])
        if key not in best or run["images_per_s"] > best[key]["images_per_s"]:
            best[key] = dict(run)
    return list(best.values())


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


SERVERS = ("default", "torch-2x1", "onnx-2x1", "litserve-2x1", "litserve-1x2", "mlflow")


def _server(name: str, folder: Path, images: list[str], workdir: Path, baseline: str | None = None) -> dict:
    """How to start server `name` (SERVERS, or "baseline"), where it is ready, where to send what."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = [{"input_data": {"columns": ["image"], "data": [b]}} for b in images]
    if name == "mlflow":
        return {"command": [str(BIN / "mlflow"), "models", "serve", "-m", str(folder), "--env-manager", "local",
                            "-h", "127.0.0.1", "-p", str(port)], "ready": f"{url}/ping", "route": f"{url}/invocations",
                "bodies": [{"dataframe_split": {"columns": ["image"], "data": [[b]]}} for b in images],
                "rss": lambda cmd: "mlflow" in cmd and ("uvicorn" in cmd or "scoring_server" in cmd or
                                                        "models serve" in cmd)}
    if name.startswith("litserve"):
        workers, threads = (2, 1) if name.endswith("2x1") else (1, 2)
        return {"command": _litserve.command(port), "ready": f"{url}/health", "route": f"{url}/predict",
                "bodies": body, "env": _litserve.environment(folder, workers, threads),
                "rss": lambda cmd: str(_litserve.ENV) in cmd}
    flags = {"default": [], "baseline": [],
             "torch-2x1": ["--replicas", "2", "--cpus-per-replica", "1", "--backend", "torch"],
             "onnx-2x1": ["--replicas", "2", "--cpus-per-replica", "1", "--backend", "onnx"]}[name]
    env = {**os.environ, "PYTHONPATH": baseline} if name == "baseline" else None
    return {"cwd": baseline if name == "baseline" else None, "command": [str(BIN / "python"), "-c", "from serving.cli import main; raise SystemExit(main())", "serve",
                        str(folder), "--port", str(port), "--max-ongoing-requests", "64", *flags],
            "ready": f"{url}/health/ready", "route": f"{url}/score", "bodies": body, "env": env,
            "rss": lambda cmd: "ServeReplica" in cmd}


def _targets(rows: list[dict]) -> dict:
    def at(server: str, c: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["concurrency"] == c), None)

    out: dict = {}
    for c, need in ((8, 2.0), (1, 1.0)):
        ours, theirs = at("default", c), at("mlflow", c)
        if ours and theirs:
            out[f"x_mlflow_at_{c}"] = ours["images_per_s"] / theirs["images_per_s"]
            out[f"x_mlflow_at_{c}_target"] = need
    for c in sorted({r["concurrency"] for r in rows}):
        ours, before = at("default", c), at("baseline", c)
        if ours and before:
            out[f"x_baseline_at_{c}"] = ours["images_per_s"] / before["images_per_s"]
    lit = [r for r in rows if r["server"].startswith("litserve") and r["concurrency"] == 8]
    if at("default", 8) and lit:
        out["x_best_litserve_at_8"] = at("default", 8)["images_per_s"] / max(r["images_per_s"] for r in lit)
        out["x_best_litserve_at_8_target"] = 1.3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=2, help="every server this many times, in turn")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--baseline", help="a checkout of another commit: its `visionserve serve` as `baseline`")
    args = parser.parse_args()
    if args.baseline:
        args.servers = ["baseline", *args.servers]
    workdir = Path(tempfile.mkdtemp(prefix="visionserve-serve-bench-"))
    folder, _, _ = _folder("resnet18", workdir)
    jpegs = [_jpeg(i) for i in range(16)]
    images = [base64.b64encode(j).decode() for j in jpegs]
    first = in_process(folder, jpegs * 4)
    print(f"in-process pyfunc: {first[16]:.1f} images/s 16 at a time, {first[1]:.1f} one at a time", flush=True)

    runs: list[dict] = []
    for round_ in range(1, args.rounds + 1):
        for name in args.servers:
            server = _server(name, folder, images, workdir, args.baseline)
            runs += [{**row, "round": round_} for row in run_server(
                name, server["command"], server["ready"], server["route"], server["bodies"], args,
                workdir / f"{name}.log", server["rss"], server.get("env"), server.get("cwd"))]
    rows = _best_rounds(runs)
    last = in_process(folder, jpegs * 4)  # measured again after the servers: the best of both bounds each
    ceiling, single = max(first[16], last[16]), max(first[1], last[1])
    for row in rows:
        mlflow_row = next((r for r in rows if r["server"] == "mlflow" and r["concurrency"] == row["concurrency"]), None)
        row["x_mlflow"] = row["images_per_s"] / mlflow_row["images_per_s"] if mlflow_row else None
        row["of_in_process"] = row["images_per_s"] / ceiling
    targets = _targets(rows)
    print(f"\nbest of {args.rounds} round(s) per server and concurrency:")
    print(table(rows, ["server", "round", "concurrency", "requests", "images_per_s", "p50_ms", "p99_ms", "errors",
                       "ready_s", "rss_mb", "x_mlflow", "of_in_process"]))
    print(f"\nin-process pyfunc: {ceiling:.1f} images/s batched, {single:.1f} one at a time; " + ", ".join(
        f"{k}={v:.3g}" for k, v in targets.items()))
    path = write("serve_throughput", {"seconds": args.seconds, "servers": args.servers, "rounds": args.rounds,
                                      "litserve": _litserve.version() if any("litserve" in n for n in args.servers)
                                      else None, "in_process_images_per_s": ceiling,
                                      "in_process_one_at_a_time": single, "rows": rows, "targets": targets,
                                      "runs": runs})
    print(f"written {path}")


if __name__ == "__main__":
    main()
