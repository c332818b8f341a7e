"""A Ray cluster of two nodes on this machine, the second one as if it were another machine, and an MLflow
tracking server with proxied artifact storage: what tests/test_cluster.py runs on.

The head node and the tracking server are this process's children. The second node runs in a private mount
namespace (`unshare -m`, which needs root, as on CI) in which /tmp is an empty tmpfs: the head's temp folders,
the tests' tmp_path folders (the trained models among them), the tracking server's files and the head's Ray
session are not there, so code that reads a path only the head has fails on that node as it would on a second
machine. `shared` (under /var/tmp) stands for the storage every node of a real cluster mounts (the training data,
the images to score, each machine's pretrained-weights cache). The second node has the custom resource
{"node2": 1}, so a test can place work there; where work ran is read back from the dashboard's state API.

Both nodes share one network namespace, so each has its own dashboard agent, metrics and HAProxy ports, and
Serve's HTTP proxy runs on the head only (`--proxy-location HeadOnly`): HAProxy on both would bind one port.

The cluster runs with Ray's token authentication (RAY_AUTH_MODE=token) and a token of its own in RAY_AUTH_TOKEN,
given to its nodes and to the commands run against it: everything visionserve does must work where the token is
on, and the machine's own ~/.ray/auth_token (which turns token auth on for Ray processes that find it; a local
`ray.init` writes one) neither helps nor hinders.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

from models.runtime import reserved_port
from weights_cache import cache_dirs

BIN = Path(sys.executable).parent
NODE_CPUS = 2  # each node's logical CPUs (the machine's 2 cores are shared with everything else)
OBJECT_STORE_BYTES = 300 * 1024 * 1024


@dataclass
class Cluster:
    address: str  # the head's GCS, what `--address` / RAY_ADDRESS take
    dashboard: str  # the head's dashboard (state API)
    tracking_uri: str  # the MLflow tracking server
    shared: Path  # a folder every node sees
    head_only: Path  # a folder only the head sees (under /tmp)
    metrics_ports: dict[str, int]  # node name ("head", "node2") → its Ray metrics export port
    serve_port: int  # Serve's HTTP port: one per cluster, chosen by whoever starts Serve first
    ray_temp: Path  # the head's Ray folder (Prometheus's service discovery file is in it)
    node2_pid: int  # a process in the second node's mount namespace
    token: str  # Ray's authentication token of this cluster
    node_ids: dict[str, str] = field(default_factory=dict)  # node name → Ray node id
    logs: Path = Path()
    start_seconds: float = 0.0

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a command run against the cluster (from the head's machine)."""
        return {**_without_auth(os.environ), **self.auth_env(), "RAY_ADDRESS": self.address,
                "MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", **extra}

    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def visionserve(self, *args: str, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
        """Run `visionserve ARGS` against the cluster; its output comes back as text."""
        return subprocess.run([str(BIN / "visionserve"), *args], env=self.env(**extra), capture_output=True,
                              text=True, timeout=timeout, cwd=self.head_only)

    def state(self, kind: str, **filters: str) -> list[dict]:
        """Rows of the state API (`actors`, `tasks`, `nodes`), each filter `key=value`."""
        params = [("limit", "10000"), ("detail", "1")]
        for key, value in filters.items():
            params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        response = httpx.get(f"{self.dashboard}/api/v0/{kind}", params=params, timeout=60,
                             headers={"Authorization": f"Bearer {self.token}"})
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def on_node2(self, *command: str) -> subprocess.CompletedProcess:
        """Run `command` in the second node's mount namespace (what that "machine" sees)."""
        return subprocess.run(["nsenter", "--target", str(self.node2_pid), "--mount", "--", *command],
                              capture_output=True, text=True, timeout=60)

    def ids(self, kind: str) -> set[str]:
        """The ids of every actor or task (and attempt) the state API knows now: what a later `new` leaves out."""
        return {self._id(kind, row) for row in self.state(kind)}

    def new(self, kind: str, before: set[str], **filters: str) -> list[dict]:
        """The actors or tasks (matching `filters`) that were not there `before`."""
        return [row for row in self.state(kind, **filters) if self._id(kind, row) not in before]

    @staticmethod
    def _id(kind: str, row: dict) -> str:
        return row["actor_id"] if kind == "actors" else f"{row['task_id']}:{row.get('attempt_number', 0)}"

    def nodes_of(self, rows: list[dict]) -> set[str]:
        """The node names ("head", "node2") the state API rows ran on."""
        names = {node_id: name for name, node_id in self.node_ids.items()}
        return {names.get(row.get("node_id") or (row.get("address") or {}).get("node_id"), "?") for row in rows}


def _without_auth(env: dict[str, str] | os._Environ) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}


def _node_env(shared: Path, token: str) -> dict[str, str]:
    """A node's own environment: the cluster's token, Ray Serve's HAProxy mode with this node's own ports (as
    models.runtime sets for a local instance), and the machine's pretrained-weights cache; no MLflow tracking
    URI (what a remote process needs has to travel with it)."""
    env = {k: v for k, v in _without_auth(os.environ).items()
           if not k.startswith(("RAY_SERVE_", "MLFLOW_")) and k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    env.update(cache_dirs(shared / "weights"))
    env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response", "RAY_SERVE_HAPROXY_RETRIES": "6",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"})
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        env[name] = str(reserved_port())
    return env


