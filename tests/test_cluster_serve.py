"""`visionserve serve` on a two-node Ray cluster without a shared filesystem (tests/cluster.py): a registered model
served by replicas on both nodes with nothing but MLFLOW_TRACKING_URI set for the command, a folder only the head
has refused before anything deploys, a deployment that fails removed with its reason, Prometheus reading both
replicas' series, and a stop that removes this application and every node's model downloads."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cluster import dashboard_queries, stop_command
from models.runtime import DOWNLOADS, reserved_port, wait_until_ready

pytestmark = pytest.mark.slow

VISIONSERVE = str(Path(sys.executable).parent / "visionserve")
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _serve_flags(cluster) -> list[str]:
    # Serve's HTTP port and proxy location are the cluster's (the first start decides them): HAProxy on the head
    # only, since both nodes share this machine's ports
    return ["--address", cluster.address, "--proxy-location", "HeadOnly", "--port", str(cluster.serve_port)]


def _applications(cluster) -> dict:
    answer = httpx.get(f"{cluster.dashboard}/api/serve/applications/", timeout=30,
                       headers={"Authorization": f"Bearer {cluster.token}"})
    return answer.json().get("applications") or {}


def _our_error(stderr: str) -> str:
    """The command's own error (from its last line that starts with "error: " to the end; Ray's log lines before
    it may contain "error: " too)."""
    return stderr[stderr.rindex("\nerror: ") + 1:]


def _body(synth) -> dict:
    data = synth("image_classification", images=12, validation_fraction=0.0)
    line = json.loads(Path(data.train_jsonl).read_text().splitlines()[0])
    image = base64.b64encode((Path(data.train_jsonl).parent / line["image_url"]).read_bytes()).decode()
    return {"input_data": {"columns": ["image"], "data": [image]}}


def test_a_model_folder_only_the_head_has_is_refused_naming_the_folder_and_the_node(cluster, trained):
    result, _ = trained("image_classification")  # under the session's tmp folder: the head's /tmp only
    started = time.monotonic()
    done = cluster.visionserve("serve", str(result.model_dir), *_serve_flags(cluster), timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"MODEL {result.model_dir}: not an MLflow model folder on node {cluster.node_ids['node2'][:12]}" \
        in done.stderr
    assert "Every node of the Ray cluster must see a model folder at the same path" in done.stderr
    assert "models:/NAME/VERSION" in done.stderr and "Traceback" not in done.stderr
    assert cluster.node_ids["head"][:12] not in done.stderr  # the head sees it
    assert "visionserve" not in _applications(cluster)  # refused before anything deployed
    print(f"refused in {time.monotonic() - started:.1f} s")


def test_a_command_with_another_token_than_the_clusters_is_refused_saying_so(cluster, cluster_model):
    """The cluster runs with Ray's token authentication: a command with another token is refused naming the
    cluster and where the token goes, not with a traceback, and deploys nothing. (Without a token at all Ray
    answers the same.)"""
    done = cluster.visionserve("serve", cluster_model, *_serve_flags(cluster), timeout=300, RAY_AUTH_TOKEN="wrong")
    assert done.returncode == 2, done.stdout + done.stderr
    error = _our_error(done.stderr)
    assert error.startswith(f"error: Ray cluster at {cluster.address} (--address or RAY_ADDRESS): the cluster "
                            "refused this process's Ray authentication token")
    assert "RAY_AUTH_TOKEN" in error and "Traceback" not in done.stderr
    assert "visionserve" not in _applications(cluster)


def _leave_a_failed_application(cluster) -> None:
    """An application that failed to deploy at "/" (as `serve deploy` of a broken config leaves one)."""
    code = f"""
import ray
from ray import serve
ray.init(address={cluster.address!r}, log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options={{"host": "127.0.0.1", "port": {cluster.serve_port}}})

@serve.deployment(ray_actor_options={{"num_cpus": 0}})
class Broken:
    def __init__(self):
        raise RuntimeError("broken on purpose")

try:
    serve.run(Broken.bind(), name="broken", route_prefix="/")
except RuntimeError:
    print("DEPLOY_FAILED")
