"""`visionserve hub`: the Image Analysis 4.0 model-customization API and many models by name, on Ray Serve."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from models.errors import SettingsError
from models.runtime import parse_resource_flags
from serving.cli.flags import add_cluster_flags, add_scoring_flags, env_flags
from serving.hub.scheduler import Quotas

QUOTA_FLAGS = {"datasets": "datasets the hub keeps", "models": "models the hub keeps",
               "evaluations": "evaluations per model", "waiting_trainings": "trainings waiting for a slot (more: 429)"}
# each a field of serving.hub.scheduler.Quotas, whose defaults the flags show


def start(args: argparse.Namespace, *, block: bool = True) -> str:
    """Deploy the hub on the local Ray instance (or --address) and return its URL."""
    from serving.cli.flags import scoring_limits
    from serving.cli.serve import refuse_open_without_key, run_until_stopped
    from serving.hub.app import build_hub

    env = env_flags(args)  # a malformed --env is refused first
    try:
        resources = parse_resource_flags(args.training_resources, "--training-resources")
    except ValueError as exc:
        raise SettingsError([str(exc)], "command line") from None
    refuse_open_without_key(args, keyed=bool(args.api_key_file))
    counts = {"--cache-size": args.cache_size, "--model-replicas": args.model_replicas,
              "--ingress-replicas": args.ingress_replicas,
              "--max-concurrent-trainings": 1 if args.max_concurrent_trainings is None else args.max_concurrent_trainings,
              **{f"--max-{what.replace('_', '-')}": getattr(args, f"max_{what}") for what in QUOTA_FLAGS}}
    low = [f"{flag} {value}: must be at least 1" for flag, value in counts.items() if value < 1]
    memory = args.model_memory_mb
    if memory is not None and not (math.isfinite(memory) and memory > 0):
        low.append(f"--model-memory-mb {memory:g}: must be a positive number of MB")
    if low:
        raise SettingsError(low, "command line")
    quotas = {what: getattr(args, f"max_{what}") for what in QUOTA_FLAGS}
    limits = scoring_limits(args)
    state = _open_state(args)  # after every flag is checked: a refused command line writes nothing
    hub = build_hub({"state_dir": args.state_dir, "state_db": args.state_db, "image_root": args.image_root,
                     "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),  # else the registry in --state-dir
                     "api_key_file": args.api_key_file, "cache_size": args.cache_size, "model_memory_mb": memory,
                     "model_replicas": args.model_replicas, "ingress_replicas": args.ingress_replicas,
                     "model_cpus": args.model_cpus, "env": env, "quotas": quotas,
                     "max_concurrent_trainings": args.max_concurrent_trainings, "training_resources": resources,
                     **limits})
    url = f"http://{args.host}:{args.port}"
    return run_until_stopped(args, lambda: hub, "visionserve-hub", f"visionserve hub at {url}  (state in "
                             f"{state}; /computervision/..., POST /score, GET /models)",
                             "shutting down the hub", block=block)


def _open_state(args: argparse.Namespace) -> str:
    """The records' database, reached (and a JSON state folder imported) before Ray starts: a wrong --state-db is
    the command line's error, not a replica's. Where the state is, as it is shown (no password)."""
    from serving.hub.state import StateDbError, Store

    try:
        store = Store(args.state_dir, args.state_db)
    except StateDbError as exc:
        raise SettingsError([str(exc)], "command line") from None
    store.engine.dispose()
    return f"{args.state_dir}, records in {store.shown_url}" if args.state_db else args.state_dir


def _hub(args: argparse.Namespace) -> int:
    from serving.cli.serve import exit_code

    return exit_code(start, args)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("hub", help="the Image Analysis 4.0 model-customization API and many models by name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", default="visionserve-hub", help="datasets, models, evaluations and the Model "
                   "Registry (sqlite; MLFLOW_TRACKING_URI names another) live here; everything survives a restart")
    p.add_argument("--state-db", default=os.environ.get("VISIONSERVE_STATE_DB"), help="the records' database: "
                   "postgresql://USER:PASSWORD@HOST:PORT/DB for several hub ingress replicas (default: SQLite in "
                   "--state-dir; also read from VISIONSERVE_STATE_DB, which keeps a password off the command line)")
    p.add_argument("--image-root", help="where cloud blob URLs of COCO files and images are mapped to local files")
    p.add_argument("--api-key-file", help="require Ocp-Apim-Subscription-Key (or Authorization: Bearer) with this key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key-file")
    add_cluster_flags(p)
    p.add_argument("--cache-size", type=int, default=3, help="models each model replica keeps loaded (at most)")
    p.add_argument("--model-memory-mb", type=float, help="what the models of each model replica may hold, in MB, "
                   "measured as each loads: past it the least valuable go (by recency and load time per MB), to be "
                   "loaded again on their next call (default: no budget, --cache-size alone)")
    p.add_argument("--model-replicas", type=int, default=1, help="replicas serving the models")
    p.add_argument("--model-cpus", type=float, default=0.5, help="CPUs per model replica")
    p.add_argument("--ingress-replicas", type=int, default=1, help="replicas answering the API (stateless: records "
                   "in the database, runs owned by one HubJobs replica); on several nodes give --state-db")
    p.add_argument("--request-timeout-s", type=float, default=90.0)
    p.add_argument("--max-concurrent-trainings", type=int, help="trainings side by side; the others wait, in "
                   "order, notStarted (default: one per two CPUs of the Ray cluster)")
    p.add_argument("--training-resources", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each training (its actor and every trial) and evaluation asks for "
                        "(repeatable): they run on the nodes started with it (ray start --resources), a GPU node "
                        "group, say. A training's trials run on the node its actor runs on")
    defaults = Quotas()
    for what, help_ in QUOTA_FLAGS.items():
        p.add_argument(f"--max-{what.replace('_', '-')}", type=int, dest=f"max_{what}", help=help_,
                       default=getattr(defaults, what))
    add_scoring_flags(p)
    p.set_defaults(func=_hub)
