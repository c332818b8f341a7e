"""Where work runs: the process's torch thread, and the Ray instance (a cluster to join, or a local
instance started with Ray Serve's high-throughput ingress); also ports and readiness for the servers
this project starts."""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def ensure_ray(address: str | None = None, num_cpus: float | None = None, *, log_to_driver: bool = True) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), else start a local instance; once per process."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        log.info("joined the Ray cluster at %s", address)
    else:
        _same_environment_for_workers()
        os.environ.update(serve_environment())
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
        log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster to join: `address`, else RAY_ADDRESS; None means a local instance."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _same_environment_for_workers() -> None:
    """A local instance's workers run this very interpreter and environment: under `uv run`, Ray would
    otherwise build a fresh environment from a copy of the working directory for its workers (tens of
    seconds for every new worker process here, e.g. each sweep trial's)."""
    from ray._private import ray_constants

    if os.environ.get("RAY_ENABLE_UV_RUN_RUNTIME_ENV") is None:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False


def serve_environment() -> dict[str, str]:
    """The variables below that this process's environment does not set already (what is set wins):
    Ray Serve's high-throughput mode, for a Ray instance this process starts (a cluster's nodes need
    the first two set when they start; the Docker image sets them). HAProxy takes the HTTP port and
    sends each request straight to a replica's own HTTP server (no Serve proxy actor in between), and
    the replica runs request handling on its main event loop. Measured on 2 CPUs (bench/serve_throughput.py):
    2 replicas x 1 CPU went from 44 to 57-63 images/s at concurrency 8. The rest keeps two local instances
    on one machine apart (HAProxy's stats and metrics ports) and lets a local endpoint stop in seconds
    (replicas wait this long for load balancers to drop them before closing; 30 s by default)."""
    wanted = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }
    return {name: value for name, value in wanted.items() if name not in os.environ}


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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