def _ray_start(*args: str, agent_port: int, metrics_port: int) -> list[str]:
    return [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(NODE_CPUS),
            "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(agent_port), "--metrics-export-port", str(metrics_port), *args]


def _private_tmp(command: list[str]) -> list[str]:
    """`command` in a mount namespace of its own whose /tmp is an empty tmpfs."""
    script = 'mount -t tmpfs -o size=4g,mode=1777 vs-node2-tmp /tmp && exec "$0" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, *command]


class _Processes:
    """The processes the fixture started, each in a process group of its own, stopped in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.started = logs, []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        # cwd "/": a process whose working directory is a head-only folder would keep it past the tmpfs
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/",
                                start_new_session=True)
        self.started.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM to every group (`ray start --block` and the node's processes; the server and its workers),
        then SIGKILL to whatever of them is left after `grace_s`."""
        for _, proc in reversed(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, proc in reversed(self.started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def _wait(what: str, ready, processes: _Processes, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check()
        with contextlib.suppress(httpx.HTTPError, OSError, KeyError, ValueError):
            if ready():
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout:g} s")


@contextlib.contextmanager
def two_node_cluster(weights_cache: Path) -> Iterator[Cluster]:
    """Start the tracking server, the head and the second node; stop them all (also on failure)."""
    head_only = Path(tempfile.mkdtemp(prefix="vs-cluster-", dir="/tmp"))
    # the head's Ray session folder: its path is every node's (a node creates it under its own /tmp), so it is
    # not under head_only, where it would make a head-only folder's path exist on the second node
    ray_temp = Path(tempfile.mkdtemp(prefix="vs-rayc-", dir="/tmp"))
    shared = Path(tempfile.mkdtemp(prefix="vs-shared-", dir="/var/tmp"))
    logs = head_only / "logs"
    logs.mkdir()
    shutil.copytree(weights_cache, shared / "weights")  # each machine's own pretrained-weights cache
    processes = _Processes(logs)
    try:
        yield _start(processes, head_only, shared, ray_temp)
    finally:
        processes.stop()
        for folder in (head_only, ray_temp, shared):
            shutil.rmtree(folder, ignore_errors=True)


def _start(processes: _Processes, head_only: Path, shared: Path, ray_temp: Path) -> Cluster:
    mlflow_port, gcs_port, dashboard_port = reserved_port(), reserved_port(), reserved_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    processes.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{head_only / 'mlflow.db'}", "--serve-artifacts", "--artifacts-destination",
                               str(head_only / "artifacts"), "-h", "127.0.0.1", "-p", str(mlflow_port), "--workers", "1"],
                    env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner processes
    metrics = {"head": reserved_port(), "node2": reserved_port()}
    address = f"127.0.0.1:{gcs_port}"
    token = secrets.token_hex(32)
    processes.start("head", _ray_start("--head", "--port", str(gcs_port), "--include-dashboard", "true",
                                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                                       "--temp-dir", str(ray_temp), "--resources", json.dumps({"head": 1}),
                                       agent_port=reserved_port(), metrics_port=metrics["head"]),
                    env=_node_env(shared, token))
    cluster = Cluster(address, f"http://127.0.0.1:{dashboard_port}", tracking, shared, head_only, metrics,
                      serve_port=reserved_port(), ray_temp=ray_temp, node2_pid=0, token=token, logs=processes.logs)
    _wait("the head node", lambda: len(cluster.state("nodes", state="ALIVE")) == 1, processes)
    node2 = processes.start("node2", _private_tmp(_ray_start("--address", address, "--resources", json.dumps({"node2": 1}),
                                                     agent_port=reserved_port(), metrics_port=metrics["node2"])),
                    env=_node_env(shared, token))
    cluster.node2_pid = node2.pid  # unshare, then sh, then `ray start` in one process
    _wait("the second node", lambda: len(cluster.state("nodes", state="ALIVE")) == 2, processes)
    for node in cluster.state("nodes", state="ALIVE"):
        cluster.node_ids["node2" if "node2" in node["resources_total"] else "head"] = node["node_id"]
    _wait("the MLflow tracking server", lambda: httpx.get(f"{tracking}/health", timeout=5).status_code == 200,
          processes)
    return cluster


def stop_command(proc: subprocess.Popen, timeout: float = 120) -> None:
    """A `visionserve` command stopped as docker or Kubernetes stops it (SIGTERM), killed if it will not stop."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dashboard_queries(path: Path, application: str) -> list[str]:
    """Every query of a Grafana dashboard (deploy/grafana/*.json), for one Serve application."""
    dashboard = json.loads(path.read_text())
    return [target["expr"].replace("$__rate_interval", "1m").replace("$application", application)
            for panel in dashboard["panels"] for target in panel["targets"]]
