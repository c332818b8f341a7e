"""`visionserve hub`: the Image Analysis 4.0 model-customization API and many models by name, on Ray Serve."""

from __future__ import annotations

import argparse
from typing import Any

from models.errors import SettingsError
from serving.cli.flags import add_scoring_flags


def start(args: argparse.Namespace, *, block: bool = True) -> str:
    """Deploy the hub on the local Ray instance (or --address) and return its URL."""
    from serving.cli.flags import scoring_limits
    from serving.cli.serve import refuse_open_without_key, run_until_stopped
    from serving.hub.app import build_hub

    refuse_open_without_key(args, keyed=bool(args.api_key_file))
    if args.cache_size < 1 or args.model_replicas < 1:
        raise SettingsError(["--cache-size and --model-replicas must be at least 1"], "command line")
    hub = build_hub({"state_dir": args.state_dir, "image_root": args.image_root, "api_key_file": args.api_key_file,
                     "cache_size": args.cache_size, "model_replicas": args.model_replicas,
                     "model_cpus": args.model_cpus, **scoring_limits(args)})
    url = f"http://{args.host}:{args.port}"
    return run_until_stopped(args, lambda: hub, "visionserve-hub", f"visionserve hub at {url}  (state in "
                             f"{args.state_dir}; /computervision/..., POST /score, GET /models)",
                             "shutting down the hub", block=block)


def _hub(args: argparse.Namespace) -> int:
    start(args)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("hub", help="the Image Analysis 4.0 model-customization API and many models by name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", default="visionserve-hub", help="datasets, models, evaluations and the "
                   "Model Registry (sqlite) live here; everything survives a restart")
    p.add_argument("--image-root", help="where cloud blob URLs of COCO files and images are mapped to local files")
    p.add_argument("--api-key-file", help="require Ocp-Apim-Subscription-Key (or Authorization: Bearer) with this key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key-file")
    p.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--cache-size", type=int, default=3, help="models each model replica keeps loaded")
    p.add_argument("--model-replicas", type=int, default=1, help="replicas serving the models")
    p.add_argument("--model-cpus", type=float, default=0.5, help="CPUs per model replica")
    p.add_argument("--request-timeout-s", type=float, default=90.0)
    add_scoring_flags(p)
    p.set_defaults(func=_hub)
