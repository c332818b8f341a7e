"""Batch scoring, data-parallel training and a sweep on a two-node Ray cluster without a shared filesystem
(tests/cluster.py): each puts work on both nodes (proven by where the state API says its tasks and actors ran),
reads its inputs from storage every node has, and gets what it produced to the driver through the MLflow
tracking server or Ray, never from the disk of the node that produced it (outputs go to a head-only folder, which
on the second node is an empty tmpfs)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import tracking_at

pytestmark = pytest.mark.slow

FAST = {"model_name": "resnet18", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
        "training_batch_size": 4, "validation_batch_size": 8, "number_of_epochs": 1, "num_workers": 0,
        "warmup_cosine_lr_warmup_epochs": 0, "early_stopping": 0}


@pytest.fixture(scope="module")
def shared_data(cluster):
    """16 labelled images in the folder every node sees."""
    from models.data.synth import write_synthetic_dataset

    return write_synthetic_dataset("image_classification", cluster.shared / "data", 16, image_size=(128, 96), seed=3)


def _job(cluster, shared_data, name: str, **doc) -> Path:
    body = {"task": "image_classification", "training_data": {"path": str(shared_data.train_jsonl)},
            "validation_data": {"path": str(shared_data.validation_jsonl)}, "experiment_name": "cluster",
            "training_parameters": FAST, **doc}
    path = cluster.shared / f"{name}.yml"
    path.write_text(yaml.safe_dump(body))
    return path


def _printed_json(stdout: str) -> dict:
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])[0]  # Ray's worker lines may follow it


def test_batch_scoring_reads_and_scores_on_both_nodes_and_answers_every_image_once(cluster, cluster_model):
    """The scoring actor on the second node downloads models:/vs-cluster/1 from the tracking server (its node has
    no MLFLOW_TRACKING_URI of its own); the images are on storage both nodes see; the output is head-only."""
    from models.data.synth import write_synthetic_dataset

    data = write_synthetic_dataset("image_classification", cluster.shared / "to-score", 32, image_size=(128, 96),
                                   seed=4, validation_fraction=0.0)
    output = cluster.head_only / "batch" / "scored.jsonl"
    before = cluster.ids("tasks")
    done = cluster.visionserve("score", cluster_model, "--input", str(data.images_dir), "--output", str(output),
                               "--concurrency", "2", "--batch-size", "2", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    keys = [line["image"] for line in lines]
    assert len(keys) == len(set(keys)) == len(list(data.images_dir.iterdir())) == 32  # each image once
    assert all(set(line) == {"image", "probs", "labels"} for line in lines)
    reads = cluster.new("tasks", before, name="MapBatches(_read_batch)")
    scores = cluster.new("tasks", before, name="MapWorker(MapBatches(Scorer)).submit")
    assert cluster.nodes_of(reads) == {"head", "node2"}, [(r["node_id"], r["state"]) for r in reads]
    assert cluster.nodes_of(scores) == {"head", "node2"}, [(r["node_id"], r["state"]) for r in scores]
    assert all(row["state"] == "FINISHED" for row in reads + scores)


def test_distributed_training_has_one_worker_per_node_and_its_model_comes_back_through_the_tracking_server(
        cluster, shared_data):
    """Rank 0 may run on the second node: its checkpoint and model go to its MLflow run on the tracking server,
    and the driver downloads the model into --output (a head-only folder rank 0 never saw)."""
    job = _job(cluster, shared_data, "distributed", properties={"node_count_per_trial": "2"})
    output = cluster.head_only / "distributed"
    before = cluster.ids("actors")
    done = cluster.visionserve("train", str(job), "--output", str(output), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    workers = cluster.new("actors", before, class_name="RayTrainWorker")
    assert len(workers) == 2 and cluster.nodes_of(workers) == {"head", "node2"}
    # each worker holds the 2 CPUs of its node (sized per node: a node holds one)
    assert all(max(v for k, v in w["required_resources"].items() if k.startswith("CPU_group")) == 2 for w in workers)
    assert "Ray Train: 2 workers (2 CPU each)" in done.stderr
    result = _printed_json(done.stdout)
    assert result["model_dir"] == str(output / "mlflow-model") and (output / "mlflow-model" / "MLmodel").is_file()
    rank0 = done.stderr.split("trained by rank 0 on node ")[1][:12]
    assert rank0 in {node_id[:12] for node_id in cluster.node_ids.values()}
    with tracking_at(cluster.tracking_uri):
        client = mlflow.MlflowClient()
        logged = {f.path for f in client.list_artifacts(result["run_id"])}
        assert {"mlflow-model", "checkpoints", "workers.json"} <= logged
        assert [f.path for f in client.list_artifacts(result["run_id"], "checkpoints")] == ["checkpoints/best.pt"]
        ranks = mlflow.artifacts.load_dict(f"runs:/{result['run_id']}/workers.json")["workers"]
        assert [w["rank"] for w in ranks] == [0, 1]
        model_uuid = mlflow.models.Model.load(f"runs:/{result['run_id']}/mlflow-model").model_uuid
    assert mlflow.models.Model.load(str(output / "mlflow-model")).model_uuid == model_uuid


def test_a_sweeps_trials_run_on_both_nodes_each_with_a_nodes_cpus_and_their_files_stay_there(cluster, shared_data):
    """Two trials at a time, each sized to one node (2 CPUs, not half the cluster's 4 free CPUs... which is the
    same here; tests/test_runtime.py has the sizes where they differ). The trial on the second node writes its
    files on that node only: the sweep learns how each trial went from a Ray actor and exports the best model from
    its MLflow run."""
    job = _job(cluster, shared_data, "sweep", limits={"max_trials": 2, "max_concurrent_trials": 2},
               search_space=[{"learning_rate": {"type": "choice", "values": [0.001, 0.02]}}],
               sweep={"sampling_algorithm": "grid"})
    output = cluster.head_only / "sweep"
    before = cluster.ids("actors")
    done = cluster.visionserve("train", str(job), "--output", str(output), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 at a time with 2 CPU / 0.0 GPU each" in done.stderr
    trials = cluster.new("actors", before, class_name="ImplicitFunc")
    assert len(trials) == 2 and cluster.nodes_of(trials) == {"head", "node2"}
    result = _printed_json(done.stdout)
    assert (output / "mlflow-model" / "MLmodel").is_file() and result["trials"] == 2
    with tracking_at(cluster.tracking_uri):
        rows = mlflow.artifacts.load_dict(f"runs:/{result['run_id']}/sweep_summary.json")["trials"]
    assert [row["status"] for row in rows] == ["completed", "completed"]
    by_node = {row["node"]: row for row in rows}
    assert set(by_node) == {cluster.node_ids["head"], cluster.node_ids["node2"]}
    there = Path(by_node[cluster.node_ids["node2"]]["checkpoint"]).parent.parent  # that trial's folder
    assert not there.exists()  # not on the head...
    assert cluster.on_node2("test", "-d", str(there)).returncode == 0  # ...but on the node that ran it
    assert Path(by_node[cluster.node_ids["head"]]["checkpoint"]).is_file()
