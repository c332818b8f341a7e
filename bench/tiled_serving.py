"""Tiled requests under load: `visionserve serve` on a detector, 1600x1200 images with tile_grid_size 3x2.

    uv run python bench/tiled_serving.py [--seconds 45] [--rounds 1] [--concurrency 1 4] [--baseline TREE]

One fasterrcnn_resnet18_fpn (random weights; box_score_thresh 0.05) exported once; each request carries one
1600x1200 JPEG and `"params": {"tile_grid_size": "3x2"}` (6 tiles and the whole image per request), sent by
`concurrency` client threads for `--seconds`. `default` is `visionserve serve DIR` with no layout flag (one replica
with every CPU); `--baseline TREE` adds the same command with another checkout's code (a `git worktree` of an
earlier commit) on PYTHONPATH, so a change is measured against what came before in the same run. Each server runs
alone, in turn, `--rounds` times; the best round per server and concurrency is reported.
Target (issue #28): at concurrency 4, default >= 1.3x the baseline's images/s; answers equal to one request at a
time (tests/test_tiled_inference.py, tests/test_serve.py). Writes bench/results/tiled_serving.json.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table, write  # noqa: E402
from bench.inference_throughput import _folder, _jpeg  # noqa: E402
from bench.serve_throughput import BIN, _best_rounds, run_server  # noqa: E402
from models.runtime import free_port  # noqa: E402

SIZE = (1600, 1200)
PARAMS = {"tile_grid_size": "3x2"}


def _server(folder: Path, baseline: str | None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return {"command": [str(BIN / "python"), "-c", "from serving.cli import main; raise SystemExit(main())", "serve",
                        str(folder), "--port", str(port), "--max-ongoing-requests", "64"],
            "ready": f"{url}/health/ready", "route": f"{url}/score",
            "env": {**os.environ, "PYTHONPATH": baseline} if baseline else None, "cwd": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45, help="per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--baseline", help="a checkout of another commit: its `visionserve serve` as `baseline`")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="visionserve-tiled-bench-"))
    folder, _, _ = _folder("fasterrcnn_resnet18_fpn", workdir)
    bodies = [{"input_data": {"columns": ["image"], "data": [base64.b64encode(_jpeg(i, SIZE)).decode()]},
               "params": PARAMS} for i in range(4)]
    servers = (["baseline"] if args.baseline else []) + ["default"]
    runs: list[dict] = []
    for round_ in range(1, args.rounds + 1):
        for name in servers:
            server = _server(folder, args.baseline if name == "baseline" else None)
            runs += [{**row, "round": round_} for row in run_server(
                name, server["command"], server["ready"], server["route"], bodies, args, workdir / f"{name}.log",
                lambda cmd: "ServeReplica" in cmd, server["env"], server["cwd"])]
    rows = _best_rounds(runs)
    targets = {}
    for row in rows:
        base = next((r for r in rows if r["server"] == "baseline" and r["concurrency"] == row["concurrency"]), None)
        row["x_baseline"] = row["images_per_s"] / base["images_per_s"] if base else None
        if row["server"] == "default" and base:
            targets[f"x_baseline_c{row['concurrency']}"] = row["x_baseline"]
    print(f"\nbest of {args.rounds} round(s), {SIZE[0]}x{SIZE[1]} images tiled {PARAMS['tile_grid_size']}:")
    print(table(rows, ["server", "round", "concurrency", "requests", "images_per_s", "p50_ms", "p99_ms", "errors",
                       "rss_mb", "x_baseline"]))
    print(", ".join(f"{k}={v:.3g}" for k, v in targets.items()))
    path = write("tiled_serving", {"seconds": args.seconds, "rounds": args.rounds, "size": SIZE, "params": PARAMS,
                                   "baseline": args.baseline, "rows": rows, "targets": targets, "runs": runs})
    print(f"written {path}")


if __name__ == "__main__":
    main()
