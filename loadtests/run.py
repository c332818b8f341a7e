"""Headless load tests of a scoring endpoint: runs loadtests/locustfile.py in a locust subprocess,
reads locust's CSV stats and summarises them (`visionserve loadtest`).

This module must not import locust: locust monkey-patches the process with gevent, which breaks
Ray and torch, so it only ever runs as `python -m locust` in its own process.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.data.formats import IMAGE_EXTENSIONS, is_image_file

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
ENV_VARS = ("VISIONSERVE_IMAGES", "VISIONSERVE_IMAGES_PER_REQUEST", "VISIONSERVE_API_KEY", "VISIONSERVE_EXPLAIN_SHARE",
            "VISIONSERVE_XAI_PARAMETERS", "VISIONSERVE_PARAMS", "VISIONSERVE_ROUTE", "VISIONSERVE_TIMEOUT")


class LoadtestError(RuntimeError):
    """Locust did not run (bad configuration, locustfile error, ...): no statistics to report."""


@dataclass
class RowStats:
    """One row of locust_stats.csv: a request name, or `Aggregated` for all of them. Times in ms;
    locust computes percentiles from response times rounded to 2 significant digits (147 -> 150 ms)."""

    name: str
    method: str
    requests: int
    failures: int
    failure_pct: float
    rps: float
    avg_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass
class LoadtestSummary:
    host: str
    route: str
    users: int
    spawn_rate: float
    duration: str
    images_per_request: int
    explain_share: float
    params: dict | None
    total: RowStats
    rows: list[RowStats]
    # locust_failures.csv: [{"name", "method", "error", "occurrences"}], most frequent first.
    errors: list[dict] = field(default_factory=list)
    locust_exit_code: int = 0
    out_dir: str = ""

    @property
    def requests(self) -> int:
        return self.total.requests

    @property
    def failures(self) -> int:
        return self.total.failures

    @property
    def failure_pct(self) -> float:
        return self.total.failure_pct

    @property
    def rps(self) -> float:
        return self.total.rps

    @property
    def images_per_s(self) -> float:
        return self.total.rps * self.images_per_request

    @property
    def p50_ms(self) -> float | None:
        return self.total.p50_ms

    @property
    def p95_ms(self) -> float | None:
        return self.total.p95_ms

    @property
    def p99_ms(self) -> float | None:
        return self.total.p99_ms

    @property
    def ok(self) -> bool:
        """At least one request answered, none failed."""
        return self.requests > 0 and self.failures == 0

    def row(self, name: str) -> RowStats | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(requests=self.requests, failures=self.failures, failure_pct=self.failure_pct, rps=self.rps,
                   images_per_s=self.images_per_s, p50_ms=self.p50_ms, p95_ms=self.p95_ms, p99_ms=self.p99_ms,
                   ok=self.ok)
        return out

    def table(self) -> str:
        head = f"{'name':<28} {'requests':>8} {'failures':>14} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        lines = [head, "-" * len(head)]
        for r in [*self.rows, self.total]:
            fails = f"{r.failures} ({r.failure_pct:.1f}%)"
            lines.append(f"{r.name:<28} {r.requests:>8} {fails:>14} {r.rps:>8.2f} "
                         f"{_ms(r.p50_ms):>8} {_ms(r.p95_ms):>8} {_ms(r.p99_ms):>8}")
        if self.images_per_request > 1:
            lines.append(f"{self.images_per_request} images per request: {self.images_per_s:.2f} images/s")
        for e in self.errors[:5]:
            lines.append(f"failure x{e['occurrences']} on {e['name']}: {e['error']}")
        if len(self.errors) > 5:
            lines.append(f"... {len(self.errors) - 5} more kinds of failure in {self.out_dir}/locust_failures.csv")
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


_TIMESPAN = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str | int | float) -> float:
    """Seconds in a locust time span: `30`, `30s`, `5m`, `1h30m`, `1m30s`."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            m = _TIMESPAN.match(s)
            if not s or not m:
                raise ValueError(f"duration {text!r}: expected e.g. 30s, 5m, 1h30m")
            h, mi, se = (int(g or 0) for g in m.groups())
            seconds = float(h * 3600 + mi * 60 + se)
    if seconds <= 0:
        raise ValueError(f"duration {text!r}: must be positive")
    return seconds


def _number(value: str | None) -> float | None:
    if value is None or value.strip() in ("", "N/A"):
        return None
    x = float(value)
    return None if math.isnan(x) else x


