"""The hub's bounds and recovery, on its own parts with a real MLflow registry and real files (no Ray): a training
registered before a crash is adopted (or removed, had it been cancelled) when the hub starts again, and one
registered after a cancel is removed when the training ends; lookups of unknown model names stay at the cache's
bound; a big dataset is indexed once and paged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import tracking_at


@pytest.fixture
def hub_parts(tmp_path):
    """(store, config, registry URI) of a hub whose state is `tmp_path/state`, its registry a SQLite file there."""
    from serving.hub.config import HubConfig
    from serving.hub.state import Store
    from serving.hub.training import ready_experiment

    store = Store(tmp_path / "state")
    uri = f"sqlite:///{store.root / 'mlflow.db'}"
    ready_experiment(uri, store.root / "mlartifacts")  # as build_hub does
    with tracking_at(uri):
        yield store, HubConfig(state_dir=str(store.root), tracking_uri=uri, image_root=str(tmp_path)), uri


def _jobs(store, config, **kwargs):
    from serving.hub.jobs import Jobs
    from serving.hub.scheduler import Quotas

    return Jobs(store, config, 1, Quotas(), **kwargs)


def _register_as_a_training_would(tmp_path: Path, name: str, run: str) -> str:
    """A run with a model folder, registered by the hub training's own `register` (its tags in the same call)."""
    import mlflow

    from serving.hub.training import EXPERIMENT, register

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: serving.mlflow_model\n")
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run() as started:
        mlflow.log_artifacts(str(folder), "mlflow-model")
    tags = {"modelKind": "Generic-Classifier", "trainingCostInMinutes": "1.5000",
            "modelPerformance": json.dumps({"accuracyTop1": 1.0})}
    return register(started.info.run_id, name, run, tags).version


def _crashed_record(store, name: str, status: str, run: str) -> None:
    """A model record as a hub that crashed after its training registered the model leaves it."""
    store.put("models", {"name": name, "status": status, "createdDateTime": "2026-01-01T00:00:00Z",
                         "_started": "2026-01-01T00:00:01Z", "_run": run,
                         "trainingParameters": {"modelKind": "Generic-Classifier", "trainingDatasetName": "d",
                                                "timeBudgetInHours": 1}})


def test_a_version_registered_before_a_crash_is_adopted_when_the_hub_starts_again(hub_parts, tmp_path):
    store, config, _ = hub_parts
    _jobs(store, config)  # the hub that crashes: its experiment made
    _crashed_record(store, "crashed", "training", "run-1")
    version = _register_as_a_training_would(tmp_path, "crashed", "run-1")

    jobs = _jobs(store, config)
    jobs.recover()
    record = store.get("models", "crashed")
    assert record["status"] == "succeeded" and "error" not in record
    assert record["_version"] == version and record["modelPerformance"] == {"accuracyTop1": 1.0}
    assert record["trainingCostInMinutes"] == 1.5
    assert jobs.catalog.model_id("crashed").endswith(f"/{version}")  # served by name


def test_a_version_a_cancelled_training_registered_before_a_crash_is_removed_freeing_the_name(hub_parts, tmp_path):
    import mlflow

    store, config, _ = hub_parts
    _jobs(store, config)
    _crashed_record(store, "late", "cancelling", "run-2")
    _register_as_a_training_would(tmp_path, "late", "run-2")

    jobs = _jobs(store, config)
    jobs.recover()
    assert store.get("models", "late")["status"] == "cancelled"
    assert mlflow.MlflowClient().search_model_versions("name='late'") == []
    assert jobs.registry.latest("late") == (None, {})  # a PUT of the name is not refused as registered


