"""How much the hub takes on: trainings wait in the order they were asked for until one of a few slots is free
(`TrainingQueue`), and how many datasets, models, evaluations and waiting trainings it keeps (`Quotas`), each
refused in the API's format before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Quotas:
    """The most of each thing the hub keeps; a request over one is refused naming the quota and its flag."""

    datasets: int = 1000
    models: int = 500
    evaluations: int = 100  # per model
    waiting_trainings: int = 20  # queued behind the running ones

    def check(self, what: str, count: int) -> None:
        """Refuses adding one more `what` (a field's name) when `count` already exist: 400, or 429 for a waiting
        training (it may be asked again once others have started). The flag is `--max-<what>`."""
        from serving.hub.api import ApiError  # here: the command line reads Quotas' defaults without FastAPI

        limit = getattr(self, what)
        if count < limit:
            return
        flag = f"--max-{what.replace('_', '-')}"
        if what == "waiting_trainings":
            error = ApiError(429, "TooManyRequests", f"{count} trainings are already waiting for a free slot (at "
                             f"most {limit}, {flag}); try again when one has started")
            error.headers["Retry-After"] = "60"
            raise error
        raise ApiError(400, "QuotaExceeded", f"the hub already holds {count} {what} (at most {limit}, {flag}); "
                       f"delete some first")


class TrainingQueue:
    """Trainings by model name: at most `slots` run at once, the others wait (their records stay `notStarted`)
    and start first come, first served; a waiting one can be withdrawn (`:cancel`)."""

    def __init__(self, slots: int, observe: Callable[[int, int], None] | None = None):
        if slots < 1:
            raise ValueError("a training queue needs at least one slot")
        self.slots = slots
        self.waiting: dict[str, None] = {}  # in insertion order: first come, first served
        self.running: set[str] = set()
        self._observe = observe  # told (waiting, running) on every change (serving.hub.metrics), and now
        self._changed()

    def _changed(self) -> None:
        if self._observe is not None:
            self._observe(len(self.waiting), len(self.running))

    def add(self, name: str) -> None:
        self.waiting[name] = None
        self._changed()

    def withdraw(self, name: str) -> bool:
        """Removes a waiting training; False when it is not waiting (running, or unknown)."""
        if name not in self.waiting:
            return False
        del self.waiting[name]
        self._changed()
        return True

    def finished(self, name: str) -> None:
        self.running.discard(name)
        self._changed()

    def startable(self) -> list[str]:
        """The waiting trainings that may start now, oldest first; they count as running from here on."""
        started = []
        while self.waiting and len(self.running) < self.slots:
            name = next(iter(self.waiting))
            del self.waiting[name]
            self.running.add(name)
            started.append(name)
        if started:
            self._changed()
        return started

    def clear(self) -> None:
        self.waiting.clear()
        self._changed()


def default_slots(cluster_cpus: float, cpus_per_training: float = 2.0) -> int:
    """Trainings side by side when `--max-concurrent-trainings` is not given: one per two of the cluster's CPUs
    (a training's trials take the CPUs that are free; fewer would each crawl), at least one."""
    return max(1, int(cluster_cpus // cpus_per_training))