"""
    done = subprocess.run([sys.executable, "-c", code], env=cluster.env(), capture_output=True, text=True,
                          timeout=300)
    assert "DEPLOY_FAILED" in done.stdout, done.stderr[-3000:]
    assert _applications(cluster)["broken"]["status"] == "DEPLOY_FAILED"


def test_a_deploy_that_fails_on_its_replicas_is_removed_with_their_reason_and_frees_the_route(cluster, cluster_model):
    """The replicas get the --env values (a tracking server nobody listens at), so they fail where the command's
    own check of the model passed; the command ends with their reason and leaves no application behind, also
    removing an earlier application that failed at the same route."""
    _leave_a_failed_application(cluster)
    started = time.monotonic()
    done = cluster.visionserve("serve", cluster_model, *_serve_flags(cluster), "--env",
                               "MLFLOW_TRACKING_URI=http://127.0.0.1:1", "--env", "MLFLOW_HTTP_REQUEST_MAX_RETRIES=0",
                               "--deploy-timeout-s", "240", timeout=400)
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert "removing application 'broken', which failed to deploy and held /" in done.stdout
    error = _our_error(done.stderr)
    assert error.startswith("error: application 'visionserve' failed to deploy: ")
    assert "http://127.0.0.1:1" in error and "It was removed; nothing holds /" in error
    assert _applications(cluster) == {}
    print(f"failed deploy reported in {seconds:.1f} s")


@pytest.fixture(scope="module")
def served(cluster, cluster_model, tmp_path_factory):
    """`visionserve serve models:/vs-cluster/1` with 2 replicas of 1.5 CPUs, more than a node has for two: one
    replica on each node. Only MLFLOW_TRACKING_URI is set for the command; the nodes have none."""
    log = tmp_path_factory.mktemp("cluster-serve") / "serve.log"
    proc = subprocess.Popen([VISIONSERVE, "serve", cluster_model, *_serve_flags(cluster), "--replicas", "2",
                             "--cpus-per-replica", "1.5"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=cluster.env(), cwd=cluster.head_only, start_new_session=True)
    url = f"http://127.0.0.1:{cluster.serve_port}"
    started = time.monotonic()
    try:
        _wait_for_line(proc, log, "visionserve is serving", timeout=400)  # every replica running
        print(f"served on the cluster in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield url, proc, log
    finally:
        stop_command(proc)


def _wait_for_line(proc: subprocess.Popen, log: Path, line: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {line!r}:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def _replicas(cluster) -> list[dict]:
    return cluster.state("actors", class_name="ServeReplica:visionserve:VisionService", state="ALIVE")


def _burst(url: str, body: dict, requests: int = 16) -> list[int]:
    """`requests` scoring requests 8 at a time (HAProxy sends each to the replica with the fewest open ones)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: httpx.post(f"{url}/score", json=body, timeout=120).status_code,
                             range(requests)))


def test_a_registered_model_is_served_by_replicas_on_both_nodes(served, cluster, synth):
    url, _, log = served
    replicas = _replicas(cluster)
    assert len(replicas) == 2 and cluster.nodes_of(replicas) == {"head", "node2"}
    assert _burst(url, _body(synth)) == [200] * 16
    metadata = httpx.get(f"{url}/metadata", timeout=30).json()
    assert metadata["model"] == "models:/vs-cluster/1" and metadata["backend"] in ("onnx", "onnx-int8")
    assert "layout: 2 replicas x 1.5 CPUs each" in log.read_text()
    # each replica downloaded the model into its own process's folder, on its own node
    head_pid = next(r["pid"] for r in replicas if r["node_id"] == cluster.node_ids["head"])
    node2_pid = next(r["pid"] for r in replicas if r["node_id"] == cluster.node_ids["node2"])
    head_folders = os.listdir(Path("/tmp") / DOWNLOADS)
    assert any(name.startswith(f"{head_pid}-") for name in head_folders)
    listed = cluster.on_node2("ls", f"/tmp/{DOWNLOADS}")
    assert listed.returncode == 0 and f"{node2_pid}-" in listed.stdout, listed.stderr


