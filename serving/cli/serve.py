"""`visionserve serve`: start the online endpoint on Ray Serve and block until interrupted."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import SettingsError
from serving.cli.flags import (add_backend_flag, add_cluster_flags, add_scoring_flags, add_set_flag, env_flags,
                                parse_param_flags, scoring_limits)

if TYPE_CHECKING:
    from serving.backends import ScoringPlan
    from serving.loading import ModelFolder


def deployment_options(args: argparse.Namespace, plan: ScoringPlan | None = None) -> dict[str, Any]:
    """Ray Serve deployment options from the flags: replicas or autoscaling, CPUs/GPUs, capacity; `plan`: what the
    replicas will score with (its processes' environment), with what travels to a cluster and --env
    (serving.cluster.replica_env)."""
    from ray.serve.config import BackpressureConfig

    from serving.cluster import on_cluster, replica_env

    actor: dict[str, Any] = {"num_cpus": _cpus_per_replica(args), "num_gpus": args.gpus_per_replica}
    own = plan.replica_env() if plan is not None else {}
    env = replica_env(own, env_flags(args), cluster=on_cluster(args.address))
    if env:
        actor["runtime_env"] = {"env_vars": env}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=args.retry_after_s),
    }
    if args.autoscale:
        low, sep, high = args.autoscale.partition(":")
        if not sep or not low.isdigit() or not high.isdigit() or int(high) < max(int(low), 1):
            raise SettingsError([f"--autoscale {args.autoscale!r}: expected MIN:MAX such as 1:4"], "command line")
        options["autoscaling_config"] = {"min_replicas": int(low), "max_replicas": int(high),
                                         "target_ongoing_requests": max(1, args.max_batch_size // 2)}
    else:
        options["num_replicas"] = args.replicas
    return options


def _cpus_per_replica(args: argparse.Namespace) -> float:
    """--cpus-per-replica; by default, on a local instance of CPU replicas, this machine's CPUs shared
    among the fixed number of replicas (a replica's torch runs that many threads); else 1."""
    if args.cpus_per_replica is not None:
        return args.cpus_per_replica
    from models.runtime import cluster_address

    if args.autoscale or args.gpus_per_replica or cluster_address(args.address):
        return 1.0
    return (os.cpu_count() or 1) / args.replicas


def key_of(args: argparse.Namespace) -> str | None:
    """The API key's SHA-256 from --api-key-file (refused when missing or empty), or None; refused when --host
    reaches beyond this machine without one (see refuse_open_without_key)."""
    from serving.access import read_key_file

    digest = read_key_file(args.api_key_file) if args.api_key_file else None
    refuse_open_without_key(args, keyed=digest is not None)
    return digest


def _config(args: argparse.Namespace, plan: ScoringPlan, limits: dict[str, Any], digest: str | None):
    from serving.app import ServiceConfig
    from serving.scoring import ScoringLimits

    return ServiceConfig.of(args.model, plan, ScoringLimits(**limits), overrides=parse_param_flags(args.set, "--set"),
                            api_key_sha256=digest)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan_replicas(args: argparse.Namespace) -> tuple[ModelFolder, ScoringPlan]:
    """Before Ray starts, once: the model folder (settings.json and --set read and checked) and what its replicas
    will score with (a NoPlan when the backend cannot score it)."""
    from serving.loading import ModelFolder

    folder = ModelFolder.open(args.model, parse_param_flags(args.set, "--set"))
    compile = None if args.compile else False  # compiled where torch scores a CPU classifier, unless --no-compile
    return folder, folder.plan(args.backend, "cuda" if args.gpus_per_replica else "cpu", compile)


def layout_line(args: argparse.Namespace, plan: ScoringPlan) -> str:
    """What the replicas will be and what scores on them, why, and the flags that change it."""
    replicas = f"{args.autoscale} replicas (autoscaled)" if args.autoscale else \
        f"{args.replicas} replica{'s' if args.replicas != 1 else ''}"
    gpus = f" + {args.gpus_per_replica:g} GPU" if args.gpus_per_replica else ""
    when = ", compiled as each replica starts" if plan.compiled else ""
    when += ", a batch per CPU side by side" if plan.side_by_side else ""
    why = f" ({plan.why})" if plan.why else ""
    return (f"layout: {replicas} x {_cpus_per_replica(args):g} CPUs{gpus} each, scoring on "
            f"{plan.engine.removesuffix(', compiled')}{when}{why}; change with --replicas, --cpus-per-replica, "
            "--backend")


def start(args: argparse.Namespace, *, block: bool = True) -> str:
    """Deploy the endpoint on the local Ray instance (or --address) and return its URL."""
    from serving.app import VisionService

    env_flags(args)  # the flags and the key first: a typo costs nothing
    limits = scoring_limits(args)
    digest = key_of(args)
    folder, plan = plan_replicas(args)
    config = _config(args, plan, limits, digest)
    print(layout_line(args, plan), flush=True)
    options = deployment_options(args, plan)
    url = f"http://{args.host}:{args.port}"
    return run_until_stopped(args, lambda: VisionService.options(**options).bind(asdict(config)),
                             "visionserve", f"visionserve is serving {args.model} at {url}  (POST /score, "
                             f"/invocations; docs at {url}/docs)", "shutting down the endpoint", block=block,
                             check=lambda: _check_on_cluster(args, args.model, folder.path))


def _check_on_cluster(args: argparse.Namespace, model: str, folder: Path) -> None:
    """On a cluster, a model folder must be at its path on every node (a models:/ URI is downloaded by each)."""
    from serving.cluster import check_every_node_sees, on_cluster

    if on_cluster(args.address):
        check_every_node_sees(model, folder)


def refuse_open_without_key(args: argparse.Namespace, *, keyed: bool) -> None:
    """--host beyond loopback needs an API key, or --insecure."""
    if not keyed and not _loopback(args.host) and not args.insecure:
        raise SettingsError([f"--host {args.host}: serving beyond this machine without an API key; give "
                             "--api-key-file KEYFILE, or --insecure to serve without one anyway"], "command line")


def run_until_stopped(args: argparse.Namespace, app, name: str, ready: str, stopping: str, *, block: bool,
                      check=None) -> str:
    """Start Serve on --host/--port (joining --address, else a local Ray instance; --proxy-location), call
    `check()` (a ValueError refuses to deploy), run `app()` as `name` at "/" (running within --deploy-timeout-s,
    else removed: serving.cluster.deploy), print `ready`; with `block`, wait for Ctrl-C or SIGTERM, then print
    `stopping` and remove the application (on a local instance: shut Serve down). Returns the URL."""
    import ray
    from ray import serve

    from models.runtime import ensure_ray
    from serving.cluster import deploy, on_cluster, stop

    if block:  # from here on: the endpoint answers 200 on /health/ready before deploy returns
        _stop_on_signals()
    try:
        ensure_ray(args.address, env=env_flags(args))
        if block:  # again: joining Ray installs a SIGTERM handler that ends the process before it cleans up
            _stop_on_signals()
        if check is not None:
            check()
        serve.start(proxy_location=args.proxy_location,
                    http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s})
        deploy(app(), name, "/", args.deploy_timeout_s, say=lambda message: print(message, flush=True))
        print(ready, flush=True)
        while block:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        print(stopping, flush=True)
        if ray.is_initialized():
            stop(name, cluster=on_cluster(args.address))
    return f"http://{args.host}:{args.port}"


def _stop_on_signals() -> None:
    """Ctrl-C, and the SIGTERM of `docker stop` or Kubernetes, shut the endpoint down cleanly
    (also when started in the background, where a shell would ignore SIGINT)."""
    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _serve(args: argparse.Namespace) -> int:
    if args.config:
        serve_bin = shutil.which("serve") or str(Path(sys.executable).parent / "serve")
        command = [serve_bin, "run", args.config] + (["--address", args.address] if args.address else [])
        from models.runtime import cluster_address, serve_environment

        local = not cluster_address(args.address)  # then `serve run` starts a local instance
        return subprocess.call(command, env={**os.environ, **serve_environment()} if local else None)
    if not args.model:
        raise SettingsError(["MODEL: give a model folder or MLflow URI (or --config serve.yaml)"], "command line")
    return exit_code(start, args)


def exit_code(start, args: argparse.Namespace) -> int:
    """`start(args)`; an application that did not deploy is exit code 1 with its reason, never a traceback."""
    from serving.cluster import DeployError

    try:
        start(args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a model on Ray Serve (POST /score, /invocations)")
    p.add_argument("model", nargs="?", help="MLflow model folder or URI (models:/name/1, runs:/<id>/mlflow-model)")
    p.add_argument("--config", help="a Ray Serve config file (applications: import_path serving.app:build_app)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    add_cluster_flags(p)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas")
    p.add_argument("--cpus-per-replica", type=float,
                   help="CPUs (torch threads) per replica; default: a local instance's CPUs shared among "
                        "--replicas, else 1")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="fractions allowed, e.g. 0.5")
    p.add_argument("--api-key-file", help="require Authorization: Bearer <the key in this file>")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without --api-key-file (anyone who can reach it may score)")
    add_set_flag(p, "override a settings.json inference setting, e.g. --set box_score_thresh=0.5")
    add_scoring_flags(p)
    p.add_argument("--max-ongoing-requests", type=int, default=16, help="concurrent requests per replica")
    p.add_argument("--max-queued-requests", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After of a 429")
    p.add_argument("--request-timeout-s", type=float, default=90.0)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="score with the eager model; by default a classifier that torch scores on CPU replicas "
                        "(--backend torch) is compiled (torch.compile) as the replica starts: 15-25 s more "
                        "start-up, more images/s")
    add_backend_flag(p)
    p.set_defaults(func=_serve)