def test_a_version_registered_after_a_cancel_is_removed_with_the_training(hub_parts, tmp_path):
    import asyncio

    import mlflow

    store, config, _ = hub_parts
    jobs = _jobs(store, config)
    _crashed_record(store, "late", "cancelling", "run-4")
    version = _register_as_a_training_would(tmp_path, "late", "run-4")

    asyncio.run(jobs._finish("late", {"status": "succeeded", "modelVersion": version, "trainingCostInMinutes": 2}))
    assert store.get("models", "late")["status"] == "cancelled"
    assert mlflow.MlflowClient().search_model_versions("name='late'") == []


def test_an_interrupted_training_that_registered_nothing_still_fails_saying_the_hub_restarted(hub_parts, tmp_path):
    store, config, _ = hub_parts
    _jobs(store, config)
    _crashed_record(store, "cut", "training", "run-3")
    _register_as_a_training_would(tmp_path, "other", "run-3")  # another name's version is not this record's

    _jobs(store, config).recover()
    record = store.get("models", "cut")
    assert record["status"] == "failed" and "restarted" in record["error"]["message"]


def test_a_cancel_while_a_training_is_being_prepared_launches_nothing_and_frees_the_slot(hub_parts):
    """`_start` prepares a training's record off the event loop; a `:cancel` that arrives meanwhile (held here by
    another writer's lock on the database, readers still answered) is not lost: nothing launches (this test has
    no Ray to launch on), the record ends cancelled and the slot is free."""
    import asyncio
    import sqlite3

    store, config, _ = hub_parts
    store.put("models", {"name": "m", "status": "notStarted", "createdDateTime": "2026-01-01T00:00:00Z",
                         "trainingParameters": {"modelKind": "Generic-Classifier", "trainingDatasetName": "d",
                                                "timeBudgetInHours": 1}})
    jobs = _jobs(store, config)
    writer = sqlite3.connect(store.root / "hub.db", timeout=30)

    async def cancel_while_preparing() -> int:
        writer.execute("BEGIN IMMEDIATE")  # the preparation's write waits for this lock
        jobs.queue.add("m")
        jobs.dispatch()
        await asyncio.sleep(0.2)
        answer = await jobs.cancel("m")  # (status, record)
        writer.rollback()
        for _ in range(100):
            if "m" not in jobs.starting:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the cancelled record written
        return answer[0]

    assert asyncio.run(cancel_while_preparing()) == 202
    assert store.get("models", "m")["status"] == "cancelled"
    assert not jobs.running and not jobs.starting
    jobs.queue.add("next")
    assert jobs.queue.startable() == ["next"]  # the one slot was given back


def test_lookups_of_many_unknown_model_names_leave_the_name_cache_at_its_bound(hub_parts):
    from serving.hub.api import ApiError

    store, config, _ = hub_parts
    jobs = _jobs(store, config, names_kept=16)
    for n in range(40):
        with pytest.raises(ApiError):
            jobs.catalog.model_id(f"unknown-{n}")
    assert len(jobs.registry) == 16


def test_a_served_model_is_looked_up_again_only_once_it_changed_here_or_its_time_is_up(hub_parts):
    """Scoring asks for a model's id on every request: one found servable is kept NAMES_TTL_S seconds (a delete
    through another ingress replica shows within that), one not servable yet is looked up again each time, and a
    change through this catalog (`forget`: a delete, an adoption) shows at once."""
    from serving.hub.api import ApiError
    from serving.hub.catalog import Catalog, Registry

    store, _, _ = hub_parts
    catalog = Catalog(store, Registry())
    record = {"name": "m", "status": "training", "createdDateTime": "2026-01-01T00:00:00Z",
              "trainingParameters": {"modelKind": "Generic-Classifier", "trainingDatasetName": "d",
                                     "timeBudgetInHours": 1}}
    store.put("models", record)
    with pytest.raises(ApiError) as training:
        catalog.model_id("m")
    assert training.value.status == 409
    store.put("models", {**record, "status": "succeeded", "_version": "3"})
    assert catalog.model_id("m") == "m/3"  # a refusal is not kept
    store.delete("models", "m")
    assert catalog.model_id("m") == "m/3"  # deleted elsewhere: kept until its time is up
    catalog.forget("m")
    with pytest.raises(ApiError) as gone:
        catalog.model_id("m")
    assert gone.value.status == 404


