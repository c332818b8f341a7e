"""Where work runs: the process's torch thread, and the Ray instance (a cluster to join, or a local
instance started with Ray Serve's high-throughput ingress); what travels to the processes of a cluster
(the environment they need); this process's download folder; also ports and readiness for the servers
this project starts."""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def torch_thread() -> ThreadPoolExecutor:
    """This process's torch thread: one worker, created on first use, reused for the process's life.

    OpenMP, torch's CPU parallelism, keeps a thread team per calling thread. Once a process has a second
    team, libgomp manages more threads than there are CPUs and stops spin-waiting between parallel regions.
    Measured on 2 CPUs: a training that took 12.0 s on the thread that had already used torch took 18.9 s
    on a second thread, and a serve replica whose batches went through asyncio's thread pool scored 36
    instead of 42 images/s. Processes that would call torch from threads they do not own (a reused Ray
    Tune trial actor calls each trial from a new thread; a Ray Serve replica's event loop hands work to a
    pool) send that work here instead."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionserve-torch")


def ensure_ray(address: str | None = None, num_cpus: float | None = None, *, log_to_driver: bool = True,
               env: Mapping[str, str] | None = None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), else start a local instance; once per process.

    Every task and actor of this process's job (and a Serve deployment without a runtime_env of its own) gets
    `env` in its environment; on a cluster also `travelling_env()`, since a process on another node has only
    that node's environment."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        try:
            ray.init(address=address, log_to_driver=log_to_driver,
                     runtime_env={"env_vars": {**travelling_env(), **(env or {})}})
        except ConnectionError as exc:
            raise ValueError(f"Ray cluster at {address} (--address or RAY_ADDRESS): {_why_not_joined(exc)}") from None
        log.info("joined the Ray cluster at %s", address)
    else:
        _same_environment_for_workers()
        chosen = serve_environment()
        os.environ.update(chosen)
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     runtime_env={"env_vars": dict(env)} if env else None)
        finally:  # this instance's own ports stay with it (its raylet has them), not with processes started later
            for name in _PER_INSTANCE.intersection(chosen):
                os.environ.pop(name, None)
        log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))


def _why_not_joined(exc: BaseException) -> str:
    """Why Ray could not join a cluster, in a sentence: its own message is a traceback chained to the cause."""
    chain, cause = [], exc
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    if any("InvalidAuthToken" in text or "AuthenticationError" in text for text in chain):
        return ("the cluster refused this process's Ray authentication token: give it the cluster's token in "
                "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (with RAY_AUTH_MODE=token)")
    return "nothing answered there as a Ray cluster; check the address and that the head node runs"


def _nodes(having: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """The alive nodes of the Ray instance this process is connected to that have every resource `having` names
    (where work that asks for them may run)."""
    import ray

    return [node for node in ray.nodes()
            if node.get("Alive") and all(name in node["Resources"] for name in having or {})]


def node_cpus(having: Mapping[str, float] | None = None) -> list[float]:
    """The CPUs of each alive node (of those that have the resources `having` names)."""
    return [node["Resources"].get("CPU", 0.0) for node in _nodes(having)]


def free_cpus(having: Mapping[str, float]) -> float:
    """The most CPUs free now on one alive node that has every resource `having` names (0: none has them)."""
    from ray._private.state import available_resources_per_node  # Ray's per-node view (ray.util.tpu reads it too)

    free = available_resources_per_node()
    return max((free.get(node["NodeID"], {}).get("CPU", 0.0) for node in _nodes(having)), default=0.0)


def cpus_each(count: int, nodes: list[float], available: float | None = None) -> int:
    """Whole CPUs for each of `count` equal pieces of work (trials, training workers) that each run on one node:
    the most that lets the nodes hold all of them at once (a node of n CPUs holds n // c pieces of c), at most
    `available` / count (the CPUs free now, cluster-wide), at least 1 (then some pieces wait for others).
    Two 8-CPU nodes give one piece 8 CPUs, not 16 (no node has 16: it would never be scheduled)."""
    cap = int(max(nodes, default=1.0))
    if available is not None:
        cap = min(cap, int(available // max(count, 1)))
    for cpus in range(cap, 1, -1):
        if sum(int(n // cpus) for n in nodes) >= count:
            return cpus
    return 1


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster to join: `address`, else RAY_ADDRESS; None means a local instance."""
    return address or os.environ.get("RAY_ADDRESS") or None


# what a process on another node needs from this one's environment: where models and runs live, and this
# project's own settings (VISIONSERVE_*); secrets stay on the nodes (a runtime_env is visible to anyone who can
# read the cluster's job table), or are given with `--env` knowingly
TRAVELLING = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
TRAVELLING_PREFIX = "VISIONSERVE_"


def travelling_env() -> dict[str, str]:
    """The variables of this process's environment that its work on other nodes needs (TRAVELLING and
    VISIONSERVE_*), MLflow's URIs made absolute. A tracking URI that is a file on this machine is logged as a
    warning: processes on other nodes would each write to (or read from) their own disk."""
    env = {name: value for name, value in os.environ.items()
           if name in TRAVELLING or name.startswith(TRAVELLING_PREFIX)}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        if env.get(name):
            env[name] = absolute_tracking_uri(env[name])
            if is_local_store(env[name]):
                log.warning("%s=%s is a store on this machine: processes on other nodes of the cluster cannot "
                            "reach it; use an MLflow tracking server (http://...) or a database", name, env[name])
    return env


def absolute_tracking_uri(uri: str) -> str:
    """An MLflow tracking URI with a relative path (a folder, sqlite:///relative.db) made absolute."""
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def is_local_store(uri: str) -> bool:
    """Whether an MLflow URI is a folder or sqlite file of this machine."""
    return "://" not in uri or uri.startswith(("file:", "sqlite:"))


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env_flags(pairs: list[str], flag: str = "--env") -> dict[str, str]:
    """`--env NAME=VALUE` flags → {NAME: VALUE}; a ValueError naming the pair that is not one."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not ENV_NAME.fullmatch(name):
            raise ValueError(f"{flag} {pair!r}: expected NAME=VALUE with NAME made of letters, digits and _")
        out[name] = value
    return out


BUILT_IN = {"CPU", "GPU", "memory", "object_store_memory"}  # Ray's own resources, asked for by their own options


def resource_asks(asks: dict[str, Any], what: str) -> dict[str, float]:
    """{NAME: AMOUNT} of custom Ray resources (those a node was started with, `ray start --resources`) checked:
    each a name of its own and a positive finite amount; a ValueError naming `what` and the one that is not."""
    out = {}
    for name, amount in asks.items():
        if not isinstance(name, str) or not name or name in BUILT_IN or name.startswith("node:"):
            raise ValueError(f"{what} {name!r}: a custom resource's name (not {', '.join(sorted(BUILT_IN))} or "
                             "node:..., which Ray places by itself)")
        try:
            amount = float(amount)
        except (TypeError, ValueError):
            amount = math.nan
        if not (math.isfinite(amount) and amount > 0):
            raise ValueError(f"{what} {name}={asks[name]!r}: the amount must be a positive number")
        out[name] = amount
    return out


def parse_resource_flags(pairs: list[str], flag: str) -> dict[str, float]:
    """`FLAG NAME=AMOUNT` flags → {NAME: AMOUNT} (resource_asks); a ValueError naming the pair that is not one."""
    asks = {}
    for pair in pairs:
        name, sep, amount = pair.partition("=")
        if not sep:
            raise ValueError(f"{flag} {pair!r}: expected NAME=AMOUNT (a custom Ray resource and how much of it)")
        asks[name] = amount
    return resource_asks(asks, flag)


def _same_environment_for_workers() -> None:
    """A local instance's workers run this very interpreter and environment: under `uv run`, Ray would
    otherwise build a fresh environment from a copy of the working directory for its workers (tens of
    seconds for every new worker process here, e.g. each sweep trial's)."""
    from ray._private import ray_constants

    if os.environ.get("RAY_ENABLE_UV_RUN_RUNTIME_ENV") is None:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False


# the ports one local instance takes for itself: a process this one starts (another `visionserve serve`)
# that inherited them would try to bind the same ones and fail (HAProxy: "Address already in use")
_PER_INSTANCE = frozenset({"RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"})


def serve_environment() -> dict[str, str]:
    """The variables below that this process's environment does not set already (what is set wins):
    Ray Serve's high-throughput mode, for a Ray instance this process starts (a cluster's nodes need
    the first four set when they start; the Docker image sets them). HAProxy takes the HTTP port and
    sends each request straight to a replica's own HTTP server (no Serve proxy actor in between), and
    the replica runs request handling on its main event loop. Measured on 2 CPUs (bench/serve_throughput.py):
    2 replicas x 1 CPU went from 44 to 57-63 images/s at concurrency 8.

    When a replica dies, HAProxy tries a request that failed on it again on a fresh pick (Ray's config
    has `option redispatch 1`); once it has marked the replica down (3 failed connections), that is the
    head node's Serve proxy (the `backup` server), which waits for the new replica or answers 503.
    Ray's `retry-on conn-failure` covers only a connection that could not be made; HAProxy also sends
    requests over connections it keeps open to the replica, and when such a request fails without an
    answer it closes the client's connection without one (a signal that the client may retry it).
    RAY_SERVE_HAPROXY_RETRY_ON adds `empty-response` (the replica closed the connection without
    answering), and RAY_SERVE_HAPROXY_RETRIES gives 6 tries instead of HAProxy's 3, which can all go
    to the dead replica before it is marked down. Measured by killing the one replica under load from
    3 clients: tests/test_serve.py lost 3 requests with Ray's defaults and 3 with `empty-response` and
    3 tries (HAProxy logged one as a 503 after its 3 tries on the dead replica); with both it lost 1,
    sent 19 ms before the process died, while two others in flight took 5 and 2 tries and were answered
    200 by the head node's proxy 18 s later. A stand-in replica (a 0.15 s handler, 8 KB bodies) lost 3
    with 6 tries alone, 1 with both in each of 5 runs, and none in 2 runs with both and no body. What
    is still lost: a request with a body that the replica had when its process died (HAProxy keeps no
    copy of such a body to send again; Ray's config neither buffers bodies nor has a variable for it),
    and, on a loaded machine, one HAProxy sent over a kept-alive connection in the moment before it
    noticed the process was gone (2 requests sent 60 ms after it, at a load average of 10 on 2 CPUs).
    Retrying is safe because scoring is idempotent, and bounded: a refused connection fails at once, a
    try waits at most the 5 s connection timeout.

    The rest keeps two local instances on one machine apart (HAProxy's stats and metrics ports, and
    the port of the head node's Serve proxy that HAProxy falls back on: with Ray's fixed 8500, one
    instance's HAProxy sent requests meant for its dead replica to the other instance's proxy, which
    answered 404) and lets a local endpoint stop in seconds (replicas wait this long for load balancers
    to drop them before closing; 30 s by default)."""
    wanted = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        "RAY_SERVE_HAPROXY_RETRIES": "6",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(reserved_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(reserved_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(reserved_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(reserved_port()),
    }
    return {name: value for name, value in wanted.items() if name not in os.environ}


DOWNLOADS = "visionserve-downloads"


@functools.cache
def downloads_folder() -> Path:
    """This process's folder for what it downloads (a model from MLflow), under the temp folder: removed when
    the process exits; a folder that a process killed outright left behind is removed by the next process that
    makes its own on that machine (`remove_orphaned_downloads`). MLflow's own default, a new temp folder per
    download, was never removed."""
    remove_orphaned_downloads()
    folder = Path(tempfile.gettempdir()) / DOWNLOADS / (_process_tag(os.getpid()) or f"{os.getpid()}-0")
    folder.mkdir(parents=True, exist_ok=True)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def remove_orphaned_downloads() -> list[str]:
    """Remove the download folders of processes of this machine that no longer run; → their names."""
    root = Path(tempfile.gettempdir()) / DOWNLOADS
    gone: list[str] = []
    if not Path("/proc/self/stat").is_file():  # no way to tell which processes run: keep everything
        return gone
    for folder in root.glob("*-*") if root.is_dir() else ():
        pid = folder.name.split("-")[0]
        if pid.isdigit() and _process_tag(int(pid)) != folder.name:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder.name)
    return gone


def _process_tag(pid: int) -> str:
    """`PID-START`: the process's id and start time (so a later process given the same id is another one);
    "" when no such process runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{pid}-{fields[19]}"  # starttime, the 22nd field of /proc/PID/stat
    except (OSError, IndexError):
        return ""


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def reserved_port() -> int:
    """A TCP port nothing listens on now, below the kernel's ephemeral range and above Ray's worker ports
    (10002-19999), so that no later connection or bind to port 0 takes it: a port a Ray instance binds
    again and again (HAProxy's, each time Serve starts in the process) stays free for it. A port from
    `free_port` is in the ephemeral range: anything that binds port 0 between two starts of Serve can
    take it, and HAProxy then fails to start ("Address already in use")."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(20000, max(low, 20001)))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    return free_port()


def wait_until_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Block until GET `url` answers 200 from the server `proc` started (its output in `log`); a
    RuntimeError with the log's tail if it exits first or is not ready within `timeout` seconds."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"not ready after {timeout:g} s:\n{log.read_text()[-3000:]}")
