"""Early termination of sweep trials (training.md): the cloud's bandit and truncation_selection
policies as small Ray Tune schedulers, and median_stopping on Tune's MedianStoppingRule.

A trial's "interval" is one validation of its primary metric (one `tune.report`). A policy is
applied at interval i when i >= max(1, delay_evaluation) and i % evaluation_interval == 0.
Primary metrics are maximised.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.stopper import Stopper

from models.sweep.settings import EarlyTermination


def applies(policy: EarlyTermination, interval: int) -> bool:
    """Whether the policy is evaluated at this interval."""
    return interval >= max(1, policy.delay_evaluation) and interval % policy.evaluation_interval == 0


class BanditPolicy:
    """Stop a trial whose metric at an interval falls outside the slack of the best value any trial has
    reported up to that interval: value < best / (1 + slack_factor), or value < best - slack_amount."""

    def __init__(self, policy: EarlyTermination):
        self.policy = policy
        self.curves: dict[str, dict[int, float]] = defaultdict(dict)

    def best_until(self, interval: int) -> float:
        values = [v for curve in self.curves.values() for i, v in curve.items() if i <= interval]
        return max(values) if values else -math.inf

    def threshold(self, best: float) -> float:
        if self.policy.slack_factor is not None:
            return best / (1 + self.policy.slack_factor)
        return best - (self.policy.slack_amount or 0.0)

    def decide(self, trial: str, interval: int, value: float) -> bool:
        """Record the value; True: stop the trial."""
        self.curves[trial][interval] = value
        if not applies(self.policy, interval):
            return False
        return not math.isfinite(value) or value < self.threshold(self.best_until(interval))


class TruncationPolicy:
    """At each evaluated interval, stop a trial that is among the lowest `truncation_percentage` % of all
    trials' values at that interval (finished trials count with their last value unless excluded)."""

    def __init__(self, policy: EarlyTermination):
        self.policy = policy
        self.curves: dict[str, dict[int, float]] = defaultdict(dict)
        self.finished: set[str] = set()

    def finish(self, trial: str) -> None:
        self.finished.add(trial)

    def _value_at(self, trial: str, interval: int) -> float | None:
        curve = self.curves[trial]
        if interval in curve:
            return curve[interval]
        if trial in self.finished and not self.policy.exclude_finished_jobs and curve and max(curve) < interval:
            return curve[max(curve)]
        return None

    def decide(self, trial: str, interval: int, value: float) -> bool:
        """Record the value; True: stop the trial."""
        self.curves[trial][interval] = value
        if not applies(self.policy, interval):
            return False
        others = [v for t in self.curves if t != trial and (v := self._value_at(t, interval)) is not None]
        n = len(others) + 1
        cut = math.floor(n * self.policy.truncation_percentage / 100)
        better = sum(1 for v in others if v > value)
        return cut > 0 and better >= n - cut


class _PolicyScheduler(FIFOScheduler):
    """A FIFO scheduler that asks a policy after each reported primary metric."""

    def __init__(self, policy, metric: str):
        super().__init__()
        self.policy, self._metric_name = policy, metric
        self.intervals: dict[str, int] = defaultdict(int)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._metric_name not in result:
            return TrialScheduler.CONTINUE
        self.intervals[trial.trial_id] += 1
        stop = self.policy.decide(trial.trial_id, self.intervals[trial.trial_id], float(result[self._metric_name]))
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if hasattr(self.policy, "finish"):
            self.policy.finish(trial.trial_id)


class _IntervalMedianStopping(MedianStoppingRule):
    """Tune's median stopping rule, evaluated only every `evaluation_interval` intervals."""

    def __init__(self, policy: EarlyTermination, metric: str):
        # metric and mode come from the TuneConfig (Tune refuses them twice)
        super().__init__(time_attr="training_iteration", grace_period=max(1, policy.delay_evaluation),
                         min_samples_required=1)
        self.interval = policy.evaluation_interval

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._metric in result and result.get(self._time_attr, 0) % self.interval != 0:
            self._results[trial].append(result)
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_scheduler(policy: EarlyTermination | None, metric: str) -> TrialScheduler:
    """The Ray Tune scheduler for `sweep.early_termination` (none: every trial runs to completion)."""
    if policy is None:
        return FIFOScheduler()
    if policy.type == "bandit":
        return _PolicyScheduler(BanditPolicy(policy), metric)
    if policy.type == "truncation_selection":
        return _PolicyScheduler(TruncationPolicy(policy), metric)
    return _IntervalMedianStopping(policy, metric)


class ExitScoreStopper(Stopper):
    """`limits.exit_score`: the whole sweep stops once any trial's primary metric reaches the score."""

    def __init__(self, metric: str, score: float):
        self.metric, self.score = metric, score
        self.reached_by: str | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        value = result.get(self.metric)
        if self.reached_by is None and value is not None and value >= self.score:
            self.reached_by = trial_id
        return False  # stop_all ends every trial, this one included

    def stop_all(self) -> bool:
        return self.reached_by is not None


class CallerStopper(Stopper):
    """The whole sweep stops once `should_stop()` says so (a caller cancelling it: the hub's `:cancel`); Tune
    then ends the trials itself and gives back their placement groups."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.should_stop()

    def stop_all(self) -> bool:
        return self.should_stop()