def _prometheus(cluster, folder: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus with deploy/prometheus.yml (every node Ray's service discovery file names), every 2 s."""
    port = reserved_port()
    config = (DEPLOY / "prometheus.yml").read_text()
    config = config.replace("/tmp/ray/prom_metrics_service_discovery.json",
                            str(cluster.ray_temp / "prom_metrics_service_discovery.json"))
    (folder / "prometheus.yml").write_text(config.replace("10s", "2s").replace("30s", "2s"))
    proc = subprocess.Popen(["prometheus", f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=(folder / "prometheus.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/-/ready", proc, folder / "prometheus.log", timeout=60)
    return proc, url


def _by_node(cluster, url: str, query: str) -> dict[str, float]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=30).json()
    ports = {str(port): name for name, port in cluster.metrics_ports.items()}
    return {ports.get(row["metric"]["instance"].rsplit(":", 1)[-1], "?"): float(row["value"][1])
            for row in answer["data"]["result"]}


def _an_error_and_an_explanation(url: str, body: dict) -> None:
    image = body["input_data"]["data"][0]
    explain = json.dumps({"image_base64": image, "model_explainability": True,
                          "xai_parameters": {"xai_algorithm": "guided_backprop", "visualizations": False}})
    answer = httpx.post(f"{url}/score?partial=true", timeout=300,
                        json={"input_data": {"columns": ["image"], "data": ["bm90IGFuIGltYWdl", explain]}})
    assert answer.status_code == 200, answer.text
    assert answer.json()[0]["error"]["code"] == "not_an_image" and "probs" in answer.json()[1]


def test_prometheus_reads_the_serve_series_of_the_replicas_on_both_nodes(served, cluster, synth, tmp_path):
    """Prometheus with deploy/prometheus.yml finds both nodes through Ray's service discovery file and reads
    visionserve's series of both replicas; every query of the Grafana dashboard answers."""
    url, _, _ = served
    proc, prometheus = _prometheus(cluster, tmp_path)
    try:
        _an_error_and_an_explanation(url, _body(synth))
        deadline, seen = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            assert _burst(url, _body(synth), 8) == [200] * 8
            seen = _by_node(cluster, prometheus, 'sum by (instance) '
                            '(ray_visionserve_images_total{application="visionserve",route="/score"})')
            if seen.get("head", 0) > 0 and seen.get("node2", 0) > 0:
                break
            time.sleep(3)
        assert seen.get("head", 0) > 0 and seen.get("node2", 0) > 0, seen
        for series in ("ray_visionserve_model_seconds_count", "ray_visionserve_batch_images_count"):
            assert set(_by_node(cluster, prometheus, f"sum by (instance) ({series})")) >= {"head", "node2"}
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=30).json()["data"]["activeTargets"]
        assert all(t["health"] == "up" for t in targets), targets
        empty = dashboard_queries(DEPLOY / "grafana" / "visionserve-serve.json", "visionserve")
        while empty and time.monotonic() < deadline + 60:  # a rate needs two scrapes of a series
            empty = [q for q in empty if not httpx.get(f"{prometheus}/api/v1/query", params={"query": q},
                                                       timeout=30).json()["data"]["result"]]
            time.sleep(2)
        assert empty == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_stopping_removes_this_application_only_and_every_nodes_model_downloads(served, cluster):
    url, proc, log = served
    pids = {r["pid"] for r in _replicas(cluster)}
    proc.send_signal(signal.SIGTERM)  # docker stop, Kubernetes
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "shutting down the endpoint" in log.read_text()
    assert _applications(cluster) == {} and _replicas(cluster) == []
    # Serve itself keeps running for the cluster's other applications: its controller and the head's proxy
    assert cluster.state("actors", class_name="ServeController", state="ALIVE")
    leftovers = [name for name in os.listdir(Path("/tmp") / DOWNLOADS) if int(name.split("-")[0]) in pids]
    assert leftovers == []
    listed = cluster.on_node2("ls", f"/tmp/{DOWNLOADS}")
    assert not any(int(name.split("-")[0]) in pids for name in listed.stdout.split()), listed.stdout
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{url}/score", json={}, timeout=10).raise_for_status()
