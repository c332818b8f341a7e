"""A run: one training or evaluation of the hub in a Ray actor of its own (`launch`), waited on through its result
and stopped by killing the actor (`end`); what a run that raised shows the API user (`failure`).

A training talks with the hub through its actor, not through files: it reports where it is (training.Progress's
`report`, which the hub reads with `Run.said` and keeps in its database for every ingress replica) and learns that
it is to stop (`Run.stop`, which its `stopped` then says), so that it may run on any node of the cluster."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from serving.hub.state import now
from serving.hub.training import Failed

log = logging.getLogger("ray.serve")


class _StopFlag:
    """True once set: what a training's sweep asks between epochs (training.Progress.stopped). Tune pickles its
    stoppers with the experiment's state, so this pickles too; a copy (a restored experiment) starts unset."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def __reduce__(self) -> tuple[type, tuple]:
        return _StopFlag, ()


class _Runner:
    """The process of one training or evaluation: one handle to wait on, to ask, to stop and to kill. Killing it
    ends its Tune trials, but Ray keeps the placement groups they held (and their CPUs) until the hub's driver
    exits, so a training is first asked to stop (`stop`), which its sweep hears between epochs. A threaded actor:
    `said` and `stop` are answered while `run` works."""

    def __init__(self) -> None:
        self.stopped = _StopFlag()
        self._lock = threading.Lock()
        self._said: dict[str, Any] | None = None  # the latest report not yet read by the hub

    def run(self, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        return fn(*args)

    def run_reporting(self, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        return fn(*args, self)

    def report(self, **values: Any) -> None:
        with self._lock:
            self._said = {**values, "at": now()}

    def said(self) -> dict[str, Any] | None:
        with self._lock:
            said, self._said = self._said, None
        return said

    def stop(self) -> None:
        self.stopped.set()


@dataclass(eq=False)
class Run:
    actor: Any
    ref: Any

    def stop(self) -> None:
        """Asks the run to stop by itself (a training's Progress.stopped says so from now on)."""
        self.actor.stop.remote()

    async def said(self) -> dict[str, Any] | None:
        """The run's latest report since the last call (None: nothing new)."""
        return await self.actor.said.remote()


def launch(fn: Callable[..., dict[str, Any]], *args: Any, resources: dict[str, float], reporting: bool = False) -> Run:
    """`fn(*args)` in an actor of its own, on a node that has the custom `resources` (--training-resources); with
    `reporting`, `fn(*args, progress)` (a training.Progress)."""
    actor = ray.remote(_Runner).options(num_cpus=0, resources=resources, max_restarts=0, max_task_retries=0,
                                        max_concurrency=3).remote()
    return Run(actor, (actor.run_reporting if reporting else actor.run).remote(fn, *args))


def end(run: Run) -> None:
    try:
        ray.kill(run.actor, no_restart=True)
    except Exception:  # noqa: BLE001  (already gone, or Ray itself is stopping)
        log.debug("hub: the run's actor was already gone")


def stopped_errors() -> tuple[type[BaseException], ...]:
    return (ray.exceptions.RayActorError, ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.RayTaskError)


def failure(exc: BaseException, what: str) -> dict[str, Any]:
    """A run that raised: its status and error as the API shows them. The API user sees the hub's own words (a
    `Failed`'s code and message), never a remote traceback, a process id or a path of the server: those go to
    the log."""
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the task's own exception
    if isinstance(cause, Failed):
        return {"status": "failed", "error": {"code": cause.code, "message": cause.message}}
    log.error("hub: the %s failed: %s", what, exc)
    return {"status": "failed", "error": {"code": "unknown", "message": f"the {what} stopped unexpectedly "
                                          f"({type(cause).__name__}); the hub's log has the details"}}