def read_stats(csv_path: Path) -> tuple[RowStats, list[RowStats]]:
    """The `Aggregated` row and the per-name rows of a locust `<prefix>_stats.csv`."""
    total, rows = None, []
    with open(csv_path, newline="") as f:
        for rec in csv.DictReader(f):
            requests, failures = int(rec["Request Count"]), int(rec["Failure Count"])
            row = RowStats(
                name=rec["Name"], method=rec["Type"], requests=requests, failures=failures,
                failure_pct=100.0 * failures / requests if requests else 0.0,
                rps=_number(rec["Requests/s"]) or 0.0,
                avg_ms=_number(rec["Average Response Time"]) if requests else None,
                p50_ms=_number(rec.get("50%")), p95_ms=_number(rec.get("95%")), p99_ms=_number(rec.get("99%")),
                max_ms=_number(rec["Max Response Time"]) if requests else None,
            )
            if rec["Name"] == "Aggregated" and not rec["Type"]:
                total = row
            else:
                rows.append(row)
    if total is None:
        raise LoadtestError(f"{csv_path}: no Aggregated row")
    return total, rows


def _error_text(text: str) -> str:
    """`CatchResponseError('HTTP 503 ...')` (locust's repr of a failure) → `HTTP 503 ...`."""
    m = re.fullmatch(r"CatchResponseError\((.*)\)", text, re.S)
    if m:
        try:
            return str(ast.literal_eval(m.group(1)))
        except (ValueError, SyntaxError):
            pass
    return text


def read_failures(csv_path: Path) -> list[dict]:
    """The rows of a locust `<prefix>_failures.csv`, most frequent first."""
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        out = [{"name": r["Name"], "method": r["Method"], "error": _error_text(r["Error"]),
                "occurrences": int(r["Occurrences"])} for r in csv.DictReader(f)]
    return sorted(out, key=lambda e: -e["occurrences"])


def _has_images(folder: Path) -> bool:
    return any(is_image_file(p) for p in folder.rglob("*"))


def _check_arguments(host: str, images_dir: Path, users: int, spawn_rate: float, images_per_request: int,
                     explain_share: float) -> None:
    """The load test's arguments, refused naming the one that is wrong before locust starts."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: not a folder of images")
    if not _has_images(images_dir):
        raise ValueError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    if users < 1 or spawn_rate <= 0 or images_per_request < 1:
        raise ValueError("users and images_per_request must be >= 1, spawn_rate > 0")
    if not 0 <= explain_share <= 1:
        raise ValueError(f"explain_share must be within 0..1, got {explain_share}")
    if not host.startswith(("http://", "https://")):
        raise ValueError(f"host {host!r}: expected http://HOST:PORT or https://...")


def _locust_env(images_dir: Path, images_per_request: int, explain_share: float, route: str, request_timeout: float,
                api_key: str | None, params: dict | None, xai_parameters: dict | None) -> dict[str, str]:
    """The locust subprocess's environment: how the locustfile learns what to send (none of the caller's own
    VISIONSERVE_* variables leak into it)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(VISIONSERVE_IMAGES=str(images_dir.resolve()), VISIONSERVE_IMAGES_PER_REQUEST=str(images_per_request),
               VISIONSERVE_EXPLAIN_SHARE=str(explain_share), VISIONSERVE_ROUTE=route,
               VISIONSERVE_TIMEOUT=str(request_timeout))
    if api_key:
        env["VISIONSERVE_API_KEY"] = api_key
    if params is not None:
        env["VISIONSERVE_PARAMS"] = json.dumps(params)
    if xai_parameters is not None:
        env["VISIONSERVE_XAI_PARAMETERS"] = json.dumps(xai_parameters)
    return env


