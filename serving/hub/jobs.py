"""What changes models and evaluations, in the one process that owns the runs (serving.hub.owner): creates, the
trainings (queued, serving.hub.scheduler) and evaluations running in Ray actors of their own, `:cancel`, deletes,
recovery after a restart. Every create checks everything before it writes; a record is only ever written by the
run that owns it (a deleted evaluation's run is stopped, and its result dropped). Each change answers
(status, the record as the API shows it, or None); reads are serving.hub.catalog's."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
from collections.abc import Callable
from typing import Any

import mlflow
import ray

from serving.hub.api import (
    ApiError,
    field,
    not_found,
    public,
    resource_name,
    section,
)
from serving.hub.catalog import NAMES_KEPT, Catalog, Registry
from serving.hub.model_request import model_request
from serving.hub.runs import Run, end, failure, launch, stopped_errors
from serving.hub.scheduler import Quotas, TrainingQueue
from serving.hub.state import AlreadyExists, Store, now
from serving.hub.training import evaluate_task, ready_experiment, train_model

log = logging.getLogger("ray.serve")
ACTIVE = ("notStarted", "training", "cancelling")
Answer = tuple[int, dict[str, Any] | None]  # what a change answers: (status, body)
RELAY_S = 2.0  # how often a running training's report is read and kept
INTERRUPTED = "the hub stopped while this ran"  # how a failed record that a restart ended begins its message

class Jobs:
    def __init__(self, store: Store, config: Any, slots: int, quotas: Quotas, names_kept: int = NAMES_KEPT,
                 observe: Callable[[int, int], None] | None = None):  # told (waiting, running) trainings
        self.store, self.config, self.quotas = store, config, quotas
        self.queue = TrainingQueue(slots, observe)
        mlflow.set_tracking_uri(config.tracking_uri)
        ready_experiment(config.tracking_uri, store.root / "mlartifacts")  # (build_hub made a store of its own)
        self.running: dict[str, Run] = {}  # model or "model/evaluation" → its actor and result
        self.stopping = False  # once the hub stops, results are no longer written (the next start fails them)
        self.registry = Registry(names_kept)
        self.catalog = Catalog(store, self.registry)  # what every ingress replica reads
        self.starting: dict[str, bool] = {}  # trainings whose records are being prepared → cancelled meanwhile

    # ------------------------------------------------------------------ restart, shutdown

    def stop_all(self, grace_s: float = 45) -> None:
        """The hub is stopping. Its trainings are asked to stop as `:cancel` does, so that Tune ends their
        trials and removes their placement groups (Ray keeps a killed driver's groups, and their CPUs, for
        as long as the hub runs); what has not stopped within `grace_s` is killed. The records stay as they
        are: the next start fails them."""
        if self.stopping:
            return
        self.stopping = True
        self.queue.clear()  # what waits stays notStarted: the next start queues it again
        runs = dict(self.running)
        trainings = {name: run for name, run in runs.items() if "/" not in name}  # evaluations are "model/name"
        for run in trainings.values():
            run.stop()
        if trainings:
            ray.wait([run.ref for run in trainings.values()], num_returns=len(trainings), timeout=grace_s)
        for run in runs.values():
            end(run)

    def recover(self) -> None:
        """Trainings a restart interrupted end failed (cancelling ones cancelled), as do evaluations, unless the
        training had registered its model before the hub stopped (`_settle`); trainings that were still waiting
        for a slot wait again, in their order."""
        message = f"{INTERRUPTED} (restarted at {now()}); start it again"
        for record in self.store.all("models"):
            if record["status"] == "notStarted" and not record.get("_started"):
                self.queue.add(record["name"])
            elif record["status"] in ACTIVE or (record["status"] == "failed" and not record.get("_version") and
                                                 record.get("error", {}).get("message", "").startswith(INTERRUPTED)):
                self._settle(record, message)
            for evaluation in self.store.all("evaluations", record["name"]):
                if evaluation["status"] in ("notStarted", "running"):
                    self.store.update("evaluations", evaluation["name"], record["name"], status="failed",
                                      error={"code": "unknown", "message": message})

    def _settle(self, record: dict[str, Any], message: str) -> None:
        """An interrupted training's record and registry made to agree: a version this run registered (tagged with
        its `_run`) is adopted, the record succeeding with it; a cancelled run's versions are removed; else the
        record fails. A crash between registering and writing the record never leaves a name that is registered
        but not the record's, which no DELETE would free."""
        name = record["name"]
        versions = self.registry.run_versions(name, record.get("_run"))
        if record["status"] == "cancelling":
            if versions:
                self.registry.unregister(name)
            self.store.update("models", name, status="cancelled")
        elif versions:
            latest = max(versions, key=lambda v: int(v.version))
            tags = dict(latest.tags or {})
            adopted = {k: v for k, v in record.items() if k != "error"}
            self.store.put("models", {**adopted, "status": "succeeded", "_version": latest.version,
                                      "_uri": f"models:/{name}/{latest.version}",
                                      "modelPerformance": json.loads(tags.get("modelPerformance", "{}")),
                                      "trainingCostInMinutes": float(tags.get("trainingCostInMinutes", 0))})
            log.info("hub: model %s adopted version %s, registered before the hub stopped", name, latest.version)
        elif record["status"] != "failed":
            self.store.update("models", name, status="failed", error={"code": "unknown", "message": message})
        self.catalog.forget(name)

    # ------------------------------------------------------------------ models

    async def create_model(self, name: str, doc: dict[str, Any]) -> Answer:
        record = await asyncio.to_thread(model_request, name, doc, lambda dataset: self.store.get("datasets", dataset))
        exists = ApiError(409, "ModelAlreadyExists", f"model {name!r} already exists", name)
        if (await asyncio.to_thread(self.registry.latest, name))[0] is not None:  # registered the usual MLflow way
            raise exists
        self.quotas.check("waiting_trainings", len(self.queue.waiting))
        try:
            record = await asyncio.to_thread(self.store.create, "models", record,
                                             check=lambda count: self.quotas.check("models", count))
        except AlreadyExists:
            raise exists from None
        self.queue.add(name)
        self.dispatch()
        return 201, public(record)

    def dispatch(self) -> None:
        """Starts the waiting trainings that a free slot lets start (after a PUT, a training's end, a restart)."""
        if self.stopping:
            return
        for name in self.queue.startable():
            self.starting[name] = False
            asyncio.get_running_loop().create_task(self._start(name))

    async def _start(self, name: str) -> None:
        """A training's record marked started and its folder made, off the event loop, then its actor launched; a
        `:cancel` that came meanwhile (`starting`) launches nothing. Only this writes the record until it runs."""
        order, fields = None, None
        try:
            order = await asyncio.to_thread(self._prepare, name)
        except Exception:  # noqa: BLE001  (the record says so; the slot is given back)
            log.exception("hub: training %s could not start", name)
            fields = {"status": "failed", "error": {
                "code": "unknown", "message": "the training could not start; the hub's log has the details"}}
        if self.starting.pop(name, False):
            order, fields = None, {"status": "cancelled", "trainingCostInMinutes": 0}
        if order is not None and not self.stopping:
            run = self.running[name] = launch(train_model, order, resources=self.config.training_resources,
                                              reporting=True)
            await self._watch(name, run)
            return
        if fields is not None and not self.stopping:
            await asyncio.to_thread(self.store.update, "models", name, **fields)
        self.queue.finished(name)
        self.dispatch()

    def _order(self, record: dict[str, Any]) -> dict[str, Any]:
        """What a training needs, read when it starts (a dataset deleted while it waited fails it: datasetNotFound)."""
        name, params = record["name"], record["trainingParameters"]
        test = (record.get("evaluationParameters") or {}).get("testDatasetName")
        return {"model": name, "dataset": self.store.get("datasets", params["trainingDatasetName"]),
                "dataset_name": params["trainingDatasetName"], "kind": params["modelKind"],
                "budget_hours": params["timeBudgetInHours"], "image_root": self.config.image_root,
                "tracking_uri": self.config.tracking_uri, "job_dir": str(self.store.job_dir(name)),
                "resources": self.config.training_resources,
                "run": record["_run"], "test_dataset_name": test,
                "test_dataset": self.store.get("datasets", test) if test else None}

    def _prepare(self, name: str) -> dict[str, Any] | None:
        """What the training needs (`_order`), its record marked started; None when it went or was cancelled."""
        record = self.store.get("models", name)
        if record is None or record["status"] != "notStarted":  # gone or cancelled while it waited
            return None
        # a restart now fails it (or adopts what it registered, tagged with its run), never reruns it
        record = self.store.update("models", name, _started=now(), _run=secrets.token_hex(8))
        self.store.set_progress(name, None)  # what an earlier training of this name said
        shutil.rmtree(self.store.job_dir(name), ignore_errors=True)
        self.store.job_dir(name).mkdir(parents=True)
        return self._order(record)

    async def _watch(self, name: str, run: Run) -> None:
        try:
            fields = await self._relay(name, run)
        except stopped_errors() as exc:
            cancelled = ((await asyncio.to_thread(self.store.get, "models", name)) or {}).get("status") == "cancelling"
            fields = {"status": "cancelled"} if cancelled else failure(exc, "training")
        finally:
            self.running.pop(name, None)
            self.queue.finished(name)
            end(run)
            self.dispatch()
        await self._finish(name, fields)

    async def _relay(self, name: str, run: Run) -> dict[str, Any]:
        """The training's result; meanwhile what it says of itself is kept in the database every `RELAY_S`, where
        every ingress replica reads it (a training may run on any node: it writes no file the hub reads)."""
        result = asyncio.ensure_future(run.ref)
        while True:
            done, _ = await asyncio.wait({result}, timeout=RELAY_S)
            try:
                said = await run.said()
            except stopped_errors():
                said = None  # the actor is gone: the result says why
            if said is not None:
                await asyncio.to_thread(self.store.set_progress, name, said)
            if done:
                return result.result()

    async def _finish(self, name: str, fields: dict[str, Any]) -> None:
        """A training's result written on its record; a version registered after a `:cancel` is removed with it."""
        record = await asyncio.to_thread(self.store.get, "models", name)
        if record is None or self.stopping:
            return  # stopping: the next start adopts (or removes) what it registered
        if record["status"] == "cancelling":
            if fields.get("modelVersion"):
                await asyncio.to_thread(self.registry.unregister, name)
            fields = {"status": "cancelled", "trainingCostInMinutes": fields.get("trainingCostInMinutes", 0)}
        private = {"_version": fields.pop("modelVersion", None), "_uri": fields.pop("modelUri", None),
                   "_architecture": fields.pop("architecture", None), "_task": fields.pop("task", None),
                   "_labels": fields.pop("labels", None)}
        await asyncio.to_thread(self.store.put, "models", {**record, **fields, **private})

    async def cancel(self, name: str) -> Answer:
        record = await asyncio.to_thread(self.store.get, "models", name)
        if record is None:
            raise not_found("model", name)
        if self.queue.withdraw(name):  # still waiting for a slot: nothing ran, nothing to stop
            record = await asyncio.to_thread(self.store.update, "models", name, status="cancelled",
                                             trainingCostInMinutes=0)
            return 202, public(record)
        if name in self.starting:  # `_start` writes it cancelled instead of launching
            self.starting[name] = True
            return 202, public({**record, "status": "cancelling"})
        run = self.running.get(name)
        if run is not None and record["status"] in ("notStarted", "training"):
            record = await asyncio.to_thread(self.store.update, "models", name, status="cancelling")
            run.stop()  # Tune ends the trials and frees their CPUs/GPUs
            asyncio.get_running_loop().create_task(self._kill_later(name, run))
        return 202, public(self.catalog.merged(record))

    async def _kill_later(self, name: str, run: Run, grace_s: float = 60) -> None:
        """A training that has not stopped by itself within `grace_s` (still reading its data, say) is killed."""
        await asyncio.sleep(grace_s)
        if self.running.get(name) is run:
            end(run)

    async def delete_model(self, name: str) -> Answer:
        record = await asyncio.to_thread(self.store.get, "models", name)
        if record is None:
            raise not_found("model", name)
        if record["status"] in ACTIVE or name in self.running or name in self.starting:
            raise ApiError(409, "ModelBusy", f"model {name!r} is {self.catalog.merged(record)['status']}: cancel it first, "
                           "then delete it once it is cancelled", name)
        self.catalog.forget(name)
        if record.get("_version") or record.get("_started"):  # a late cancel or a crash may have registered it
            await asyncio.to_thread(self.registry.unregister, name)
        for key in [k for k in self.running if k.startswith(f"{name}/")]:  # its evaluations stop with it
            end(self.running.pop(key))
        await asyncio.to_thread(self.store.delete_all, "evaluations", name)
        await asyncio.to_thread(self.store.set_progress, name, None)
        await asyncio.to_thread(self.store.delete, "models", name)
        await asyncio.to_thread(shutil.rmtree, self.store.job_dir(name), True)
        return 204, None

    # ------------------------------------------------------------------ evaluations

    async def create_evaluation(self, model: str, name: str, doc: dict[str, Any]) -> Answer:
        test = field(section(doc, "evaluationParameters"), "testDatasetName")
        if test is None or test == "":
            raise ApiError(400, "InvalidArgument", "evaluationParameters.testDatasetName is required",
                           "testDatasetName")
        test = resource_name(test, "testDatasetName", "dataset")
        try:
            mid = await asyncio.to_thread(self.catalog.model_id, model)
        except ApiError as exc:
            raise ApiError(exc.status, "modelNotFound" if exc.status == 404 else exc.code, exc.message, model) from None
        dataset = await asyncio.to_thread(self.store.get, "datasets", test)
        if dataset is None:
            raise ApiError(404, "datasetNotFound", f"testDatasetName: dataset {test!r} does not exist", "testDatasetName")
        record = {"name": name, "modelName": model, "createdDateTime": now(), "status": "notStarted",
                  "evaluationParameters": {"testDatasetName": test}}
        try:
            record = await asyncio.to_thread(self.store.create, "evaluations", record, model,
                                             check=lambda count: self.quotas.check("evaluations", count))
        except AlreadyExists:
            raise ApiError(409, "EvaluationAlreadyExists",
                           f"evaluation {name!r} of model {model!r} already exists") from None
        run = self.running[f"{model}/{name}"] = launch(evaluate_task, f"models:/{mid}", dataset, test,
                                                        self.config.image_root, self.config.tracking_uri,
                                                        resources=self.config.training_resources)
        asyncio.get_running_loop().create_task(self._watch_evaluation(model, name, run))
        return 201, public(record)

    async def _watch_evaluation(self, model: str, name: str, run: Run) -> None:
        key = f"{model}/{name}"
        try:
            fields = await run.ref
        except Exception as exc:  # noqa: BLE001
            fields = failure(exc, "evaluation")
        finally:
            owner = self.running.get(key) is run  # not when it was deleted (and perhaps created again) meanwhile
            if owner:
                self.running.pop(key)
            end(run)
        if owner and not self.stopping:
            await asyncio.to_thread(self.store.update, "evaluations", name, model, **fields)

    async def delete_evaluation(self, model: str, name: str) -> Answer:
        """Removes the record; a running evaluation is stopped, and nothing it would have written is kept."""
        run = self.running.pop(f"{model}/{name}", None)
        if run is not None:
            end(run)
        if not await asyncio.to_thread(self.store.delete, "evaluations", name, model):
            raise not_found("evaluation", name)
        return 204, None
