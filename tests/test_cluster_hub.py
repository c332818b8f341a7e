"""`visionserve hub` on the two-node cluster (tests/cluster.py), run as a user runs it there: MLFLOW_TRACKING_URI
names the cluster's tracking server, whose registered models its model replica loads. Prometheus
with deploy/prometheus.yml reads the hub's own series (serving/hub/metrics.py: loads, evictions by a memory budget,
load and analyze seconds by model, trainings) and Ray Serve's request series from the nodes, and every query of
deploy/grafana/visionserve-hub.json answers."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cluster import BIN, dashboard_queries, stop_command
from postgres import Postgres
from test_cluster_serve import _body, _by_node, _prometheus, _wait_for_line

pytestmark = pytest.mark.slow
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
V = {"api-version": "2023-04-01-preview"}
NAMES = ("vs-cluster", "vs-cluster-b")
HUB = '{application="visionserve-hub"}'  # the hub's application, as `visionserve hub` names it


@pytest.fixture(scope="module")
def hub_on_cluster(cluster, cluster_model, tmp_path_factory):
    """The hub with one model replica and a 1 MB memory budget: each model's load evicts the other (a second
    name registered for the same model); its datasets in the storage every node sees, its trainings on the second
    node (--training-resources node2=0.01: a resource only that node has), its records in PostgreSQL (what every
    replica reads, on either node) and the rest of its state in a head-only folder."""
    import mlflow

    from conftest import tracking_at

    with tracking_at(cluster.tracking_uri):
        version = mlflow.MlflowClient().get_model_version("vs-cluster", cluster_model.rsplit("/", 1)[1])
        mlflow.register_model(f"runs:/{version.run_id}/mlflow-model", NAMES[1])
    log = tmp_path_factory.mktemp("cluster-hub") / "hub.log"
    with Postgres() as state_db:
        yield from _hub(cluster, log, state_db)


def _hub(cluster, log: Path, state_db: str):
    proc = subprocess.Popen([str(BIN / "visionserve"), "hub", "--address", cluster.address, "--proxy-location",
                             "HeadOnly", "--port", str(cluster.serve_port), "--state-dir",
                             str(cluster.head_only / "hub-state"), "--model-replicas", "1", "--model-cpus", "1",
                             "--model-memory-mb", "1", "--cache-size", "2", "--image-root", str(cluster.shared),
                             "--training-resources", "node2=0.01", "--state-db", state_db],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=cluster.env(),
                            cwd=cluster.head_only, start_new_session=True)
    try:
        _wait_for_line(proc, log, "visionserve hub at", timeout=400)
        yield f"http://127.0.0.1:{cluster.serve_port}", log
    finally:
        stop_command(proc)


def _requests(url: str, body: dict, image: bytes) -> None:
    """Scores and analyzes with both names in turn: each call of the other name loads it again."""
    for name in NAMES * 3:
        scored = httpx.post(f"{url}/score", params={"model": name}, json=body, timeout=300)
        assert scored.status_code == 200, scored.text
        analyzed = httpx.post(f"{url}/computervision/imageanalysis:analyze", params={**V, "model-name": name},
                              content=image, headers={"content-type": "application/octet-stream"}, timeout=300)
        assert analyzed.status_code == 200, analyzed.text


def test_prometheus_reads_the_hubs_series_from_the_cluster_and_every_dashboard_query_answers(
        hub_on_cluster, cluster, synth, tmp_path):
    import base64

    url, log = hub_on_cluster
    body = _body(synth)
    image = base64.b64decode(body["input_data"]["data"][0])
    proc, prometheus = _prometheus(cluster, tmp_path)
    try:
        _requests(url, body, image)
        models = httpx.get(f"{url}/models", timeout=60).json()
        replicas = models["cache"]["replicas"]
        assert replicas and all(r["budget_mb"] == 1 for r in replicas), models["cache"]
        deadline, seen = time.monotonic() + 120, {}
        wanted = ("ray_visionserve_hub_model_loads_total", "ray_visionserve_hub_model_evictions_total",
                  "ray_visionserve_hub_analyze_seconds_count", "ray_visionserve_hub_trainings")
        while time.monotonic() < deadline:
            seen = {series: _by_node(cluster, prometheus, f'sum by (instance) ({series}{HUB})') for series in wanted}
            if all(seen.values()):
                break
            _requests(url, body, image)
            time.sleep(3)
        assert all(seen.values()), seen
        loads = _by_node(cluster, prometheus, f"sum by (instance) (ray_visionserve_hub_model_loads_total{HUB})")
        assert sum(loads.values()) >= 2, loads
        empty = dashboard_queries(DEPLOY / "grafana" / "visionserve-hub.json", "visionserve-hub")
        while empty and time.monotonic() < deadline + 60:  # a rate needs two scrapes of a series
            empty = [q for q in empty if not httpx.get(f"{prometheus}/api/v1/query", params={"query": q},
                                                       timeout=30).json()["data"]["result"]]
            if empty:
                _requests(url, body, image)
                time.sleep(2)
        assert empty == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_hub_training_runs_on_the_second_node_from_shared_data_and_its_model_comes_back_through_the_tracking_server(
        hub_on_cluster, cluster):
    """The training's actor and its trials run on the second node, whose copy of the head-only state folder is an
    empty tmpfs: it reads its dataset from the shared storage, tells the hub where it is through its actor (the
    status and progress the API shows), and registers its model with the tracking server, from which the model
    replica loads it."""
    import mlflow

    from conftest import tracking_at
    from test_hub import write_coco

    url, _ = hub_on_cluster
    coco = write_coco(cluster.shared / "hub-data" / "cls", "imageClassification")
    before = cluster.ids("actors")
    seen = set()
    with httpx.Client(base_url=url, params=V, timeout=120) as client:
        assert client.put("/computervision/datasets/cls", json={
            "annotationKind": "imageClassification", "annotationFileUris": [str(coco)]}).status_code == 201
        assert client.put("/computervision/models/on-node2", json={"trainingParameters": {
            "trainingDatasetName": "cls", "timeBudgetInHours": 0.1, "modelKind": "Generic-Classifier"}}).status_code == 201
        deadline, record, said = time.monotonic() + 900, {}, {}
        while time.monotonic() < deadline:
            got, progress = client.get("/computervision/models/on-node2"), client.get("/models/on-node2/progress")
            assert got.status_code == progress.status_code == 200, (got.text, progress.text)
            record, said = got.json(), progress.json()
            seen |= {record["status"]} | ({"reported"} if said.get("message") else set())
            if record["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(2)
        assert record["status"] == "succeeded", (record, said)
        assert {"training", "reported"} <= seen  # what the training said on the second node reached the API
        analyzed = client.post("/computervision/imageanalysis:analyze", params={**V, "model-name": "on-node2"},
                               content=(coco.parent / "red-0.png").read_bytes(),
                               headers={"content-type": "application/octet-stream"})
        assert analyzed.status_code == 200, analyzed.text
    runners = cluster.new("actors", before, class_name="_Runner")
    trials = cluster.new("actors", before, class_name="ImplicitFunc")
    assert runners and cluster.nodes_of(runners) == {"node2"}
    assert trials and cluster.nodes_of(trials) == {"node2"}
    job = cluster.head_only / "hub-state" / "jobs" / "on-node2"
    assert not (job / "train.jsonl").exists()  # its working files are on the node that trained...
    assert cluster.on_node2("test", "-f", str(job / "train.jsonl")).returncode == 0  # ...not on the head
    with tracking_at(cluster.tracking_uri):
        [version] = mlflow.MlflowClient().search_model_versions("name='on-node2'")
    assert record["modelPerformance"] and version.run_id