def _big_dataset(folder: Path, images: int) -> Path:
    """A classification COCO file of `images` PNGs of the smallest size training takes (two categories)."""
    folder.mkdir()
    entries, annotations = [], []
    for i in range(images):
        path = folder / f"{i}.png"
        Image.new("RGB", (50, 50), (i % 256, 0, 0)).save(path)
        entries.append({"id": i + 1, "width": 50, "height": 50, "file_name": path.name, "absolute_url": str(path)})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": i % 2 + 1})
    coco = folder / "coco.json"
    coco.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return coco


def test_a_big_dataset_is_indexed_once_and_a_page_reads_only_its_rows(tmp_path):
    from serving.hub.browse import DatasetViews

    coco = _big_dataset(tmp_path / "big", 2000)
    record = {"name": "big", "annotationKind": "imageClassification", "annotationFileUris": [str(coco)],
              "eTag": '"1"'}
    views = DatasetViews(str(tmp_path))
    first = views.contents(record, 0, 60)
    assert first["valid"] and first["images"]["total"] == 2000 and first["counts"] == {"a": 1000, "b": 1000}

    Image.new("RGB", (51, 51)).save(tmp_path / "big" / "1500.png")  # an image off the next page changes alone
    started = time.perf_counter()
    page = views.contents(record, 1000, 60)
    assert time.perf_counter() - started < 0.5
    assert [row["name"] for row in page["images"]["value"]] == [f"{i}.png" for i in range(1000, 1060)]
    assert page["valid"]  # the index was not made again: no image header off the page was opened

    os.utime(coco)  # a COCO file changed: indexed again, every header checked
    again = views.contents(record, 1000, 60)
    assert not again["valid"] and again["problems"][0]["imageId"] == 1501


def test_the_dataset_views_keep_the_indexes_of_a_few_datasets_only(tmp_path):
    from serving.hub.browse import DatasetViews

    coco = _big_dataset(tmp_path / "small", 4)
    views = DatasetViews(str(tmp_path), keep=2)
    for n in range(5):
        views.contents({"name": f"d{n}", "annotationKind": "imageClassification",
                        "annotationFileUris": [str(coco)], "eTag": '"1"'}, 0, 4)
    assert list(views._indexes) == ["d3", "d4"]


def test_the_training_queue_tells_its_observer_waiting_and_running_at_start_and_on_every_change():
    from serving.hub.scheduler import TrainingQueue

    seen: list[tuple[int, int]] = []
    queue = TrainingQueue(1, lambda waiting, running: seen.append((waiting, running)))
    queue.add("a")
    queue.add("b")
    assert queue.startable() == ["a"]
    queue.withdraw("b")
    queue.finished("a")
    assert seen == [(0, 0), (1, 0), (2, 0), (1, 1), (0, 1), (0, 0)]


def test_a_registered_model_loaded_again_reuses_its_download_instead_of_another_copy(tmp_path):
    """A hub replica loads a model again after its memory budget evicted it: one copy on disk, however many loads
    (before, each load downloaded another, until the disk was full)."""
    import mlflow

    from models.runtime import downloads_folder
    from serving.loading import resolve_model

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        mlflow.set_experiment("reuse")
        with mlflow.start_run() as run:
            mlflow.pyfunc.log_model(name="mlflow-model", python_model=Echo())
        version = mlflow.register_model(f"runs:/{run.info.run_id}/mlflow-model", "reused").version
        before = set(downloads_folder().iterdir())
        folders = {resolve_model(f"models:/reused/{version}") for _ in range(3)}
        added = set(downloads_folder().iterdir()) - before
    [folder] = folders
    assert (folder / "MLmodel").is_file() and len(added) == 1
