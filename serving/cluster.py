"""A Serve application on a Ray cluster of several machines: a model folder every node can see, a deployment
that is running within a bounded time or else removed (never left holding its route), and a stop that removes
this application only, leaving no model download behind on any node.

What a remote process needs from this one's environment travels in the job's runtime_env
(`models.runtime.ensure_ray`); a deployment with a runtime_env of its own gets it from `replica_env`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from models.errors import SettingsError
from models.runtime import cluster_address, remove_orphaned_downloads, travelling_env

log = logging.getLogger(__name__)

PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")
NODE_CHECK_S = 60.0  # how long a node may take to say whether it sees a folder


class DeployError(RuntimeError):
    """An application that did not start (its replicas' reason, and where they ran); it was removed."""


def on_cluster(address: str | None) -> bool:
    """Whether the command joins a Ray cluster (`--address` or RAY_ADDRESS) rather than starting its own."""
    return cluster_address(address) is not None


def replica_env(own: Mapping[str, str], flags: Mapping[str, str], *, cluster: bool) -> dict[str, str]:
    """A deployment's environment variables: on a cluster what travels (`travelling_env`), then the deployment's
    `own` (e.g. ONNX Runtime's), then `--env` flags, the last winning. A deployment that sets a runtime_env of
    its own does not inherit the job's (Ray Serve's rule), so it carries all three."""
    return {**(travelling_env() if cluster else {}), **own, **flags}


def _has_model(path: str) -> bool:
    return (Path(path) / "MLmodel").is_file()


def _node_name(node: Mapping[str, Any]) -> str:
    return f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"


def nodes_without(path: Path, timeout_s: float = NODE_CHECK_S) -> list[str]:
    """The cluster's alive nodes on which `path` is not an MLflow model folder (or that did not answer within
    `timeout_s`), each named. One task per node, pinned to it, asking for no CPU (a busy node still answers)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_has_model)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(str(path)) for node in nodes]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    missing = []
    for node, ref in zip(nodes, refs):
        if ref not in done:
            missing.append(f"{_node_name(node)}: no answer within {timeout_s:g} s")
            ray.cancel(ref, force=True)
        elif not ray.get(ref):
            missing.append(_node_name(node))
    return missing


def check_every_node_sees(model: str, folder: Path) -> None:
    """On a cluster, a model given as a folder must be at that path on every node: it is not copied to them.
    A SettingsError names the folder and the nodes that lack it, and says what to do instead."""
    if str(model).startswith(("models:/", "runs:/")) or "://" in str(model):
        return
    missing = nodes_without(folder)
    if missing:
        raise SettingsError([f"MODEL {folder}: not an MLflow model folder on {', '.join(missing)}. Every node of "
                             "the Ray cluster must see a model folder at the same path (shared storage); the "
                             "folder is not copied to the nodes. Or register it in MLflow and serve "
                             "models:/NAME/VERSION (the nodes download it from the tracking server)"],
                            "command line")


def _details() -> dict[str, Any]:
    """Serve's details of every application (route prefixes, replicas and their nodes); {} if unavailable.
    (Ray's public `serve.status()` has neither routes nor nodes; its dashboard REST API has both, but a cluster
    need not run a dashboard.)"""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().get_serve_details()
    except Exception as exc:  # noqa: BLE001  (a private API of Ray: the messages just say less without it)
        log.debug("no Serve details: %s", exc)
        return {}


def free_route(name: str, route_prefix: str, say: Callable[[str], None]) -> None:
    """Remove an application that failed to deploy and still holds `route_prefix` (or is called `name`): it
    answers nothing, and Serve would refuse a new application on its route."""
    from ray import serve

    for app_name, app in (_details().get("applications") or {}).items():
        failed = str(app.get("status", "")).endswith("DEPLOY_FAILED")
        if failed and (app_name == name or app.get("route_prefix") == route_prefix):
            say(f"removing application {app_name!r}, which failed to deploy and held {app.get('route_prefix')}")
            serve.delete(app_name)


def _replicas_not_running(name: str) -> list[str]:
    nodes = {}
    app = (_details().get("applications") or {}).get(name) or {}
    for deployment in (app.get("deployments") or {}).values():
        for replica in deployment.get("replicas") or []:
            state = str(replica.get("state", "")).rsplit(".", 1)[-1]
            if state != "RUNNING":
                node = f"node {str(replica.get('node_id') or '?')[:12]} ({replica.get('node_ip') or '?'})"
                nodes.setdefault(node, set()).add(state)
    return [f"{node}: {', '.join(sorted(states))}" for node, states in sorted(nodes.items())]


def _why(name: str) -> str:
    """The application's and its deployments' messages, each cut to its first and last line (a replica's
    traceback ends with the exception), and where its replicas that do not run are."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return "the application is gone"
    parts = [app.message] + [f"{dep}: {d.message}" for dep, d in app.deployments.items() if d.message]
    lines = []
    for part in filter(None, (p.strip() for p in parts)):
        rows = [row.strip() for row in part.splitlines() if row.strip()]
        lines.append(rows[0] if len(rows) == 1 else f"{rows[0]} ... {rows[-1]}")
    where = _replicas_not_running(name)
    return "; ".join(lines + ([f"replicas not running on {'; '.join(where)}"] if where else []))


def deploy(app, name: str, route_prefix: str, timeout_s: float, say: Callable[[str], None]) -> None:
    """Run `app` as `name` at `route_prefix` and wait until it runs. If it fails to deploy, or is not running
    after `timeout_s` (a replica that fails on one node only keeps Serve retrying for ever), it is removed and
    a DeployError says why and where."""
    from ray import serve

    free_route(name, route_prefix, say)
    try:
        _in_background(serve.run, app, name=name, route_prefix=route_prefix).result(timeout=timeout_s)
        return
    except FutureTimeout:
        problem = f"not running after {timeout_s:g} s (--deploy-timeout-s)"
    except RuntimeError as exc:  # Serve's "Deploying application ... failed"
        log.debug("deploy failed: %s", exc)
        problem = "failed to deploy"
    reason = _why(name)
    serve.delete(name)
    raise DeployError(f"application {name!r} {problem}: {reason}. It was removed; nothing holds {route_prefix}")


STOP_S = 60.0  # how long a stop waits for Serve to remove the application


def stop(name: str, *, cluster: bool, say: Callable[[str], None] = print) -> None:
    """Remove this application; on a cluster only it (other applications keep running), on an instance of its
    own Serve altogether. Then each node removes the model downloads its ended replicas left. A removal Serve has
    not finished within STOP_S (a replica still starting) goes on without this process."""
    import ray
    from ray import serve

    if cluster:
        try:
            _in_background(serve.delete, name).result(timeout=STOP_S)
        except FutureTimeout:
            say(f"Serve is still removing application {name!r} after {STOP_S:g} s; it goes on without this command")
            return
        remove_downloads_on_every_node()
    else:
        serve.shutdown()
        ray.shutdown()  # the instance's replicas end with it
        remove_orphaned_downloads()


def _in_background(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """`call(*args, **kwargs)` on a daemon thread, which never holds up this process's exit (a pool's thread would:
    Python joins those at exit) → its Future, for a caller that waits a bounded time."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001  (handed to the waiting caller)
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="visionserve-serve").start()
    return future


def remove_downloads_on_every_node(timeout_s: float = NODE_CHECK_S) -> None:
    """On each alive node, the download folders of processes that no longer run are removed (a replica is
    ended outright, so its own clean-up at exit never runs)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(remove_orphaned_downloads)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
            for node in ray.nodes() if node.get("Alive")]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
