"""deploy/: the Ray Serve configs (serve.yaml, hub.yaml and the one inside the KubeRay RayService) build their
applications as `serve build` would, the RayService has the shape a GPU cluster needs, the Grafana dashboard and
Prometheus config parse, and the Dockerfile serves both servers. (tests/test_cluster_serve.py runs Prometheus with
deploy/prometheus.yml and every dashboard query against a real cluster.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent


def _rayservice() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "rayservice-serve.yaml").read_text())


def _serve_configs() -> dict[str, dict[str, Any]]:
    return {"serve.yaml": yaml.safe_load((DEPLOY / "serve.yaml").read_text()),
            "hub.yaml": yaml.safe_load((DEPLOY / "hub.yaml").read_text()),
            "rayservice-serve.yaml serveConfigV2": yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])}


@pytest.fixture(scope="module")
def fresh_detector(tmp_path_factory) -> Path:
    """An exported Faster R-CNN with random weights (what export writes, without training): what stands here for
    the configs' models:/shelf-detector/3, a detector (their `set` has box_score_thresh)."""
    from models.export import ModelSettings, export_model
    from models.tasks.architectures import build_model, get_architecture
    from models.tasks.registry import get_task, inference_settings

    task = get_task("image_object_detection")
    spec = ModelSettings(task, "fasterrcnn_resnet18_fpn", ["shelf", "gap"],
                         inference_settings(task, {"min_size": 96, "max_size": 128}))
    model = build_model(get_architecture(spec.model_name, task.family), len(spec.labels), spec.settings)
    return export_model(tmp_path_factory.mktemp("detector") / "mlflow-model", spec, model.state_dict())


def _machine_args(args: dict[str, Any], tmp_path: Path, request) -> dict[str, Any]:
    """The builder's args with the paths of the cluster's machines (a key file, the hub's state) made here, and a
    detector of this machine for the registered model (a builder reads the model's settings as it builds)."""
    out = dict(args)
    if str(out.get("model", "")).startswith("models:/"):
        out["model"] = str(request.getfixturevalue("fresh_detector"))
    if "api_key_file" in out:
        key = tmp_path / "api-key"
        key.write_text("a key of the cluster")
        out["api_key_file"] = str(key)
    if "state_dir" in out:
        out["state_dir"] = str(tmp_path / "hub-state")
    return out


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if "serve" in name else [])
                                  for name in sorted(_serve_configs())])  # the detector's export takes ~30 s
def test_each_serve_config_builds_its_applications_as_serve_build_would(name, tmp_path, request):
    """The config is a valid Serve deploy config; each application's builder takes its args and returns an
    application; every deployment the config sets options for is one of that application's (Serve refuses a
    config naming another)."""
    import importlib

    from ray.serve import Application
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    config = _serve_configs()[name]
    schema = ServeDeploySchema.model_validate(config)
    assert schema.applications
    for app in schema.applications:
        module, _, attribute = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attribute)
        application = builder(_machine_args(app.args, tmp_path, request))
        assert isinstance(application, Application)
        built = {d.name: d for d in build_app(application, name=app.name).deployments}
        assert {d.name for d in app.deployments} <= set(built), (app.name, sorted(built))


def test_a_hubs_model_replicas_may_take_every_cpu_but_the_ingress_share(tmp_path):
    """HubJobs computes nothing (its runs are actors of their own), so it asks no CPU: a hub whose model replica
    takes all but 0.1 of a 2-CPU machine, as bench/hub.py's does, still fits beside one ingress replica."""
    from ray.serve._private.build_app import build_app

    from serving.hub.app import build_hub

    built = build_app(build_hub({"state_dir": str(tmp_path / "state"), "model_cpus": 1.9}), name="hub")
    cpus = {d.name: d.ray_actor_options.get("num_cpus") for d in built.deployments}
    assert cpus == {"HubModels": 1.9, "HubJobs": 0, "HubService": 0.1}


def test_the_hubs_pinned_deployments_keep_their_tracking_server():
    """A config's ray_actor_options replace the code's, runtime_env included: the overrides that pin HubJobs (and,
    its records being SQLite there, HubService) to the node with its state must give MLFLOW_TRACKING_URI again,
    the same as the application's tracking_uri."""
    [app] = _serve_configs()["hub.yaml"]["applications"]
    pinned = {d["name"]: d for d in app["deployments"]}
    assert set(pinned) == {"HubJobs", "HubService"}
    for hub in pinned.values():
        assert hub["ray_actor_options"]["resources"] == {"visionserve-hub-state": 0.01}
        assert hub["ray_actor_options"]["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == app["args"]["tracking_uri"]


def test_the_rayservice_runs_the_image_on_gpu_workers_with_the_tracking_server_from_a_secret():
    import ray

    service = _rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the nodes run the Ray the image has
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    [gpu] = cluster["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert head["image"] == worker["image"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    for container in (head, worker):
        [tracking] = [e for e in container["env"] if e["name"] == "MLFLOW_TRACKING_URI"]
        assert set(tracking["valueFrom"]["secretKeyRef"]) == {"name", "key"}
        assert {"containerPort": 8000, "name": "serve"} in container["ports"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": 8000}
    assert "readinessProbe" not in head  # KubeRay deploys the application through the head's Service
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["model"].startswith("models:/")  # the nodes share no files: a registered model
    key_mount = next(m for m in worker["volumeMounts"] if m["name"] == "api-key")["mountPath"]
    assert Path(app["args"]["api_key_file"]).parent == Path(key_mount)


def test_the_grafana_dashboard_plots_visionserves_series_per_application():
    dashboard = json.loads((DEPLOY / "grafana" / "visionserve-serve.json").read_text())
    assert dashboard["uid"] == "visionserve-serve"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert names == {"datasource", "application"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for series in ("images_total", "image_errors_total", "model_seconds", "batch_images", "explain_seconds"):
        assert any(f"ray_visionserve_{series}" in e for e in exprs), series
    assert all("$application" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_hub_dashboard_plots_the_hubs_series_and_rays_request_series_per_application():
    dashboard = json.loads((DEPLOY / "grafana" / "visionserve-hub.json").read_text())
    assert dashboard["uid"] == "visionserve-hub"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for series in ("hub_model_loads_total", "hub_model_evictions_total", "hub_model_load_seconds",
                   "hub_analyze_seconds", "hub_trainings", "images_total"):
        assert any(f"ray_visionserve_{series}" in e for e in exprs), series
    assert any("ray_serve_num_http_requests_total" in e for e in exprs)
    assert all("$application" in e for e in exprs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_prometheus_config_scrapes_every_node_through_rays_service_discovery_file():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_the_dockerfile_serves_both_servers_in_haproxy_mode():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["visionserve"]' in text and "EXPOSE 8000" in text
    for variable in ("RAY_SERVE_ENABLE_HA_PROXY=1", "RAY_SERVE_THROUGHPUT_OPTIMIZED=1", "RAY_SERVE_HAPROXY_RETRY_ON",
                     "RAY_SERVE_HAPROXY_RETRIES=6"):
        assert variable in text
    assert " serve models:/" in text and " hub " in text
