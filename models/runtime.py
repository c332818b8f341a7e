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
        chosen = serve_environment()
        os.environ.update(chosen)
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
        finally:  # this instance's own ports stay with it (its raylet has them), not with processes started later
            for name in _PER_INSTANCE.intersection(chosen):
                os.environ.pop(name, None)
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
