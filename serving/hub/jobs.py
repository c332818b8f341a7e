"""Models and evaluations: their records, the trainings (queued, serving.hub.scheduler) and evaluations running in
Ray actors of their own, `:cancel`, recovery after a restart, and the names the hub can serve (its own models and
any registered in MLflow). Every create checks everything before it writes; a record is only ever written by the
run that owns it (a deleted evaluation's run is stopped, and its result dropped)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any

import mlflow
import ray
from fastapi import Request
from fastapi.responses import JSONResponse

from serving.hub.api import (
    ApiError,
    field,
    json_body,
    no_content,
    not_found,
    public,
    resource_name,
    section,
)
from serving.hub.catalog import describe
from serving.hub.model_request import model_request
from serving.hub.replicas import model_id
from serving.hub.runs import Run, end, failure, launch, stopped_errors
from serving.hub.scheduler import Quotas, TrainingQueue
from serving.hub.state import AlreadyExists, Store, now
from serving.hub.training import (
    CANCEL_FILE,
    EXPERIMENT,
    evaluate_task,
    train_model,
)

log = logging.getLogger("ray.serve")
ACTIVE = ("notStarted", "training", "cancelling")


def _registry():
    return mlflow.MlflowClient()


class Jobs:
    def __init__(self, store: Store, config: Any, slots: int, quotas: Quotas):
        self.store, self.config, self.quotas = store, config, quotas
        self.queue = TrainingQueue(slots)
        mlflow.set_tracking_uri(config.tracking_uri)
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            mlflow.create_experiment(EXPERIMENT, artifact_location=(store.root / "mlartifacts").as_uri())
        self.running: dict[str, Run] = {}  # model or "model/evaluation" → its actor and result
        self.stopping = False  # once the hub stops, results are no longer written (the next start fails them)
        self._names: dict[str, tuple[float, str | None, dict]] = {}  # registry lookups, kept a few seconds

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
        for name in trainings:
            (self.store.job_dir(name) / CANCEL_FILE).touch()
        if trainings:
            ray.wait([run.ref for run in trainings.values()], num_returns=len(trainings), timeout=grace_s)
        for run in runs.values():
            end(run)

    def recover(self) -> None:
        """Trainings a restart interrupted end failed (cancelling ones cancelled), as do evaluations; trainings
        that were still waiting for a slot wait again, in their order."""
        message = f"the hub stopped while this ran (restarted at {now()}); start it again"
        for record in self.store.all("models"):
            if record["status"] == "notStarted" and not record.get("_started"):
                self.queue.add(record["name"])
            elif record["status"] in ACTIVE:
                status = "cancelled" if record["status"] == "cancelling" else "failed"
                error = {} if status == "cancelled" else {"error": {"code": "unknown", "message": message}}
                self.store.update("models", record["name"], status=status, **error)
            for evaluation in self.store.all("evaluations", record["name"]):
                if evaluation["status"] in ("notStarted", "running"):
                    self.store.update("evaluations", evaluation["name"], record["name"], status="failed",
                                      error={"code": "unknown", "message": message})

    # ------------------------------------------------------------------ models

    async def create_model(self, name: str, request: Request) -> JSONResponse:
        doc = await json_body(request)
        record = model_request(name, doc, lambda dataset: self.store.get("datasets", dataset))
        exists = ApiError(409, "ModelAlreadyExists", f"model {name!r} already exists", name)
        if (await asyncio.to_thread(self._registered, name))[0] is not None:  # registered the usual MLflow way
            raise exists
        self.quotas.check("waiting_trainings", len(self.queue.waiting))
        try:
            record = await asyncio.to_thread(self.store.create, "models", record,
                                             check=lambda count: self.quotas.check("models", count))
        except AlreadyExists:
            raise exists from None
        self.queue.add(name)
        self.dispatch()
        return JSONResponse(public(record), 201)

    def dispatch(self) -> None:
        """Starts the waiting trainings that a free slot lets start (after a PUT, a training's end, a restart)."""
        if self.stopping:
            return
        for name in self.queue.startable():
            try:
                self._start(name)
            except Exception:  # noqa: BLE001  (the record says so; the slot is given back)
                log.exception("hub: training %s could not start", name)
                self.queue.finished(name)
                self.store.update("models", name, status="failed", error={
                    "code": "unknown", "message": "the training could not start; the hub's log has the details"})

    def _order(self, record: dict[str, Any]) -> dict[str, Any]:
        """What a training needs, read when it starts (a dataset deleted while it waited fails it: datasetNotFound)."""
        name, params = record["name"], record["trainingParameters"]
        test = (record.get("evaluationParameters") or {}).get("testDatasetName")
        return {"model": name, "dataset": self.store.get("datasets", params["trainingDatasetName"]),
                "dataset_name": params["trainingDatasetName"], "kind": params["modelKind"],
                "budget_hours": params["timeBudgetInHours"], "image_root": self.config.image_root,
                "tracking_uri": self.config.tracking_uri, "job_dir": str(self.store.job_dir(name)),
                "test_dataset_name": test, "test_dataset": self.store.get("datasets", test) if test else None}

    def _start(self, name: str) -> None:
        record = self.store.get("models", name)
        if record is None or record["status"] != "notStarted":  # gone or cancelled while it waited
            self.queue.finished(name)
            return
        record = self.store.update("models", name, _started=now())  # a restart now fails it, never reruns it
        shutil.rmtree(self.store.job_dir(name), ignore_errors=True)
        self.store.job_dir(name).mkdir(parents=True)
        run = self.running[name] = launch(train_model, self._order(record))
        asyncio.get_running_loop().create_task(self._watch(name, run))

    async def _watch(self, name: str, run: Run) -> None:
        try:
            fields = await run.ref
        except stopped_errors() as exc:
            cancelled = (self.store.get("models", name) or {}).get("status") == "cancelling"
            fields = {"status": "cancelled"} if cancelled else failure(exc, "training")
        finally:
            self.running.pop(name, None)
            self.queue.finished(name)
            end(run)
            self.dispatch()
        record = self.store.get("models", name)
        if record is None or self.stopping:
            return
        if record["status"] == "cancelling":
            fields = {"status": "cancelled", "trainingCostInMinutes": fields.get("trainingCostInMinutes", 0)}
        private = {"_version": fields.pop("modelVersion", None), "_uri": fields.pop("modelUri", None),
                   "_architecture": fields.pop("architecture", None), "_task": fields.pop("task", None),
                   "_labels": fields.pop("labels", None)}
        self.store.put("models", {**record, **fields, **private})

    def _merged(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record as it is now: a running training's own progress folded in."""
        if record["status"] == "notStarted" and self.store.progress(record["name"]).get("status") == "training":
            return {**record, "status": "training"}
        return record

    def model_record(self, name: str) -> dict[str, Any]:
        """The hub's record of a model as it is now (or a registry model's), private keys kept; 404 unknown."""
        record = self.store.get("models", name)
        if record is None:
            record = self._registry_record(name)
        if record is None:
            raise not_found("model", name)
        return self._merged(record)

    async def model_answer(self, name: str) -> JSONResponse:
        return JSONResponse(public(self.model_record(name)))

    async def cancel(self, name: str) -> JSONResponse:
        record = self.store.get("models", name)
        if record is None:
            raise not_found("model", name)
        if self.queue.withdraw(name):  # still waiting for a slot: nothing ran, nothing to stop
            record = self.store.update("models", name, status="cancelled", trainingCostInMinutes=0)
            return JSONResponse(public(record), 202)
        run = self.running.get(name)
        if run is not None and record["status"] in ("notStarted", "training"):
            record = self.store.update("models", name, status="cancelling")
            (self.store.job_dir(name) / CANCEL_FILE).touch()  # Tune ends the trials and frees their CPUs/GPUs
            asyncio.get_running_loop().create_task(self._kill_later(name, run))
        return JSONResponse(public(self._merged(record)), 202)

    async def _kill_later(self, name: str, run: Run, grace_s: float = 60) -> None:
        """A training that has not stopped by itself within `grace_s` (still reading its data, say) is killed."""
        await asyncio.sleep(grace_s)
        if self.running.get(name) is run:
            end(run)

    async def delete_model(self, name: str):
        record = self.store.get("models", name)
        if record is None:
            raise not_found("model", name)
        if record["status"] in ACTIVE or name in self.running:
            raise ApiError(409, "ModelBusy", f"model {name!r} is {self._merged(record)['status']}: cancel it first, "
                           "then delete it once it is cancelled", name)
        self._names.pop(name, None)
        if record.get("_version") or record.get("_started"):  # a late cancel or a crash may have registered it
            await asyncio.to_thread(self._unregister, name)
        for key in [k for k in self.running if k.startswith(f"{name}/")]:  # its evaluations stop with it
            end(self.running.pop(key))
        await asyncio.to_thread(self.store.delete_all, "evaluations", name)
        await asyncio.to_thread(self.store.delete, "models", name)
        await asyncio.to_thread(shutil.rmtree, self.store.job_dir(name), True)
        return no_content()

    @staticmethod
    def _unregister(name: str) -> None:
        try:
            _registry().delete_registered_model(name)
        except Exception:  # noqa: BLE001  (never registered, or already gone)
            log.info("hub: model %s was not in the registry", name)

    def model_list(self) -> list[dict[str, Any]]:
        own = [self._merged(r) for r in self.store.all("models")]
        known = {r["name"] for r in own}
        try:
            others = [m.name for m in _registry().search_registered_models() if m.name not in known]
        except Exception:  # noqa: BLE001
            others = []
        return own + [r for r in (self._registry_record(n) for n in others) if r is not None]

    # ------------------------------------------------------------------ names the hub serves

    def _registered(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """(latest version, its tags) of a model in the MLflow Model Registry, or (None, {})."""
        cached = self._names.get(name)
        if cached is not None and time.monotonic() - cached[0] < 5:
            return cached[1], cached[2]
        try:
            versions = _registry().search_model_versions(f"name='{name}'")
        except Exception:  # noqa: BLE001  (not registered, or a name the registry refuses)
            versions = []
        latest = max(versions, key=lambda v: int(v.version), default=None)
        found = (latest.version, dict(latest.tags or {})) if latest is not None else (None, {})
        self._names[name] = (time.monotonic(), *found)
        return found

    def _registry_record(self, name: str) -> dict[str, Any] | None:
        """A model registered the usual MLflow way (`visionserve train`, `mlflow.register_model`)."""
        version, tags = self._registered(name)
        if version is None:
            return None
        return {"name": name, "status": "succeeded", "createdDateTime": "", "_version": version,
                "trainingParameters": {"modelKind": tags.get("modelKind", "Generic-Classifier")},
                "modelVersion": version}

    def model_id(self, name: str) -> str:
        """The multiplexed model id to serve `name` (404 unknown, 409 not trained yet)."""
        record = self.store.get("models", name)
        if record is not None:
            if record["status"] != "succeeded":
                raise ApiError(409, "ModelNotReady", f"model {name!r} is {self._merged(record)['status']}, "
                               "not succeeded", name)
            return model_id(name, record["_version"])
        version, _ = self._registered(name)
        if version is None:
            raise not_found("model", name)
        return model_id(name, version)

    def hub_wide_list(self) -> list[dict[str, Any]]:
        """GET /models: every model with its task, labels and status."""
        return [describe(r, self.store) for r in self.model_list()]

    # ------------------------------------------------------------------ evaluations

    async def create_evaluation(self, model: str, name: str, request: Request) -> JSONResponse:
        doc = await json_body(request)
        test = field(section(doc, "evaluationParameters"), "testDatasetName")
        if test is None or test == "":
            raise ApiError(400, "InvalidArgument", "evaluationParameters.testDatasetName is required",
                           "testDatasetName")
        test = resource_name(test, "testDatasetName", "dataset")
        try:
            mid = self.model_id(model)
        except ApiError as exc:
            raise ApiError(exc.status, "modelNotFound" if exc.status == 404 else exc.code, exc.message, model) from None
        dataset = self.store.get("datasets", test)
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
                                                        self.config.image_root, self.config.tracking_uri)
        asyncio.get_running_loop().create_task(self._watch_evaluation(model, name, run))
        return JSONResponse(public(record), 201)

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
            self.store.update("evaluations", name, model, **fields)

    async def evaluation_answer(self, model: str, name: str) -> JSONResponse:
        record = self.store.get("evaluations", name, model)
        if record is None:
            raise not_found("evaluation", name)
        return JSONResponse(public(record))

    async def delete_evaluation(self, model: str, name: str):
        """Removes the record; a running evaluation is stopped, and nothing it would have written is kept."""
        run = self.running.pop(f"{model}/{name}", None)
        if run is not None:
            end(run)
        if not self.store.delete("evaluations", name, model):
            raise not_found("evaluation", name)
        return no_content()

    def evaluation_list(self, model: str) -> list[dict[str, Any]]:
        if self.store.get("models", model) is None and self._registered(model)[0] is None:
            raise not_found("model", model, "modelNotFound")
        return self.store.all("evaluations", model)
