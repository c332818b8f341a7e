"""A run: one training or evaluation of the hub in a Ray actor of its own (`launch`), waited on through its result
and stopped by killing the actor (`end`); what a run that raised shows the API user (`failure`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from serving.hub.training import Failed

log = logging.getLogger("ray.serve")


class _Runner:
    """The process of one training or evaluation: one handle to wait on and to kill. Killing it ends its Tune
    trials, but Ray keeps the placement groups they held (and their CPUs) until the hub's driver exits, so a
    training is first asked to stop through its cancel file (`Jobs.cancel`, `Jobs.stop_all`)."""

    def run(self, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        return fn(*args)


@dataclass(eq=False)
class Run:
    actor: Any
    ref: Any


def launch(fn: Callable[..., dict[str, Any]], *args: Any) -> Run:
    actor = ray.remote(_Runner).options(num_cpus=0, max_restarts=0, max_task_retries=0).remote()
    return Run(actor, actor.run.remote(fn, *args))


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