def run_loadtest(host: str, images_dir: str | Path, *, users: int = 4, spawn_rate: float = 2, duration: str = "30s",
                 images_per_request: int = 1, api_key: str | None = None, explain_share: float = 0.0,
                 params: dict | None = None, out_dir: str | Path = "loadtest-report", route: str = "/score",
                 xai_parameters: dict | None = None, request_timeout: float = 180.0,
                 echo: bool = True) -> LoadtestSummary:
    """Load `host` with `users` concurrent clients for `duration`, each sending requests back to back;
    locust's CSV/HTML reports and summary.json go to `out_dir`. Failing requests are reported in the
    summary, not raised; LoadtestError means locust itself could not run."""
    images_dir = Path(images_dir)
    _check_arguments(host, images_dir, users, spawn_rate, images_per_request, explain_share)
    seconds = parse_duration(duration)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv", "_exceptions.csv"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)

    env = _locust_env(images_dir, images_per_request, explain_share, route, request_timeout, api_key, params,
                      xai_parameters)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "-u", str(users), "-r", str(spawn_rate), "-t", str(duration), "--csv", str(prefix),
           "--html", str(out / "report.html"), "--only-summary"]
    log_path = out / "locust.log"
    if echo:
        print(f"load test: {users} users against {host}{route} for {duration} (locust log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=seconds + 120)
        except subprocess.TimeoutExpired as exc:
            raise LoadtestError(f"locust did not stop within {seconds + 120:.0f} s; see {log_path}") from exc
    stats_path = Path(f"{prefix}_stats.csv")
    if not stats_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise LoadtestError(f"locust exited with code {proc.returncode} and wrote no statistics:\n{tail}")

    total, rows = read_stats(stats_path)
    summary = LoadtestSummary(
        host=host, route=route, users=users, spawn_rate=spawn_rate, duration=str(duration),
        images_per_request=images_per_request, explain_share=explain_share, params=params, total=total, rows=rows,
        errors=read_failures(Path(f"{prefix}_failures.csv")), locust_exit_code=proc.returncode, out_dir=str(out),
    )
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    if echo:
        print(summary.table())
        if proc.returncode != 0 and summary.failures == 0:
            print(f"note: locust exited with code {proc.returncode}; see {log_path}")
        print(f"reports: {out}/report.html, {out}/summary.json, {prefix}_stats.csv", flush=True)
    return summary


# --- `visionserve loadtest` -------------------------------------------------------------------------

def _parse_set(pairs: list[str]) -> dict | None:
    """`--set name=value` → params; values are read as JSON when they parse (0.5, true, [1, 2]), else text."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set {pair!r}: expected name=value")
        try:
            out[name.strip()] = json.loads(value)
        except ValueError:
            out[name.strip()] = value.strip()
    return out


def _loadtest(args: argparse.Namespace) -> int:
    api_key = None
    if args.api_key_file:
        api_key = Path(args.api_key_file).read_text().strip()
        if not api_key:
            raise ValueError(f"{args.api_key_file}: empty API key file")
    elif os.environ.get("VISIONSERVE_API_KEY"):
        api_key = os.environ["VISIONSERVE_API_KEY"]
    xai = None
    if args.xai_parameters:
        xai = json.loads(args.xai_parameters)
        if not isinstance(xai, dict):
            raise ValueError("--xai-parameters: expected a JSON object")
    try:
        summary = run_loadtest(
            args.host, args.images, users=args.users, spawn_rate=args.spawn_rate, duration=args.duration,
            images_per_request=args.images_per_request, api_key=api_key, explain_share=args.explain_share,
            params=_parse_set(args.set), out_dir=args.out, route=args.route, xai_parameters=xai,
            request_timeout=args.timeout,
        )
    except LoadtestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.requests == 0:
        print("no request completed within the run; try a longer --duration", file=sys.stderr)
    return 0 if summary.ok else 1


def add_loadtest_command(subparsers) -> argparse.ArgumentParser:
    """Register `visionserve loadtest` on an argparse subparsers object (func(args) -> exit code)."""
    p = subparsers.add_parser(
        "loadtest", help="load-test a scoring endpoint with locust (headless); exit 1 when any request fails",
        description="Send scoring requests in the cloud's format from concurrent clients and report requests/s, "
                    "latency percentiles and failures (reports in --out).")
    p.add_argument("--host", required=True, help="endpoint base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--images", required=True, help="folder of images to send (picked at random per request)")
    p.add_argument("--users", type=int, default=4, help="concurrent clients, each sending back to back (default 4)")
    p.add_argument("--spawn-rate", type=float, default=2, help="clients started per second (default 2)")
    p.add_argument("--duration", default="30s", help="run time, e.g. 30s, 5m, 1h30m (default 30s)")
    p.add_argument("--images-per-request", type=int, default=1, help="images per request (default 1)")
    p.add_argument("--api-key-file", help="file holding the endpoint's API key (default: $VISIONSERVE_API_KEY)")
    p.add_argument("--explain-share", type=float, default=0.0,
                   help="share 0..1 of requests that ask for explanations (default 0)")
    p.add_argument("--xai-parameters", metavar="JSON",
                   help='xai_parameters of explanation requests, e.g. {"xai_algorithm": "guided_backprop"} '
                        "(default: scoring.md's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a per-request parameter sent as params, e.g. --set box_score_thresh=0.5")
    p.add_argument("--route", default="/score", help="scoring route (default /score)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for one response (default 180)")
    p.add_argument("--out", default="loadtest-report", help="report folder (default loadtest-report)")
    p.set_defaults(func=_loadtest)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtests.run ...`: the same command without the visionserve CLI."""
    parser = argparse.ArgumentParser(prog="loadtest")
    sub = parser.add_subparsers(dest="command", required=True)
    add_loadtest_command(sub)
    args = parser.parse_args(["loadtest", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
